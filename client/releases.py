"""What became of this node's releases, as the server's messages tell it.

Every message carries `settled-round` and `used` (common.protocol.RoundPlan): the hashes of
the releases the server used in this run. At each message the node marks its ledger's
releases of the run "used" or "unused" (`PrivacyLedger.settle`), appends one "release-settled"
line per newly marked release to the audit log, and deletes the kept updates of rounds the
server has settled: until then a lost reply is sent again from the kept file, at no new
privacy cost (client/gate.py `spend` finds the earlier release).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context, Message

from client.gate import TRAIN
from client.ledger import LEDGER_FILE, PrivacyLedger
from client.message_log import append_record, message_log_path
from client.node import Node, release_file

log = logging.getLogger("fedvox.client")


def settle_releases(msg: Message, node: Node, context: Context) -> None:
    """Mark, log and clean up this run's releases the server has decided about."""
    plan = node.plan
    if plan.settled_round < 0 and not plan.used:
        return  # a message from a server that does not say (or nothing to say yet)
    if not (node.state_dir / LEDGER_FILE).exists():
        return
    accountant = node.policy.accountant or node.cfg.accountant
    ledger = PrivacyLedger.open(node.state_dir, accountant)
    with ledger.transaction():
        changed = ledger.settle(plan.run_uid, plan.settled_round, set(plan.used))
        settled = [
            e["round"]
            for e in ledger.entries
            if e["run_uid"] == plan.run_uid and e.get("phase") == TRAIN
            and e["round"] <= plan.settled_round
        ]  # fmt: skip
    for round_ in settled:
        release_file(node.state_dir, plan.run_uid, round_, TRAIN).unlink(missing_ok=True)
    path = message_log_path(context)
    if path is None or not changed:
        return
    for e in changed:
        _audit(path, msg, context, node, e)


def _audit(path: Path, msg: Message, context: Context, node: Node, entry: dict) -> None:
    append_record(
        path,
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_id": msg.metadata.run_id,
            "node_id": context.node_id,
            "action": "release-settled",
            "round": entry["round"],
            "phase": entry.get("phase"),
            "release": entry.get("update_sha256") or None,
            "use": entry.get("use"),
            "site": node.site_name,
            "status": "ok",
            "reason": "",
        },
    )
