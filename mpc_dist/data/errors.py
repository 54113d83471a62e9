"""The data path's one error type."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset cannot be loaded; the one-line message names the config field and the fix."""
