"""What a person sees while a run goes: one line per round; the details go to server.log.

Without this, `flwr run . --stream` printed every line twice and buried the round's result:
* Opacus calls `logging.basicConfig` when `opacus.utils.module_utils` is imported (in the
  simulation process, through the ClientApp), which puts a timestamped StreamHandler on the
  ROOT logger. Flower's "flwr" logger has its own console handler and propagates to the root,
  so every Flower record was printed by both (and Flower's DEBUG lines by the root one).
* Flower's strategies log "configure_train: Sampled ...", "aggregate_train: Received ..." and
  their settings every round, and the recorder logs every held-out metric.

`RunLog` (entered by the ServerApp for the run) stops the "flwr" logger from propagating (so
any root handler, Opacus' or another library's, no longer repeats it), sends every record at
DEBUG and Python warnings to `<run dir>/server.log`, and filters Flower's console handler down
to: warnings and errors, and INFO from anything but Flower's strategies and the recorder's
detail line. The progress line (server/outputs.py) is the one INFO line per round.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOG_FILE = "server.log"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Logging call sites whose INFO lines are details: in server.log, not on the console.
QUIET_SOURCES = (
    os.path.join("flwr", "serverapp", "strategy") + os.sep,
    os.path.join("server", "recorder.py"),
)


class ConsoleFilter(logging.Filter):
    """Keep warnings and errors; drop INFO/DEBUG details (they are in server.log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(src in record.pathname for src in QUIET_SOURCES)


# The root handler `logging.basicConfig` in opacus/utils/module_utils.py installs on import.
OPACUS_ROOT_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def drop_opacus_root_handler() -> None:
    """Remove the root handler Opacus put there on import (a library configuring the root
    logger for the whole process): Flower's records, DEBUG included, are printed twice by it,
    also after the run (Flower's simulation shutdown)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        fmt = getattr(handler.formatter, "_fmt", None)
        if type(handler) is logging.StreamHandler and fmt == OPACUS_ROOT_FORMAT:
            root.removeHandler(handler)


class RunLog:
    """`with RunLog(run_dir):` for the length of a run (restores everything on exit)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOG_FILE
        self.flwr = logging.getLogger("flwr")
        self.filter = ConsoleFilter()
        self.file: logging.FileHandler | None = None
        self._saved_propagate: bool | None = None

    def __enter__(self) -> RunLog:
        from flwr.common.logger import console_handler

        drop_opacus_root_handler()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(self.path, encoding="utf-8")
        self.file.setLevel(logging.DEBUG)
        self.file.setFormatter(logging.Formatter(FILE_FORMAT))
        self._saved_propagate = self.flwr.propagate
        self.flwr.propagate = False  # no second copy through a root handler (Opacus')
        self.flwr.addHandler(self.file)
        console_handler.addFilter(self.filter)
        warnings_logger = logging.getLogger("py.warnings")
        warnings_logger.addHandler(self.file)
        warnings_logger.propagate = False
        logging.captureWarnings(True)  # e.g. Ray's start-up FutureWarning: a detail
        return self

    def __exit__(self, *exc: object) -> None:
        from flwr.common.logger import console_handler

        drop_opacus_root_handler()  # in case Opacus was first imported during the run
        logging.captureWarnings(False)
        warnings_logger = logging.getLogger("py.warnings")
        warnings_logger.propagate = True
        console_handler.removeFilter(self.filter)
        if self.file is not None:
            warnings_logger.removeHandler(self.file)
            self.flwr.removeHandler(self.file)
            self.file.close()
        if self._saved_propagate is not None:
            self.flwr.propagate = self._saved_propagate
