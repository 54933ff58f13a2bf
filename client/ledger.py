"""The node's privacy ledger: every DP release this dataset ever paid for.

One JSON file in the node's state dir, the source of truth for the dataset's epsilon (Flower
starts a fresh ClientApp process per message in deployment, so memory cannot hold it). Three
rules make it impossible to race or to lose:

1. **One writer at a time.** Every read-check-write happens under an exclusive file lock
   (`PrivacyLedger.transaction`), so two runs on one node cannot both pass a budget check
   that only one of them fits in.
2. **Reserve before, release after.** Before any DP computation the node writes a
   *reservation* (the planned history, its process id) and fsyncs it, folder included; the
   budget check counts reservations as spent. Before the result leaves the node the entry
   becomes *released* (with the released update's hash and the history the accountant really
   recorded). Released is spent, for good.
3. **What never left is given back.** A reservation whose process is gone (the node died
   before sending) released nothing, so the next transaction marks it *abandoned*, and it stops
   counting.

Entries: {id, time, run_uid, round, phase, status, noise_multiplier, sample_rate, steps,
pid, started, update_sha256}. `history()` and `epsilon()` count reserved + released entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from common.files import atomic_write_json
from common.privacy import HistoryEntry, compute_epsilon

LEDGER_FILE = "privacy_ledger.json"
LEDGER_VERSION = 2
RESERVED, RELEASED, ABANDONED = "reserved", "released", "abandoned"
COUNTED = (RESERVED, RELEASED)


class LedgerError(RuntimeError):
    """The ledger file exists but cannot be trusted; nothing may be trained or released."""


@dataclass
class PrivacyLedger:
    path: Path
    accountant: str = "rdp"
    entries: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, state_dir: Path | str, accountant: str = "rdp") -> PrivacyLedger:
        """The ledger as on disk now (read-only view; change it inside `transaction`)."""
        ledger = cls(path=Path(state_dir) / LEDGER_FILE, accountant=accountant)
        ledger._read()
        return ledger

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PrivacyLedger]:
        """Exclusive lock, fresh read (abandoned reservations given back), save on success."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=600):
            self._read()
            self._give_back_abandoned()
            yield self
            self.save()

    def _read(self) -> None:
        if not self.path.exists():
            self.entries, self.runs = [], {}
            return
        try:
            data = json.loads(self.path.read_text())
            entries, runs = list(data["entries"]), dict(data["runs"])
            stored = data.get("accountant", self.accountant)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never start over silently: a lost ledger would reset the lifetime epsilon.
            raise LedgerError(f"privacy ledger {self.path} is unreadable ({exc})") from exc
        if stored != self.accountant:
            raise LedgerError(
                f"privacy ledger {self.path} was kept with the '{stored}' accountant, the "
                f"node's policy says '{self.accountant}'; mixing accountants is not supported"
            )
        for e in entries:
            e.setdefault("status", RELEASED)  # version 1 wrote entries after training
            e.setdefault("phase", e.get("phase") or "train")
        self.entries, self.runs = entries, runs

    def _give_back_abandoned(self) -> None:
        for e in self.entries:
            if e["status"] == RESERVED and not _alive(e.get("pid"), e.get("started")):
                e["status"] = ABANDONED
                e["abandoned_at"] = time.time()

    # -- reading ----------------------------------------------------------------------------
    def history(self, run_uid: str | None = None) -> list[HistoryEntry]:
        """What counts: reserved and released entries (of one run, or of the dataset)."""
        return [
            (e["noise_multiplier"], e["sample_rate"], e["steps"])
            for e in self.entries
            if e["status"] in COUNTED and (run_uid is None or e["run_uid"] == run_uid)
        ]

    def epsilon(
        self, delta: float, run_uid: str | None = None, extra: list[HistoryEntry] | None = None
    ) -> float:
        """Epsilon of the whole ledger (or one run), optionally with planned `extra` steps."""
        return compute_epsilon(self.history(run_uid) + list(extra or []), delta, self.accountant)

    def find(self, run_uid: str, round_: int, phase: str) -> dict[str, Any] | None:
        """The counted entry of (run, round, phase), if any: a repeated request's release."""
        for e in reversed(self.entries):
            same = (e["run_uid"], e["round"], e.get("phase")) == (run_uid, round_, phase)
            if same and e["status"] == RELEASED:
                return e
        return None

    def count(self, run_uid: str, phases: tuple[str, ...]) -> int:
        """Counted entries of a run in these phases (e.g. its validation releases)."""
        return sum(
            1
            for e in self.entries
            if e["run_uid"] == run_uid and e.get("phase") in phases and e["status"] in COUNTED
        )

    # -- writing (inside `transaction`) -----------------------------------------------------
    def plan_run(self, run_uid: str, **plan: Any) -> dict[str, Any]:
        """Record (once) the calibration of a run, so every later message reuses the same sigma."""
        if run_uid not in self.runs:
            self.runs[run_uid] = {"created": time.time(), **plan}
        return self.runs[run_uid]

    def reserve(
        self, run_uid: str, round_: int, phase: str, planned: HistoryEntry
    ) -> dict[str, Any]:
        sigma, q, steps = planned
        entry = {
            "id": uuid.uuid4().hex,
            "time": time.time(),
            "run_uid": run_uid,
            "round": round_,
            "phase": phase,
            "status": RESERVED,
            "noise_multiplier": float(sigma),
            "sample_rate": float(q),
            "steps": int(steps),
            "pid": os.getpid(),
            "started": _start_time(os.getpid()),
        }
        self.entries.append(entry)
        return entry

    def release(
        self,
        entry_id: str,
        history: list[HistoryEntry],
        update_sha256: str,
        result: dict[str, Any] | None = None,
    ) -> None:
        """The reservation becomes what was released (the accountant's own history); `result`
        (small, JSON) is kept so that a repeated request gets the same answer."""
        entry = self._reservation(entry_id)
        (sigma, q, _), steps = history[0], sum(int(n) for _, _, n in history)
        if any((s, r) != (sigma, q) for s, r, _ in history):
            raise LedgerError("one release must have one (noise multiplier, sample rate)")
        entry.update(
            status=RELEASED,
            noise_multiplier=float(sigma),
            sample_rate=float(q),
            steps=steps,
            update_sha256=update_sha256,
            released_at=time.time(),
        )
        if result is not None:
            entry["result"] = result

    def abandon(self, entry_id: str) -> None:
        """The computation failed before anything left the node: the reservation is given back."""
        entry = self._reservation(entry_id)
        entry.update(status=ABANDONED, abandoned_at=time.time())

    def _reservation(self, entry_id: str) -> dict[str, Any]:
        entry = next((e for e in self.entries if e.get("id") == entry_id), None)
        if entry is None or entry["status"] != RESERVED:
            raise LedgerError(f"privacy ledger {self.path}: reservation {entry_id} is gone")
        return entry

    def save(self) -> None:
        payload = {
            "version": LEDGER_VERSION,
            "accountant": self.accountant,
            "runs": self.runs,
            "entries": self.entries,
        }
        atomic_write_json(self.path, payload)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int | None, started: str | None) -> bool:
    """Is the process that made a reservation still running? Unknown counts as alive."""
    if pid is None:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(int(pid))
    return started is None or now is None or now == started
