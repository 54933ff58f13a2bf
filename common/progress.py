"""Progress bars a person can follow, and silence everywhere else.

Long loops (decoding a site, writing hospital folders, benchmarks, predict) wrap their iterable
in `track(items, "what")`. It shows a rich progress bar only when all of these hold:
  * a command line turned display on (`enabled()`, set by `fedvox` for its subcommand),
  * stderr is a terminal (CI logs, pipes and Flower's log stream stay clean),
  * the loop has run longer than `DELAY_S` (short work shows nothing, no flicker).
Otherwise `track` is a plain pass-through, so library code (server, nodes, tests) that shares
these loops never prints a bar.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
DELAY_S = 2.0  # "work longer than a few seconds"
_ENABLED = False


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Let `track` show bars inside this block (when stderr is a terminal)."""
    global _ENABLED
    before, _ENABLED = _ENABLED, on
    try:
        yield
    finally:
        _ENABLED = before


def showing() -> bool:
    return _ENABLED and sys.stderr.isatty()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`; with display on and a terminal, a bar appears after DELAY_S seconds."""
    if not showing():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,  # the bar goes away; the command's own result lines stay
        console=Console(stderr=True),  # stdout stays the command's output (pipes, CSV, tables)
    )
    task = bar.add_task(description, total=total)
    started, shown = time.monotonic(), False
    try:
        for item in items:
            yield item
            bar.advance(task)
            if not shown and time.monotonic() - started > DELAY_S:
                bar.start()
                shown = True
    finally:
        if shown:
            bar.stop()
