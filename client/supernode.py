"""fedvox's hospital node: Flower's own `flower-supernode`, made to survive a busy SuperLink.

    python -m client.supernode [--approved-fabs FILE] [--cold] -- <flower-supernode arguments>

This is the one way to start a hospital node (deploy/hospital/fedvox-supernode.service runs
it; docs/deployment.md documents it). fedvox's own options go BEFORE `--`, Flower's after it.

It starts Flower's unmodified `flower-supernode` entry point in this process, with the Fleet
connection (`flwr.supernode.start_client_internal.http_request_response`, the one Flower
internal it relies on; it refuses to start if that is missing) wrapped so that:

1. **a reply is never dropped**: Flower 1.42 pushes a reply once and deletes it when the push
   fails (`_push_messages`: an HTTP 500 from a SuperLink whose SQLite store was busy lost the
   update for good). Here a failed push is retried with back-off for up to `PUSH_PATIENCE_S`.
   A retry pushes the very same message (its id is the hash of its content), so it cannot
   be counted twice;
2. **a restarted node rejoins by itself**: the SuperLink counts a node online until two
   heartbeat intervals (60 s) pass without one, and refuses to activate it again before
   that (Flower exits with code 305). Here the node remembers its node id in its state dir
   (`supernode.json`); restarted, it ends its dead predecessor's session itself
   (DeactivateNode, signed with the hospital's key: the SuperLink accepts it only for the
   node that key belongs to) and activates again at once. Without a remembered id the
   activation is retried with back-off past the window. The SuperLink answers an
   unregistered key with the same refusal, so such a node gives up only after
   `REJOIN_PATIENCE_S`. (One SuperNode per key: a second one started with the same key would
   end the first one's session.)
3. **a message is noticed within a second**: Flower sleeps 3 s after an empty poll; here
   the poll is repeated every `POLL_S` while the node waits;
4. **no interpreter start per message** (unless `--cold`): Flower's isolation "process" mode
   with fedvox's SuperExec (client/warm_exec.py), which forks each ClientApp from a process
   that has already imported torch, Opacus and MONAI — each message still gets a process of
   its own, as with Flower's default, without 8-10 s of imports.

`--approved-fabs FILE` adds the run approval of client/approval.py (only allowlisted apps run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("fedvox.supernode")

PUSH_PATIENCE_S = 900.0  # a reply is retried this long before it is given up
REJOIN_PATIENCE_S = 300.0  # > 2 heartbeat intervals (60 s) + the SuperLink's own slack
POLL_S = 1.0  # how often an idle node asks the SuperLink for a message
LONG_POLL_S = 30.0  # one `receive` call polls this long before it returns "nothing"


class SuperNodeError(Exception):
    """Bad wrapper arguments, or a Flower version this wrapper cannot guard."""


class _StillOnline(Exception):
    """The SuperLink still counts this node online (its previous process died recently)."""


def _retry(what: str, fn: Callable[[], Any], patience: float, giveup: tuple = ()) -> Any:
    """fn() until it succeeds, with back-off from 1 s to 30 s, for up to `patience` s."""
    deadline, wait = time.monotonic() + patience, 1.0
    while True:
        try:
            return fn()
        except giveup:
            raise
        except Exception as exc:  # noqa: BLE001 - what Flower itself would drop
            if time.monotonic() + wait > deadline:
                raise
            log.warning("fedvox node: %s failed (%s); again in %.0f s", what, exc, wait)
            time.sleep(wait)
            wait = min(wait * 2, 30.0)


def install_resilience(state_dir: Path | None = None) -> None:
    """Wrap Flower's Fleet connection as the module docstring says (points 1-3); the node's
    id is remembered in `state_dir` (if given) so that a restarted node can rejoin at once."""
    from flwr.supernode import fleet_http_connection as fhc
    from flwr.supernode import start_client_internal as sci

    original = getattr(sci, "http_request_response", None)
    if original is None or not hasattr(fhc, "flwr_exit"):
        raise SuperNodeError(
            "this Flower version has no flwr.supernode.start_client_internal."
            "http_request_response; fedvox's node wrapper needs flwr==1.42.0"
        )
    real_exit = fhc.flwr_exit

    def exit_unless_still_online(code: int, message: str | None = None, *a, **k) -> None:
        if message and "Failed to activate SuperNode" in message:
            raise _StillOnline(message)
        real_exit(code, message, *a, **k)

    fhc.flwr_exit = exit_unless_still_online

    @contextlib.contextmanager
    def resilient(*args: Any, **kwargs: Any) -> Iterator[tuple]:
        deadline, wait, ended = time.monotonic() + REJOIN_PATIENCE_S, 5.0, False
        while True:
            try:
                cm = original(*args, **kwargs)
                conn = tuple(cm.__enter__())
                _remember_node(state_dir, conn[0])
                break
            except _StillOnline as exc:
                if not ended:  # our own dead predecessor's session: end it, then at once
                    ended = _end_stale_session(_recall_node(state_dir), *args, **kwargs)
                    if ended:
                        continue
                if time.monotonic() + wait > deadline:
                    real_exit(305, f"{exc} (still after {REJOIN_PATIENCE_S:g} s)")
                log.warning("fedvox node: the SuperLink still counts this node online; "
                            "rejoining in %.0f s", wait)  # fmt: skip
                time.sleep(wait)
                wait = min(wait * 1.5, 30.0)
        try:
            yield _wrap(conn)
        except BaseException:
            if not cm.__exit__(*sys.exc_info()):
                raise
        else:
            cm.__exit__(None, None, None)

    sci.http_request_response = resilient


NODE_FILE = "supernode.json"  # in the state dir: {"node_id": ...} of the last session


def _remember_node(state_dir: Path | None, node_id: int) -> None:
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / NODE_FILE).write_text(json.dumps({"node_id": int(node_id)}))


def _recall_node(state_dir: Path | None) -> int | None:
    try:
        return int(json.loads((state_dir / NODE_FILE).read_text())["node_id"])
    except (TypeError, OSError, ValueError, KeyError):
        return None


def _end_stale_session(
    node_id: int | None,
    server_address: str,
    insecure: bool,
    root_certificates: bytes | str | None = None,
    authentication_keys: tuple | None = None,
    *_: Any,
    **__: Any,
) -> bool:
    """DeactivateNode for the node id the SuperLink named, signed with this node's key."""
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    if node_id is None or authentication_keys is None:
        return False
    interceptors = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(*authentication_keys),
    ]
    try:
        with FleetHttpClient.from_server_address(
            server_address, insecure, root_certificates, interceptors=interceptors
        ) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except Exception as exc:  # noqa: BLE001 - then wait for the SuperLink to time it out
        log.warning("fedvox node: could not end the previous session (%s)", exc)
        return False
    log.warning("fedvox node: ended this node's previous session (node %s); rejoining", node_id)
    return True


def _wrap(conn: tuple) -> tuple:
    """(node_id, receive, send, get_run, get_fab, pull_object, push_object, confirm) with
    `receive` polling, `send` and `push_object` retried; the others untouched."""
    from flwr.supercore.run import RunNotRunningException

    if len(conn) != 8 or getattr(conn[4], "__name__", "") != "get_fab":
        raise SuperNodeError("unexpected Flower Fleet connection shape; refusing to run")
    node_id, receive, send, get_run, get_fab, pull_object, push_object, confirm = conn
    stop = (RunNotRunningException,)

    def receive_polling() -> Any:
        deadline = time.monotonic() + LONG_POLL_S
        while (got := receive()) is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return got

    def send_retried(message: Any, tree: Any, runtime: float) -> Any:
        return _retry(
            "pushing a reply", lambda: send(message, tree, runtime), PUSH_PATIENCE_S, stop
        )

    def push_retried(run_id: int, session: str, object_id: str, content: bytes) -> None:
        _retry(
            "pushing a reply's content",
            lambda: push_object(run_id, session, object_id, content),
            PUSH_PATIENCE_S,
            stop,
        )

    return (node_id, receive_polling, send_retried, get_run, get_fab, pull_object,
            push_retried, confirm)  # fmt: skip


def _runtime_address(args: list[str]) -> str:
    """The SuperNode's local Runtime API (`--host`/`--port`, default 127.0.0.1:9094)."""
    values = {"--host": "127.0.0.1", "--port": "9094"}
    for i, a in enumerate(args):
        for key in values:
            if a == key and i + 1 < len(args):
                values[key] = args[i + 1]
            elif a.startswith(key + "="):
                values[key] = a.split("=", 1)[1]
    return f"{values['--host']}:{values['--port']}"


def _state_dir(supernode_args: list[str]) -> Path | None:
    """The node config's state-dir (where the node remembers its id), if it has one."""
    from flwr.common.config import parse_config_args

    for i, a in enumerate(supernode_args):
        value = None
        if a == "--node-config" and i + 1 < len(supernode_args):
            value = supernode_args[i + 1]
        elif a.startswith("--node-config="):
            value = a.split("=", 1)[1]
        if value:
            try:
                state = parse_config_args([value]).get("state-dir")
            except Exception:  # noqa: BLE001 - Flower reports a bad node config itself
                return None
            return Path(str(state)) if state else None
    return None


def start_warm_superexec(supernode_args: list[str]) -> subprocess.Popen:
    """fedvox's SuperExec for Flower's isolation "process" mode (client/warm_exec.py)."""
    address = _runtime_address(supernode_args)
    argv = [sys.executable, "-m", "client.warm_exec", "--runtime-api-address", address,
            "--insecure", "--parent-pid", str(os.getpid())]  # fmt: skip
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


WRAPPER_OPTIONS = ("--cold", "--approved-fabs")  # fedvox's, before `--`; Flower's come after


def run(supernode_args: list[str], approved_fabs: str | None, warm: bool) -> None:
    """Flower's `flower-supernode` with `supernode_args`, made resilient (and guarded)."""
    for a in supernode_args:
        if a.split("=", 1)[0] in WRAPPER_OPTIONS:
            raise SuperNodeError(
                f"{a.split('=', 1)[0]} is fedvox's option, not Flower's: put it before `--` "
                "(python -m client.supernode [--approved-fabs FILE] [--cold] -- <flower args>)"
            )
    if any(a == "--isolation" or a.startswith("--isolation=") for a in supernode_args) and warm:
        raise SuperNodeError("--isolation is set by this wrapper; add --cold to choose your own")
    if approved_fabs is not None:  # bad arguments fail before anything is patched
        from client.approval import check_arguments

        check_arguments(approved_fabs, supernode_args)
    install_resilience(_state_dir(supernode_args))  # first: the approval guard wraps it
    extra: list[str] = []
    if approved_fabs is not None:
        from client.approval import guard_arguments

        extra += guard_arguments(approved_fabs, supernode_args)
    # A ClientApp's SuperExec polls for tasks every second by default; set before the warm
    # one starts, or it inherits the default.
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    if warm:
        extra += ["--isolation", "process"]
        start_warm_superexec(supernode_args)  # ends itself when this process ends
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *supernode_args, *extra]
    flower_supernode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.supernode", description="fedvox hospital node (Flower SuperNode)"
    )
    parser.add_argument("--approved-fabs", metavar="FILE", help="run only these FAB hashes")
    parser.add_argument(
        "--cold", action="store_true", help="Flower's default: a fresh ClientApp per message"
    )
    parser.add_argument("supernode_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
    from client.approval import ApprovalError

    try:
        run(rest, args.approved_fabs, warm=not args.cold)
    except SuperNodeError as err:
        print(f"fedvox supernode: error: {err}", file=sys.stderr)
        return 2
    except ApprovalError as err:  # a bad allowlist or flags that would bypass it
        print(f"fedvox approval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
