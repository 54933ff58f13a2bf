"""Node-side run approval: a SuperNode that only executes allowlisted apps (FAB hashes).

Where the check sits, and why there (Flower 1.42 source):

- Every run's code reaches a node as a FAB fetched by the SuperNode process itself:
  flwr/supernode/start_client_internal.py `_pull_and_store_message` calls `get_fab(...)` for
  the first message of an unknown run, then runs Flower's FAB verification (`_verify_fab`,
  ed25519 signatures of sha256(FAB) by the entities in `--trusted-entities`) and only then
  stores the FAB and creates the task that SuperExec turns into a `flwr-clientapp` process.
  On a failed verification Flower itself answers the message with an error reply
  ("The FAB could not be verified.") and no task is ever created: nothing of the app runs.
- That verification only trusts signatures made through Flower's hub. A hospital cannot
  sign FABs itself, so this module makes the SuperNode process its own trusted entity:
  the node (`python -m client.supernode --approved-fabs FILE -- ...`, client/supernode.py)
  starts Flower's unmodified `flower-supernode` entry point in-process with an ephemeral
  ed25519 key as the only trusted entity, and wraps the connection's `get_fab` so that a FAB
  is signed with that key only when sha256(FAB bytes) — computed here, not the hash the
  SuperLink claims — is on the hospital's allowlist. Flower's own `_verify_fab` then accepts
  or refuses it.
- The check runs in the process the hospital starts, before the FAB is stored or installed;
  a run's app cannot skip it because none of its code is loaded yet. The one Flower symbol
  this relies on is `flwr.supernode.start_client_internal.http_request_response` (the Fleet
  connection factory); if its shape changes the wrapper refuses to start (fail closed).

Every FAB check is one "fab-check" JSON line in <state-dir>/audit.jsonl (run id, full FAB
hash, approved or refused and why), written before the message is answered.

The allowlist: one sha256 hex per line (`#` comments allowed). The hash of an app folder is
what `flwr build`/`flwr run` compute (the FAB zip is built with fixed timestamps, so the same
files give the same hash): `python -m client.approval hash <app-dir>`. It is read when the
node starts (a bad file stops it there) and again at every FAB check, so a newly approved
hash needs no restart.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from client.message_log import MESSAGE_LOG_FILE, append_record

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
ENTITY_ID = "fedvox-local-allowlist"


class ApprovalError(Exception):
    """Bad allowlist or wrapper arguments; the message names the file or setting."""


def load_allowlist(path: Path) -> set[str]:
    """Approved FAB sha256 hashes from `path` (one per line, `#` comments, blank lines ok)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ApprovalError(f"--approved-fabs {path}: cannot read ({err.strerror})") from None
    hashes = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if not _HEX64.match(line):
            raise ApprovalError(f"{path}:{n}: {raw.strip()!r} is not a sha256 hex digest")
        hashes.add(line)
    return hashes


def fab_hash_of_app(app_dir: Path) -> str:
    """The FAB hash `flwr run <app_dir>` will submit (Flower's own FAB builder)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def fab_verdict(content: bytes, claimed_hash: str, allowlist: set[str]) -> tuple[bool, str, str]:
    """(approved, actual sha256, reason). The claimed hash must match the bytes, too: Flower
    installs by the real hash but loads the app folder by the claimed one."""
    actual = hashlib.sha256(content).hexdigest()
    if actual != claimed_hash:
        return False, actual, f"FAB bytes hash {actual} != claimed {claimed_hash}"
    if actual not in allowlist:
        return False, actual, "FAB hash not on this node's allowlist"
    return True, actual, ""


def install_guard(allowlist_file: Path, audit_file: Path) -> dict[str, str]:
    """Patch the SuperNode's Fleet connection so `get_fab` signs only allowlisted FABs.

    The allowlist is read again at every FAB check (once per new run at this node), so a
    hash the hospital adds counts from the next run on, without a restart; a file that has
    become unreadable or malformed refuses the run (fail closed) and says why in the audit
    log. Returns the `--trusted-entities` mapping ({id: 'ssh-ed25519 ...'}) to start the SuperNode
    with. Must be called in the SuperNode process before `flower_supernode()`.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from flwr.supercore.fab import Fab
    from flwr.supernode import start_client_internal as sci

    original = getattr(sci, "http_request_response", None)
    if original is None or not hasattr(sci, "_verify_fab"):
        raise ApprovalError(
            "this Flower version has no flwr.supernode.start_client_internal."
            "http_request_response/_verify_fab; refusing to start without the approval check"
        )
    key = ed25519.Ed25519PrivateKey.generate()  # lives only in this process's memory
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )

    def guarded_get_fab(get_fab):  # noqa: ANN001, ANN202 - Flower's callable
        def get_fab_checked(fab_hash: str, run_id: int) -> Fab:
            fab = get_fab(fab_hash, run_id)
            try:
                allowlist = load_allowlist(allowlist_file)
            except ApprovalError as err:
                allowlist, problem = set(), str(err)
            else:
                problem = ""
            ok, actual, reason = fab_verdict(fab.content, fab.hash_str, allowlist)
            reason = problem or reason
            _log_fab_check(audit_file, run_id, actual, fab.hash_str, ok, reason)
            # Whatever the SuperLink sent as verifications is dropped: only this node decides.
            return Fab(fab.hash_str, fab.content, _verifications(key, fab.content, ok))

        return get_fab_checked

    @contextlib.contextmanager
    def connection_with_check(*args, **kwargs) -> Iterator[tuple]:  # noqa: ANN002, ANN003
        with original(*args, **kwargs) as conn:
            conn = tuple(conn)
            # (node_id, receive, send, get_run, get_fab, pull_object, push_object, confirm)
            if len(conn) != 8 or getattr(conn[4], "__name__", "") != "get_fab":
                raise ApprovalError("unexpected Flower Fleet connection shape; refusing to run")
            yield conn[:4] + (guarded_get_fab(conn[4]),) + conn[5:]

    sci.http_request_response = connection_with_check
    return {ENTITY_ID: public}


def _log_fab_check(
    audit_file: Path, run_id: int, actual: str, claimed: str, ok: bool, reason: str
) -> None:
    append_record(
        audit_file,
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "action": "fab-check",
            "run_id": run_id,
            "fab_hash": actual,
            "claimed_hash": claimed,
            "status": "approved" if ok else "refused",
            "reason": reason,
        },
    )


def _verifications(key, content: bytes, ok: bool) -> dict[str, str]:  # noqa: ANN001
    """What Flower's `_verify_fab` checks: our signature of sha256(FAB), only when approved."""
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    # "valid_license" must be present or Flower refuses every FAB before looking at
    # signatures ("verification not supported by the connected SuperLink").
    verifications = {"valid_license": "fedvox-local-allowlist"}
    if ok:
        signed_at = int(time.time())
        sig = key.sign(create_message_to_sign(hashlib.sha256(content).digest(), signed_at))
        signature = base64.urlsafe_b64encode(sig).decode().rstrip("=")
        verifications[ENTITY_ID] = json.dumps({"signature": signature, "signed_at": signed_at})
    return verifications


def _state_dir_from_node_config(node_config: str | None) -> Path:
    from flwr.common.config import parse_config_args

    cfg = parse_config_args([node_config]) if node_config else {}
    if not cfg.get("state-dir"):
        raise ApprovalError("--node-config must set state-dir (the audit log lives there)")
    return Path(str(cfg["state-dir"]))


def check_arguments(approved_fabs: Path | str, supernode_args: list[str]) -> set[str]:
    """The allowlist, if the SuperNode arguments are safe to run behind it (else ApprovalError)."""
    if any(a.startswith("--trusted-entities") for a in supernode_args):
        raise ApprovalError(
            "--trusted-entities: not combinable with --approved-fabs "
            "(a hub-signed app would bypass the allowlist)"
        )
    if "--allow-runtime-dependency-installation" in supernode_args:
        raise ApprovalError(
            "--allow-runtime-dependency-installation: a hospital node must "
            "not install what a run asks for; install dependencies yourself"
        )
    allowlist = load_allowlist(Path(approved_fabs))
    _state_dir_from_node_config(_node_config_arg(supernode_args))
    return allowlist


def _node_config_arg(supernode_args: list[str]) -> str | None:
    node_config = None
    for i, a in enumerate(supernode_args):
        if a == "--node-config" and i + 1 < len(supernode_args):
            node_config = supernode_args[i + 1]
        elif a.startswith("--node-config="):
            node_config = a.split("=", 1)[1]
    return node_config


def guard_arguments(approved_fabs: Path | str, supernode_args: list[str]) -> list[str]:
    """Install the allowlist guard in this process and return the `--trusted-entities`
    arguments to add (client/supernode.py starts the node)."""
    check_arguments(approved_fabs, supernode_args)  # a bad allowlist fails at start, too
    audit_file = _state_dir_from_node_config(_node_config_arg(supernode_args)) / MESSAGE_LOG_FILE
    entities = install_guard(Path(approved_fabs).absolute(), audit_file)

    tmp = tempfile.mkdtemp(prefix="fedvox-approval-")
    yaml_path = Path(tmp) / "trusted-entities.yaml"
    yaml_path.write_text(json.dumps(entities))  # JSON is YAML
    atexit.register(lambda: (yaml_path.unlink(missing_ok=True), os.rmdir(tmp)))
    return ["--trusted-entities", str(yaml_path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.approval", description="fedvox node-side run approval"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hash", help="print the FAB hash `flwr run <app-dir>` would submit")
    p.add_argument("app_dir", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["supernode"]:
        # The node has one entry point (client/supernode.py); an old unit that still starts
        # it here is told where it moved instead of getting an argparse "invalid choice".
        print(f"fedvox approval: error: {MOVED}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    print(fab_hash_of_app(args.app_dir))
    return 0


MOVED = (
    "the node is started with `python -m client.supernode --approved-fabs FILE -- "
    "<flower-supernode arguments>` (docs/deployment.md); `client.approval supernode` is gone"
)


if __name__ == "__main__":
    sys.exit(main())
