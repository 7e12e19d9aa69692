"""A search's run directory: its layout (``layout``, the one module that names its files) and
its configuration (``config``: ``run.json``)."""

from autoprune.run.config import RunConfig

__all__ = ["RunConfig"]
