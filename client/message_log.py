"""The node's message log: one JSON line per message this hospital node handled.

(Operators know it as the node's audit log, and its file keeps that name, `audit.jsonl`; in
the code it is the message log, so that "audit" means one thing: `fedvox audit`, measuring
privacy.) `message_log_mod` is a Flower client mod (`ClientApp(mods=[message_log_mod])`).
After the app answered a message it appends to `<state-dir>/audit.jsonl`:

    time, run_id, node_id, fab_hash (full, when the node runs behind client/approval.py),
    app (installed FAB folder: publisher.name.version.<first 8 hex of the FAB hash>), round
    (the run's global round, as the ledger and summary.json number it), action (message
    type), status (ok|refused|failed|error), reason, site, num_examples, epsilon_run,
    epsilon_lifetime, delta, message_id, release (the hash the ledger recorded for it)

and client/releases.py adds one "release-settled" line per release once the server's messages
say whether it was used (`use`: used | unused | local).

Why these sources: in Flower 1.42 the ClientApp sees `Context` (run_id, node_id, node_config,
run_config) and `Message.metadata` (run_id, message_type, ...), but not the FAB hash: the FAB
is a local of flwr/supernode/runtime/run_clientapp.py. What the app can see is the folder the
FAB was installed into ($FLWR_HOME/apps/<publisher>.<name>.<version>.<hash[:8]>,
flwr.common.config.get_project_dir). The full hash is logged by the SuperNode-side approval
wrapper (client/approval.py, action "fab-check") before anything runs; this mod copies it
from there when present.

A hostile app can of course leave this mod out — this log documents what fedvox did; the
"fab-check" lines written by the hospital's own SuperNode process are the part that does not
depend on the app's cooperation.

The line is written (and flushed) before the reply leaves the node; if the state dir is not
writable the reply is replaced by an error: no unaudited reply.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

log = logging.getLogger("fedvox.client")

MESSAGE_LOG_FILE = "audit.jsonl"  # the name deployed nodes already append to


def message_log_path(context: Context) -> Path | None:
    """`<state-dir>/audit.jsonl` from the node config; None where no state dir is set."""
    state_dir = context.node_config.get("state-dir")
    return Path(str(state_dir)) / MESSAGE_LOG_FILE if state_dir else None


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line. O_APPEND + a single write keeps concurrent writers' lines whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def installed_app() -> str | None:
    """Name of the installed-FAB folder this ClientApp was loaded from, or None.

    Flower puts the app folder ($FLWR_HOME/apps/<publisher>.<name>.<version>.<hash[:8]>) on
    sys.path before importing the app (flwr/supercore/object_ref.py, `_ensure_sys_path`).
    """
    for entry in sys.path:
        p = Path(entry)
        if p.parent.name == "apps" and p.name.count(".") >= 3:
            return p.name
    return None


def _fab_hash_for_run(path: Path, run_id: int) -> str | None:
    # The approval wrapper writes one "fab-check" line per fetched FAB; newest wins.
    found = None
    for rec in read_records(path):
        if rec.get("action") == "fab-check" and rec.get("run_id") == run_id:
            found = rec.get("fab_hash")
    return found


def _num(record: Any, key: str) -> float | int | None:
    if record is None or key not in record:
        return None
    return record[key]


def message_log_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the app, then log what it did with this message (see the module docstring)."""
    path = message_log_path(context)
    if path is None:
        return call_next(msg, context)  # simulation without a state dir: nothing to audit into
    try:
        reply = call_next(msg, context)
    except Exception as exc:
        # Flower turns the exception into an error reply after the mods; log it here first.
        _append(path, _record(msg, context, None, f"{type(exc).__name__}: {exc}"))
        raise
    _append(path, _record(msg, context, reply))
    return reply


def _append(path: Path, record: dict[str, Any]) -> None:
    try:
        record["fab_hash"] = _fab_hash_for_run(path, record["run_id"])
        append_record(path, record)
    except (OSError, ValueError) as err:
        # Raising makes Flower send an error reply instead of an unaudited one. Flower puts
        # the exception's text in that reply, so the path stays in the node's own log.
        log.error("audit log %s could not be written: %s", path, err)
        raise RuntimeError("the node's audit log could not be written (see its log)") from None


def _global_round(config: Any) -> int | None:
    """The run's round number, as the ledger and summary.json count it: a resumed run's
    server-round restarts at 1, its round-offset says how many rounds came before."""
    if config is None or config.get("server-round") is None:
        return None
    return int(config.get("server-round")) + int(config.get("round-offset", 0) or 0)


def _record(
    msg: Message, context: Context, reply: Message | None, exception: str = ""
) -> dict[str, Any]:
    config = msg.content.config_records.get("config") if msg.has_content() else None
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": msg.metadata.run_id,
        "node_id": context.node_id,
        "message_id": msg.metadata.message_id,
        "action": msg.metadata.message_type,
        "round": _global_round(config),
        "app": installed_app(),
        "fab_hash": None,
        "status": None,
        "reason": "",
        "site": context.node_config.get("site-name"),
        "num_examples": None,
        "epsilon_run": None,
        "epsilon_lifetime": None,
        "delta": None,
    }
    if reply is None:
        record["status"], record["reason"] = "error", exception
    elif reply.has_error():
        record["status"] = "error"
        record["reason"] = reply.error.reason
    else:
        metrics = reply.content.metric_records.get("metrics")
        node = reply.content.config_records.get("node")
        record["num_examples"] = _num(metrics, "num-examples")
        record["epsilon_run"] = _num(metrics, "epsilon-run")
        record["epsilon_lifetime"] = _num(metrics, "epsilon-lifetime")
        record["delta"] = _num(metrics, "delta")
        if node is not None:
            record["status"] = node.get("status")
            record["reason"] = node.get("reason", "")
            record["site"] = node.get("site", record["site"])
            record["release"] = node.get("release") or None
        else:
            record["status"] = "ok"
    return record
