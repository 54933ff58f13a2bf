"""The one exception of the site reader."""

from __future__ import annotations


class DataError(ValueError):
    """Unusable data or settings; the message names the site, file or setting."""
