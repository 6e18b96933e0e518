"""The product's version, as installed (`pip install`), for `mcpfleet --version` and the built-in servers."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version


def product_version() -> str:
    try:
        return installed_version("mcpfleet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0"
