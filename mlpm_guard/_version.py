"""The installed package's version, read from its metadata (``pyproject.toml`` is the one source).

A module of its own so that the modules which record the version (saved prototypes, the HTTP
app) import it from here, not from the package ``__init__`` that imports them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlpm-guard")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
