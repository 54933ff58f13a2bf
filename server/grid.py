"""A Grid whose `send_and_receive` notices replies within a fraction of a second.

Flower 1.42's `HttpGrid.send_and_receive` (flwr/superlink/grid/http_grid.py) sleeps a fixed
3 s between polls for replies, twice per round (train, then evaluate). With rounds of 10-30 s
of hospital compute that alone was ~1.2x federation overhead (issue 5). Strategies only call
`grid.send_and_receive` and `grid.get_node_ids`, so we hand them this thin wrapper: the same
public `push_messages` / `pull_messages` calls, polled with a short back-off (50 ms growing to
1 s) instead of 3 s. Everything else is the wrapped grid's, untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class ResponsiveGrid(Grid):
    """Delegate to `inner`; poll for replies with a back-off from `first_poll_s` to `max_poll_s`."""

    def __init__(self, inner: Grid, first_poll_s: float = 0.05, max_poll_s: float = 1.0) -> None:
        if not 0 < first_poll_s <= max_poll_s:
            raise ValueError(
                f"need 0 < first_poll_s <= max_poll_s, got {first_poll_s}, {max_poll_s}"
            )
        self.inner = inner
        self.first_poll_s = first_poll_s
        self.max_poll_s = max_poll_s

    # --- the wrapped grid, unchanged -------------------------------------------------------
    def set_run(self, run: Run) -> None:  # noqa: D102
        self.inner.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: D102  (deprecated upstream)
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def get_nodes(self):  # noqa: D102, ANN201  (NodeInfo; newer than some flwr builds)
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    # --- the one change ------------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push `messages`, then pull replies until all arrived or `timeout` seconds passed."""
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.first_poll_s
        while pending:
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break  # like Flower: return what arrived; the strategy counts the missing
            # Back off while nothing comes (a long round costs a few polls per second at most);
            # start fast again after each reply, since the next one is often close behind.
            wait = self.first_poll_s if got else min(wait * 2, self.max_poll_s)
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            time.sleep(wait)
        return replies
