"""Shared wording of error messages."""
from __future__ import annotations


def listed(items: list[str], limit: int = 12) -> str:
    """The first ``limit`` items, comma-separated, and how many there are in all when some are left out."""
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")
