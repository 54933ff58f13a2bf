"""`fedvox import dicom`: a PACS export (a tree of DICOM files) -> a hospital site.

1. Read every file's header (client/importers/dicom_scan.py); group files into series by
   SeriesInstanceUID and series into studies by StudyInstanceUID.
2. Check each series (modality, localiser/scout, derived, secondary capture, one evenly spaced
   stack...). A study is one case: it needs exactly one usable series. With more than one
   candidate no rule can tell which the model should see (a lung and a soft-tissue kernel of
   the same scan, thin and thick slices), so none is taken and the report says so;
   `--series-description REGEX` narrows the candidates.
3. Label each study from `--labels` (a CSV keyed by `accession` or `study_uid`); a study
   without a row is reported and not imported: no label is ever invented.
4. Convert each chosen series with dcm2niix (client/importers/dicom_convert.py) and add it to
   the site (the one site writer, common/site/writer.py). Case ids are keyed hashes of the
   StudyInstanceUID (client/importers/state.py); the report names series by case id, series
   number, modality and description, never by UID, name or accession.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from client.importers import dicom_scan
from client.importers.dicom_convert import ConversionFailed, convert_series, converter
from client.importers.site import ImportInputError, ImportReport
from client.importers.state import case_id, check_state_dir, load_salt, update_mapping
from common.site.index import read_csv_table
from common.site.writer import SiteWriter, StagedCase, open_site

TOOL = "fedvox import dicom"
LABEL_KEYS = ("accession", "study_uid")
SPLITS = ("train", "val", "test")
SITE_MODALITY = {"CT": "CT", "MR": "MR", "CR": "xray", "DX": "xray"}
MAX_2D_SIDE = 256  # radiographs larger than this are trained at 256x256 unless --image-size


@dataclass
class LabelRow:
    label: int
    split: str | None
    line: int


def read_labels(path: Path) -> tuple[str, dict[str, LabelRow]]:
    """(key column, key -> row) of a labels CSV: `accession` or `study_uid`, `label`[, split]."""
    path = Path(path)
    header, reader = read_csv_table(path, ImportInputError, f"--labels {path}")
    keys = [h for h in header if h in LABEL_KEYS]
    unknown = [h for h in header if h not in (*LABEL_KEYS, "label", "split")]
    if len(keys) != 1 or "label" not in header or unknown or len(set(header)) != len(header):
        raise ImportInputError(
            f"--labels {path}: header must be one key column ({' or '.join(LABEL_KEYS)}), "
            f"'label' and optionally 'split'; got {header}"
        )
    ik, il = header.index(keys[0]), header.index("label")
    isp = header.index("split") if "split" in header else None
    rows: dict[str, LabelRow] = {}
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        cells = [c.strip() for c in cells] + [""] * len(header)
        key, raw, split = cells[ik], cells[il], (cells[isp] if isp is not None else "") or None
        where = f"--labels {path} line {line}"
        if not key:
            raise ImportInputError(f"{where}: empty {keys[0]}")
        if not re.fullmatch(r"\d+", raw):
            raise ImportInputError(f"{where}: label {raw!r} is not a class index (0, 1, ...)")
        if split is not None and split not in SPLITS:
            raise ImportInputError(f"{where}: split {split!r} is not one of {SPLITS}")
        if key in rows:
            raise ImportInputError(f"{where}: the same {keys[0]} as line {rows[key].line}")
        rows[key] = LabelRow(int(raw), split, line)
    return keys[0], rows


@dataclass
class Series:
    files: list[dicom_scan.DicomFile]
    case: str
    problem: str = ""

    @property
    def first(self) -> dicom_scan.DicomFile:
        return self.files[0]

    @property
    def name(self) -> str:
        """Non-identifying: case id, series number, modality, description."""
        f = self.first
        number = f.series_number if f.series_number is not None else "?"
        desc = f' "{f.description[:48]}"' if f.description else ""
        return f"case {self.case} series {number} {f.modality or '?'}{desc}"


def _group(files: list[dicom_scan.DicomFile], salt: bytes) -> dict[str, list[Series]]:
    """study UID -> its series, in (series number, description) order."""
    by_series: dict[str, list[dicom_scan.DicomFile]] = {}
    for f in files:
        by_series.setdefault(f.series_uid, []).append(f)
    studies: dict[str, list[Series]] = {}
    for group in by_series.values():
        study = group[0].study_uid
        studies.setdefault(study, []).append(Series(group, case_id(salt, study)))
    for series in studies.values():
        series.sort(key=lambda s: (s.first.series_number or 0, s.first.description, s.name))
    return dict(sorted(studies.items(), key=lambda kv: kv[1][0].case))


def _modalities(studies: dict[str, list[Series]], wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The requested modalities; without --modality, the one the export's images have."""
    if wanted:
        kinds = {SITE_MODALITY[m] for m in wanted}
        if len(kinds) > 1:
            raise ImportInputError(
                f"--modality {' '.join(wanted)}: one site holds one kind of image "
                "(CR and DX may be combined)"
            )
        return tuple(wanted)
    seen = Counter(
        s.first.modality
        for series in studies.values()
        for s in series
        if s.first.modality in dicom_scan.MODALITIES and any(f.has_pixels for f in s.files)
    )
    kinds = {SITE_MODALITY[m] for m in seen}
    if len(kinds) > 1:
        found = ", ".join(f"{m} ({n} series)" for m, n in sorted(seen.items()))
        raise ImportInputError(
            f"the export holds images of several modalities: {found}; choose one with --modality"
        )
    return tuple(sorted(seen)) or dicom_scan.MODALITIES


def _choose(series: list[Series], description: re.Pattern | None) -> Series | None:
    """The study's one usable series; every other series gets its reason."""
    candidates = [s for s in series if not s.problem]
    if description is not None:
        for s in candidates:
            if not description.search(s.first.description):
                s.problem = (
                    f"description does not match --series-description {description.pattern!r}"
                )
        candidates = [s for s in candidates if not s.problem]
    if len(candidates) > 1:
        numbers = ", ".join(str(s.first.series_number) for s in candidates)
        for s in candidates:
            s.problem = (
                f"one of {len(candidates)} usable series of this study (series {numbers}); "
                "none chosen: pick one with --series-description"
            )
        return None
    return candidates[0] if candidates else None


def _label_of(study: str, series: Series, labels) -> tuple[LabelRow | None, str]:
    """(row, problem) for a study; labels = (key column, rows) or None (no --labels)."""
    if labels is None:
        return None, ""
    column, rows = labels
    key = study if column == "study_uid" else series.first.accession
    if column == "accession" and not key:
        return None, "the study has no AccessionNumber, the --labels key"
    if column == "accession" and len({f.accession for f in series.files}) > 1:
        return None, "the series' files disagree on the AccessionNumber"
    row = rows.get(key)
    return row, ("" if row else "no row for this study in --labels: not imported (no label)")


def _select(studies: dict[str, list[Series]], modalities: tuple[str, ...], description, labels):
    """[(study, series, label row)] to convert; every other series gets its `problem`."""
    chosen = []
    for study, series in studies.items():
        for s in series:
            s.problem = dicom_scan.series_problem(s.files, modalities)
        pick = _choose(series, description)
        if pick is None:
            continue
        row, problem = _label_of(study, pick, labels)
        if problem:
            pick.problem = problem
            continue
        chosen.append((study, pick, row))
    return chosen


def _unused_label_lines(studies, labels, path: Path, report: ImportReport) -> None:
    """Label rows no study of the export matches: reported by line (the key identifies)."""
    column, rows = labels
    if column == "study_uid":
        seen = set(studies)
    else:
        seen = {f.accession for series in studies.values() for s in series for f in s.files}
    for key, row in rows.items():
        if key not in seen:
            report.skip(
                f"labels {path.name} line {row.line}", f"no study in the export has this {column}"
            )


def _convert_all(binary: str, chosen, writer: SiteWriter) -> dict[str, tuple[tuple, str]]:
    """Convert and stage the chosen series. -> {series uid: (shape, what was written)}."""
    written = {}
    for _study, series, row in chosen:
        rel = f"images/{series.case}.nii.gz"
        two_d = series.first.modality in dicom_scan.MODALITIES_2D
        slices = 1 if two_d else sum(f.frames for f in series.files)
        try:
            shape = convert_series(binary, [f.path for f in series.files], writer.path(rel), slices)
        except ConversionFailed as e:
            series.problem = str(e)
            continue
        label = row.label if row else None
        writer.add(StagedCase(series.case, rel, label=label, split=row.split if row else None))
        detail = f"{'x'.join(map(str, shape))} -> {rel}"
        written[series.first.series_uid] = (shape, detail + (f", label {label}" if row else ""))
    return written


def _spec(modalities, shapes: list[tuple], class_names, image_size, report) -> dict:
    """dataset.json of the site (keys left None keep what an earlier import wrote)."""
    two_d = modalities[0] in dicom_scan.MODALITIES_2D
    if image_size is None and two_d and max(max(s[:2]) for s in shapes) > MAX_2D_SIDE:
        image_size = [MAX_2D_SIDE, MAX_2D_SIDE]
        report.notes.append(
            f"radiographs larger than {MAX_2D_SIDE} pixels: dataset.json image_size set to "
            f"{MAX_2D_SIDE}x{MAX_2D_SIDE} (the model input; change with --image-size)"
        )
    return {
        "task": "classification",
        "class_names": list(class_names) if class_names else None,
        "modality": SITE_MODALITY[modalities[0]],
        "spatial_dims": 2 if two_d else 3,
        "image_size": list(image_size) if image_size else None,
    }


def _check_inputs(src, site, state_dir, labels, series_description, class_names) -> tuple:
    """Every setting checked before any work: -> (src, site, state dir, labels, regex)."""
    src, site = Path(src).expanduser().resolve(), Path(site).expanduser().resolve()
    if not src.is_dir():
        raise ImportInputError(f"DICOM folder {src} does not exist or is not a folder")
    if site == src or src in site.parents:
        raise ImportInputError(f"--out {site} is inside the DICOM folder {src}; choose another")
    if labels is not None and not Path(labels).is_file():
        raise ImportInputError(f"--labels {labels} does not exist or is not a file")
    state_dir = check_state_dir(state_dir, site)
    label_rows = read_labels(labels) if labels is not None else None
    top = max((r.label for r in label_rows[1].values()), default=-1) if label_rows else -1
    if class_names and top >= len(class_names):
        raise ImportInputError(
            f"--class-names names {len(class_names)} classes but --labels {labels} has label {top}"
        )
    try:
        description = re.compile(series_description, re.I) if series_description else None
    except re.error as e:
        raise ImportInputError(f"--series-description {series_description!r}: {e}") from None
    return src, site, state_dir, label_rows, description


def _mapping_rows(site: Path, studies: dict[str, list[Series]], imported: set[str]) -> list:
    return [
        {
            "site": str(site),
            "case": group[0].case,
            "accession": group[0].first.accession,
            "study_uid": study,
            "status": "imported" if group[0].case in imported else "skipped",
        }
        for study, group in studies.items()
    ]


def _report_lines(report, studies, written, label_rows, labels) -> None:
    for series in (s for group in studies.values() for s in group):
        if series.first.series_uid in written:
            report.ok(series.name, written[series.first.series_uid][1])
        else:
            report.skip(series.name, series.problem or "not chosen")
    if label_rows is not None:
        _unused_label_lines(studies, label_rows, Path(labels), report)
    elif written:
        report.notes.append(
            "no --labels: images written without labels.csv; add labels before training"
        )


def import_dicom(
    src: Path,
    site: Path,
    state_dir: Path,
    labels: Path | None = None,
    modalities: tuple[str, ...] = (),
    series_description: str | None = None,
    class_names: list[str] | None = None,
    image_size: list[int] | None = None,
) -> ImportReport:
    """Import a DICOM export into `site`; bad settings raise ImportInputError before any work."""
    src, site, state_dir, label_rows, description = _check_inputs(
        src, site, state_dir, labels, series_description, class_names
    )
    binary, version = converter()
    salt = load_salt(state_dir)
    files, problems = dicom_scan.scan_tree(src)
    report = ImportReport(f"fedvox import dicom {src} -> {site} (dcm2niix {version})")
    for rel, p in problems:
        if p.ignore:
            report.notes.append(f"file {rel}: {p.reason}")
        else:
            report.skip(f"file {rel}", p.reason)
    studies = _group(files, salt)
    modalities = _modalities(studies, tuple(modalities))
    dims = 2 if modalities[0] in dicom_scan.MODALITIES_2D else 3
    if image_size is not None and len(image_size) != dims:
        raise ImportInputError(
            f"--image-size {image_size}: the {'/'.join(modalities)} images are {dims}D"
        )
    chosen = _select(studies, modalities, description, label_rows)
    with open_site(site, TOOL) as writer:
        written = _convert_all(binary, chosen, writer)
        report.imported = len(written)
        if written:
            shapes = [shape for shape, _ in written.values()]
            spec = _spec(modalities, shapes, class_names, image_size, report)
            report.site_cases = writer.commit(spec)
    _report_lines(report, studies, written, label_rows, labels)
    imported = {s.case for _, s, _ in chosen if s.first.series_uid in written}
    update_mapping(state_dir, _mapping_rows(site, studies, imported))
    return report
