"""rerule: a Triton-accelerated training core for reinforcement unlearning (RULE / ReRULE)."""

from rerule.version import __version__

__all__ = ["__version__"]
