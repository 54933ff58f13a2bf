"""The node's privacy ledger: every DP training step set this dataset ever paid for.

One JSON file in the node's state dir. Flower starts a fresh ClientApp process
per message in deployment, so `Context.state` cannot hold it: the file is the
source of truth, re-read on every message and written atomically (temp file,
fsync, rename) before the reply leaves the node. The dataset's lifetime epsilon
is the accountant's composition of all entries, across runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.privacy import HistoryEntry, compute_epsilon

LEDGER_FILE = "privacy_ledger.json"
LEDGER_VERSION = 1


class LedgerError(RuntimeError):
    """The ledger file exists but cannot be trusted; training must not proceed."""


@dataclass
class PrivacyLedger:
    path: Path
    accountant: str = "rdp"
    entries: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, state_dir: Path | str, accountant: str = "rdp") -> PrivacyLedger:
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return cls(path=path, accountant=accountant)
        try:
            data = json.loads(path.read_text())
            entries, runs = list(data["entries"]), dict(data["runs"])
            stored = data.get("accountant", accountant)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never start over silently: a lost ledger would reset the lifetime epsilon.
            raise LedgerError(
                f"privacy ledger {path} is unreadable ({exc}); refusing to train"
            ) from exc
        if stored != accountant:
            raise LedgerError(
                f"privacy ledger {path} was kept with the '{stored}' accountant, run asks for "
                f"'{accountant}'; mixing accountants is not supported"
            )
        return cls(path=path, accountant=stored, entries=entries, runs=runs)

    # -- reading ---------------------------------------------------------------
    def history(self, run_uid: str | None = None) -> list[HistoryEntry]:
        return [
            (e["noise_multiplier"], e["sample_rate"], e["steps"])
            for e in self.entries
            if run_uid is None or e["run_uid"] == run_uid
        ]

    def epsilon(
        self, delta: float, run_uid: str | None = None, extra: list[HistoryEntry] | None = None
    ) -> float:
        """Epsilon of the whole ledger (or one run), optionally with planned `extra` steps."""
        return compute_epsilon(self.history(run_uid) + list(extra or []), delta, self.accountant)

    # -- writing ---------------------------------------------------------------
    def plan_run(self, run_uid: str, **plan: Any) -> dict[str, Any]:
        """Record (once) the calibration of a run, so every later round reuses the same sigma."""
        if run_uid not in self.runs:
            self.runs[run_uid] = {"created": time.time(), **plan}
            self.save()
        return self.runs[run_uid]

    def record(self, run_uid: str, round_: int, history: list[HistoryEntry], **extra: Any) -> None:
        for sigma, q, steps in history:
            self.entries.append(
                {
                    "time": time.time(),
                    "run_uid": run_uid,
                    "round": round_,
                    "noise_multiplier": sigma,
                    "sample_rate": q,
                    "steps": steps,
                    **extra,
                }
            )
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": LEDGER_VERSION,
            "accountant": self.accountant,
            "runs": self.runs,
            "entries": self.entries,
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
