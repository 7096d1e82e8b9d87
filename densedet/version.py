"""DenseDet's version (one place; ``densedet.__version__`` and checkpoints' ``meta.densedet_version`` read it)."""

__version__ = "0.1.0"
