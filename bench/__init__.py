"""Kernel benchmarks (pytest-benchmark: ``make bench``), the GPU check script ``bench/gpu.sh`` and the
end-to-end training script ``bench/gpu_e2e.sh`` (helper ``bench/e2e_train.py``).

Importing this package also makes a bare checkout importable: setup.py ships ``kernels/`` as
``rerule.kernels``, which only an install maps. On a machine without one (the GPU machine has no
package index, and no ``pip install -e .`` was run) a last-resort finder maps it the same way.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Resolve ``rerule.kernels`` to this checkout's kernels/ when nothing else on the path does."""

    def find_spec(self, name, path=None, target=None):
        if name != "rerule.kernels" or not (_KERNELS / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, _KERNELS / "__init__.py", submodule_search_locations=[str(_KERNELS)]
        )


if not any(isinstance(f, _CheckoutKernelsFinder) for f in sys.meta_path):
    sys.meta_path.append(_CheckoutKernelsFinder())
