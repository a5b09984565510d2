"""Byte progress bars for uploads and pulls, shown only on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable


def byte_bar(enabled: bool, total: int, what: str) -> Callable[[int], object] | None:
    """A tqdm byte counter on a terminal (call it with each piece's size); None otherwise."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=what, leave=False)
    update: Callable[[int], object] = bar.update
    return update
