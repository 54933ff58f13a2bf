"""What `fedvox import dicom` keeps in the node's state dir: the salt and the case mapping.

Case ids must not identify a patient, yet the same study must get the same id at every import
(idempotence) and the hospital must be able to go back from a case id to its study. So a case
id is HMAC-SHA256(salt, StudyInstanceUID), 16 hex digits, with a random 32-byte salt created
once per node in `<state-dir>/import/salt` (mode 0600). Without the salt nobody can recompute a
case id from a study UID; with it the hospital can. The mapping case id <-> accession / study
UID is `<state-dir>/import/cases.csv` (0600): for the hospital's own use only, never in the
site folder, the report or a Flower message.

The state dir is the node's (the SuperNode's `state-dir` node config in deployment, e.g.
/var/lib/fedvox; default here `$FEDVOX_HOME/node-state`, i.e. ~/.fedvox/node-state). Keep it
with the privacy ledger: losing the salt changes every case id of a re-import.
"""

from __future__ import annotations

import csv
import hmac
import io
import os
import secrets
import stat
from pathlib import Path

from client.importers.site import ImportInputError
from common.files import atomic_write_text, fsync_dir
from common.paths import fedvox_home

SUBDIR = "import"
SALT_FILE = "salt"
MAPPING_FILE = "cases.csv"
MAPPING_COLUMNS = ("site", "case", "accession", "study_uid", "status")
CASE_ID_HEX = 16  # 64 bits: collisions are negligible for any hospital's number of studies


def default_state_dir() -> Path:
    return fedvox_home() / "node-state"


def check_state_dir(state_dir: Path, site: Path) -> Path:
    """The state dir, absolute; never the site folder or inside it (the site may be copied or
    read by others; the salt and the mapping must stay private)."""
    state_dir = Path(state_dir).expanduser().resolve()
    site = Path(site).expanduser().resolve()
    if state_dir == site or site in state_dir.parents:
        raise ImportInputError(
            f"--state-dir {state_dir} is inside the site folder {site}; the salt and the case "
            "mapping must stay out of the site (use the node's state dir, e.g. /var/lib/fedvox)"
        )
    return state_dir


def _private_dir(state_dir: Path) -> Path:
    folder = state_dir / SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def load_salt(state_dir: Path) -> bytes:
    """The node's import salt, created (0600, 32 random bytes) on first use."""
    path = _private_dir(state_dir) / SALT_FILE
    if not path.exists():
        tmp = path.with_name(f".{SALT_FILE}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic create-if-absent: two first imports agree on one salt
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        fsync_dir(path.parent)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ImportInputError(
            f"{path} is readable by other users (mode {mode:o}); with it case ids can be "
            f"traced back to studies: chmod 600 {path}"
        )
    text = path.read_text().strip()
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if len(salt) < 16:
        raise ImportInputError(f"{path} is not a fedvox import salt (expected 64 hex digits)")
    return salt


def case_id(salt: bytes, study_uid: str) -> str:
    return hmac.new(salt, study_uid.strip().encode(), "sha256").hexdigest()[:CASE_ID_HEX]


def update_mapping(state_dir: Path, rows: list[dict[str, str]]) -> Path:
    """Merge rows (MAPPING_COLUMNS) into the node's mapping file, keyed by (site, case)."""
    path = _private_dir(state_dir) / MAPPING_FILE
    merged: dict[tuple[str, str], dict[str, str]] = {}
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                merged[(row.get("site", ""), row.get("case", ""))] = row
    for row in rows:
        old = merged.get((row["site"], row["case"]), {})
        if old.get("status") == "imported" and row["status"] != "imported":
            row = {**row, "status": "imported"}  # an import never removes a case
        merged[(row["site"], row["case"])] = row
    buf = io.StringIO()
    w = csv.DictWriter(buf, MAPPING_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for key in sorted(merged):
        w.writerow(merged[key])
    return atomic_write_text(path, buf.getvalue())  # a mkstemp file: 0600
