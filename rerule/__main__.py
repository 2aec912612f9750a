"""``python -m rerule ...`` is the ``rerule`` command."""

import sys

from rerule.cli import main

sys.exit(main())
