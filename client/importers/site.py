"""What `fedvox import` prints, and the names importers use for the one site writer.

An import ADDS cases to a site and never deletes one; ownership (`<site>/import.json`), the
lock and crash safety are the site writer's (common/site/writer.py, `open_site`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.site.writer import SiteInputError

# Unusable import input or settings; the message names the file, folder or setting.
ImportInputError = SiteInputError


# ---------------------------------------------------------------------------------- report


@dataclass
class ReportLine:
    item: str  # non-identifying: "case 3f9c… series 2 CT "Thorax"", "file a/b.dcm", "labels …"
    ok: bool
    detail: str = ""  # ok: what was written; skipped: the reason


@dataclass
class ImportReport:
    """One line per series / case / bad input file, like `fedvox validate`'s report."""

    title: str
    lines: list[ReportLine] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # not counted (e.g. a DICOMDIR index)
    imported: int = 0  # cases written or confirmed by this import
    site_cases: int = 0  # cases in the site afterwards

    def ok(self, item: str, detail: str = "") -> None:
        self.lines.append(ReportLine(item, True, detail))

    def skip(self, item: str, reason: str) -> None:
        self.lines.append(ReportLine(item, False, reason))

    @property
    def n_skipped(self) -> int:
        return sum(not line.ok for line in self.lines)

    @property
    def exit_code(self) -> int:
        """0: everything imported; 1: some series/files skipped; 2: nothing usable."""
        if self.imported == 0:
            return 2
        return 1 if self.n_skipped else 0

    def format(self) -> str:
        out = [self.title]
        for line in self.lines:
            tag = "ok  " if line.ok else "SKIP"
            out.append(f"  {tag} {line.item}" + (f": {line.detail}" if line.detail else ""))
        out += [f"  note: {n}" for n in self.notes]
        out.append(
            f"{self.imported} case(s) imported, {self.n_skipped} skipped; "
            f"{self.site_cases} case(s) in the site"
        )
        return "\n".join(out)
