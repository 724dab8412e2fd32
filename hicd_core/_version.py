"""The release of hicd: the package, its checkpoints (``hicd_version``) and ``setup.py`` read it from here."""

__version__ = "0.2.0"
