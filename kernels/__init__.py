"""rerule.kernels: Triton kernels and their pure-torch references.

Depends on torch (and triton, imported lazily) only, never on the rest of rerule.
Importing this package never queries a GPU and never imports triton.
"""

if __name__ == "kernels":
    # This folder ships as ``rerule.kernels``. Imported as top-level ``kernels`` it is an accident of the
    # repository root being on sys.path (pytest's rootdir, ``python -m`` from the checkout), and it would
    # shadow the PyPI package ``kernels`` (Hugging Face's, which transformers >= 5 imports when installed):
    # hand the name over to that package, or fail as a missing package would.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named 'kernels' (the folder {_root}/kernels is rerule's, imported as rerule.kernels)",
            name="kernels",
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
