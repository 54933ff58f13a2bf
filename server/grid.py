"""A Grid whose `send_and_receive` notices replies within a fraction of a second.

Flower 1.42's `HttpGrid.send_and_receive` (flwr/superlink/grid/http_grid.py) sleeps a fixed
3 s between polls for replies, twice per round (train, then evaluate). With rounds of 10-30 s
of hospital compute that alone was most of the federation overhead (docs/benchmarks.md,
"Figures behind code comments"). Strategies only call
`grid.send_and_receive` and `grid.get_node_ids`, so we hand them this thin wrapper: the same
public `push_messages` / `pull_messages` calls, polled with a short back-off (50 ms growing to
250 ms: hospitals trained in parallel end a demo round in ~3 s, and a last reply waited on
for up to 1 s cost up to a third of it) instead of 3 s. Everything else is the wrapped
grid's, untouched.

Two more things a real federation needs (docs/reliability.md):

- a hospital whose SuperNode died mid-round never replies: the message it had pulled died
  with it. Once the SuperLink counts the node offline (no heartbeat for two intervals, ~60 s)
  or sees it activated again (a restarted node, client/supernode.py, rejoins at once), the
  round stops waiting for that reply and goes on with the others instead of waiting for the
  round timeout; the hospital takes part again from the next round;
- fewer than `min_nodes` hospitals online: Flower's strategies wait for them forever; here
  `get_node_ids` raises `NotEnoughHospitals` after `connect_timeout_s`.

And one for Flower's Simulation Engine (`wait_for_simulation_runtime`): its ServerApp thread
starts while the process's main thread is still inside `ray.init()`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

ONLINE_CHECK_S = 5.0  # how often a waiting round asks the SuperLink which nodes are online
RAY_START_LIMIT_S = 180.0  # the longest the server waits for the simulation's Ray to start


def wait_for_simulation_runtime(grid: Grid, limit_s: float = RAY_START_LIMIT_S) -> bool:
    """In Flower's Simulation Engine, do nothing until its Ray runtime has started.

    Why: `flwr-simulation` starts the ServerApp in a thread, then calls `ray.init()` in its
    main thread, which launches Ray's processes with `subprocess.Popen(preexec_fn=...)`: a
    full fork that runs Python in the child before exec, which Python documents as unsafe
    while other threads run. Two full CI runs hung exactly there (the ServerApp had scored round
    0; Ray's session folder existed but its GCS was only launched ~600 s later, when the test
    killed the process tree; no ClientApp ever ran). Keeping the server's own work (loading the
    holdout, torch kernels, imports, file IO) out of that window costs the few seconds Ray
    takes to start, which the run waits for anyway before round 1.

    Returns True once Ray is up, False (with a warning) after `limit_s`, and at once (True)
    for any other grid: a deployment's SuperLink has no Ray in this process.
    """
    from flwr.superlink.grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid):
        return True
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        # Ray is imported by the simulation's backend (not by fedvox), maybe still mid-import.
        is_initialized = getattr(sys.modules.get("ray"), "is_initialized", None)
        if is_initialized is not None and is_initialized():
            log(INFO, "fedvox: simulation runtime up after %.1f s", time.monotonic() - t0)
            return True
        time.sleep(0.1)
    log(
        WARNING,
        "fedvox: Flower's simulation runtime (Ray) has not started within %.0f s; going on "
        "without waiting (if no hospital ever replies, stop the run and start it again)",
        limit_s,
    )
    return False


class NotEnoughHospitals(RuntimeError):
    """Fewer hospitals than min-nodes stayed connected for the whole connect timeout."""


class ResponsiveGrid(Grid):
    """Delegate to `inner`; poll for replies with a back-off from `first_poll_s` to `max_poll_s`."""

    def __init__(
        self,
        inner: Grid,
        first_poll_s: float = 0.05,
        max_poll_s: float = 0.25,
        min_nodes: int = 0,
        connect_timeout_s: float = 3600.0,
    ) -> None:
        if not 0 < first_poll_s <= max_poll_s:
            raise ValueError(
                f"need 0 < first_poll_s <= max_poll_s, got {first_poll_s}, {max_poll_s}"
            )
        self.inner = inner
        self.first_poll_s = first_poll_s
        self.max_poll_s = max_poll_s
        self.min_nodes = min_nodes
        self.connect_timeout_s = connect_timeout_s
        self._short_since: float | None = None  # when fewer than min_nodes were online

    # --- the wrapped grid, unchanged -------------------------------------------------------
    def set_run(self, run: Run) -> None:  # noqa: D102
        self.inner.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: D102  (deprecated upstream)
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """The online nodes; NotEnoughHospitals once fewer than min_nodes stayed online for
        `connect_timeout_s` (Flower's strategies would wait for them forever)."""
        ids = list(self.inner.get_node_ids())
        if len(ids) >= self.min_nodes:
            self._short_since = None
            return ids
        now = time.monotonic()
        self._short_since = self._short_since or now
        if now - self._short_since > self.connect_timeout_s:
            raise NotEnoughHospitals(
                f"only {len(ids)} hospital(s) connected, min-nodes={self.min_nodes}, for "
                f"{self.connect_timeout_s:g} s (round-timeout)"
            )
        return ids

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
        messages = list(messages)
        ids = list(self.inner.push_messages(messages))
        pending = set(ids)
        watch = OfflineWatch(
            self, {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=True)}
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.first_poll_s
        while pending:
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            pending.difference_update(watch.gone(pending))
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


class OfflineWatch:
    """Which pending messages went down with their node (offline, or activated again)."""

    def __init__(self, grid: ResponsiveGrid, destinations: dict[str, int]) -> None:
        self.grid = grid
        self.destinations = destinations  # message id -> destination node id
        self.sessions = node_sessions(grid.inner)  # node id -> when it was last activated
        self.last_check = time.monotonic()

    def gone(self, pending: set[str]) -> set[str]:
        now = time.monotonic()
        if now - self.last_check < ONLINE_CHECK_S:
            return set()
        self.last_check = now
        online = set(self.grid.inner.get_node_ids())
        sessions = node_sessions(self.grid.inner)
        lost = set()
        for m in pending:
            node = self.destinations.get(m)
            before, after = self.sessions.get(node), sessions.get(node)
            if node not in online or (before and after and before != after):
                lost.add(m)
                log(WARNING, "node %s went offline or restarted; its reply is not waited for", node)
        return lost


def node_sessions(grid: Grid) -> dict[int, str]:
    """{node id: last activation time} of the federation's nodes, as the SuperLink says."""
    try:
        return {int(n.node_id): str(n.last_activated_at) for n in grid.get_nodes()}
    except Exception:  # noqa: BLE001 - a grid without NodeInfo: online/offline only
        return {}


def node_names(grid: Grid) -> dict[int, str]:
    """{node id: the name it was registered with (flwr supernode register --name)}."""
    try:
        return {int(n.node_id): str(n.name) for n in grid.get_nodes() if n.name}
    except Exception:  # noqa: BLE001
        return {}
