"""DICOM objects a PACS takes back from `fedvox predict --dicom`, written with highdicom.

* segmentation: a DICOM SEG (binary, one segment per class but background) whose frames are the
  source series' own slices: highdicom copies each frame's position, orientation and pixel
  spacing from the source image it derives from, so the SEG shares the series' Frame of
  Reference and references its instances;
* classification: a Comprehensive 3D SR holding a TID 1500 measurement report: the calibrated
  probability, the label at the run's threshold, the model's identity and a disclaimer;
* saliency (`--saliency`): a parametric map (float heat values) over the same slices.

Every object is a new series of the source's patient and study, with new UIDs each time.
The labels and heat values arrive already sampled on the source frames (simulations/
predict_dicom.py); nothing here resamples.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

LOCAL_SCHEME = "99FEDVOX"  # a private coding scheme (the "99" prefix DICOM reserves for it)
DISCLAIMER = "Research result of a federated model: not for diagnostic use."
SHORT_DISCLAIMER = "NOT FOR DIAGNOSTIC USE"
# Type 2 attributes highdicom copies from the source: present (maybe empty) in a valid image,
# but some exports drop the empty ones.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate")
TYPE2_MORE = ("StudyTime", "ReferringPhysicianName", "AccessionNumber")


@dataclass
class ModelIdentity:
    """What made a result: written into every object (algorithm identification)."""

    run: str
    checkpoint: str  # "best.pt (round 3)"
    version: str  # fedvox's version
    epsilon: str  # the training run's privacy guarantee, as text

    @classmethod
    def of(cls, run_dir: Path, checkpoint: Path, round_: int) -> ModelIdentity:
        try:
            version = metadata.version("fedvox")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return cls(
            Path(run_dir).resolve().name,
            f"{checkpoint.name} (round {round_})",
            version,
            training_epsilon(Path(run_dir), round_),
        )

    def parameters(self) -> dict[str, str]:
        return {"run": self.run, "checkpoint": self.checkpoint, "epsilon": self.epsilon}


def training_epsilon(run_dir: Path, round_: int) -> str:
    """The largest hospital epsilon of the run up to the checkpoint's round (summary.json)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return "unknown (no summary.json)"
    config = summary.get("config") or {}
    if config.get("dp") is False:
        return "inf (trained without DP-SGD)"
    eps = [
        h.get("epsilon_run")
        for r in summary.get("rounds") or []
        if isinstance(r.get("round"), int) and r["round"] <= round_
        for h in (r.get("hospitals") or {}).values()
    ]
    eps = [float(e) for e in eps if isinstance(e, int | float)]
    if not eps:
        return "unknown (no hospital reported epsilon)"
    delta = config.get("target-delta")
    return f"{max(eps):.3g}" + (f" (delta {delta})" if delta is not None else "")


def load_sources(files: list[Path]) -> list[pydicom.Dataset]:
    """The source instances, headers only, with empty Type 2 attributes added where missing."""
    out = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for key in (*TYPE2, *TYPE2_MORE):
            if key not in ds:
                setattr(ds, key, "")
        out.append(ds)
    return out


def _series_number(sources: list[pydicom.Dataset], offset: int) -> int:
    number = sources[0].get("SeriesNumber")
    return offset + int(number) if number not in (None, "") else offset


def _algorithm(identity: ModelIdentity) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=f"fedvox {identity.run}"[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=identity.version,
        source="fedvox",
        parameters=identity.parameters(),
    )


def _equipment(identity: ModelIdentity) -> dict[str, Any]:
    return {
        "manufacturer": "fedvox",
        "manufacturer_model_name": f"fedvox predict {identity.run}"[:64],
        "software_versions": identity.version,
        "device_serial_number": identity.checkpoint[:64],
    }


def segment_terms(name: str) -> tuple[Any, Any]:
    """(category, type) codes of a class name: SNOMED CT where DICOM's segmentation contexts
    name it (lesions before anatomy), else a term of fedvox's private scheme."""
    keyword = "".join(w.capitalize() for w in re.split(r"[^A-Za-z0-9]+", name) if w)
    if keyword and keyword in codes.cid7159:  # lesion segmentation types
        return codes.SCT.MorphologicallyAbnormalStructure, getattr(codes.cid7159, keyword)
    if keyword and keyword in codes.cid7151:  # anatomic structures
        return codes.SCT.AnatomicalStructure, getattr(codes.cid7151, keyword)
    local = hd.sr.CodedConcept(name[:16] or "class", LOCAL_SCHEME, name[:64] or "class")
    return codes.SCT.Tissue, local


def write_seg(
    path: Path,
    sources: list[pydicom.Dataset],
    labels: np.ndarray,
    class_names: list[str],
    identity: ModelIdentity,
) -> Path:
    """labels: (frames, rows, cols) class indices on the source frames, in `sources` order
    (one multi-frame source: its frames)."""
    algorithm = _algorithm(identity)
    segments = []
    for number, name in enumerate(class_names[1:], start=1):
        category, kind = segment_terms(name)
        segments.append(
            hd.seg.SegmentDescription(
                number, name[:64], category, kind, "AUTOMATIC", algorithm, hd.UID(), name[:64]
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=_series_number(sources, 1000),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        **_equipment(identity),
        content_label="FEDVOX",
        content_description=f"fedvox {SHORT_DISCLAIMER}",
        series_description=f"fedvox SEG {identity.run}"[:40] + f" {SHORT_DISCLAIMER}",
        omit_empty_frames=bool(labels.any()),  # an all-empty SEG keeps its frames
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def write_heat_map(
    path: Path, sources: list[pydicom.Dataset], heat: np.ndarray, what: str, identity
) -> Path:
    """A parametric map (float32) of the heat values on the source frames."""
    lo, hi = float(np.min(heat)), float(np.max(heat))
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="SALIENCY",
        lut_explanation=what[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(lo, hi if hi > lo else lo + 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=heat.astype(np.float32),
        series_instance_uid=hd.UID(),
        series_number=_series_number(sources, 3000),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        **_equipment(identity),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=max(hi - lo, 1e-6))
        ],
        content_label="FEDVOX",
        content_description=f"fedvox saliency {SHORT_DISCLAIMER}",
        series_description=f"fedvox saliency {identity.run}"[:40] + f" {SHORT_DISCLAIMER}",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pm.save_as(path)
    return path


def _local(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value[:16], LOCAL_SCHEME, meaning[:64])


def _result_group(
    result: dict[str, Any], class_names: list[str], threshold: float, identity: ModelIdentity
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: the probability, the label and the disclaimer, by fedvox's algorithm."""
    algorithm = hd.sr.AlgorithmIdentification(
        name="fedvox",
        version=identity.version,
        parameters=[f"{k} {v}" for k, v in identity.parameters().items()],
    )
    if len(class_names) == 2:
        name = f"Calibrated probability of {class_names[1]}"
        rule = f"Label at the run's threshold {threshold:.4g}"
    else:
        name, rule = f"Calibrated probability of {result['class_name']}", "Most probable class"
    label = result["label"]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="fedvox result"),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=_local("probability", name),
                value=float(result["probability"]),
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                _local("label", rule), _local(f"class-{label}", str(class_names[label]))
            )
        ],
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=DISCLAIMER, relationship_type="CONTAINS"
        )
    )
    return group


def write_sr(
    path: Path,
    sources: list[pydicom.Dataset],
    result: dict[str, Any],
    class_names: list[str],
    threshold: float,
    identity: ModelIdentity,
) -> Path:
    """A TID 1500 report of one classification: `result` = Predictor.classify's dict."""
    group = _result_group(result, class_names, threshold, identity)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name="fedvox predict", model_name=identity.run[:64]
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(context, codes.SCT.ImagingProcedure, [group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=_series_number(sources, 2000),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fedvox",
        is_complete=True,
        series_description=f"fedvox SR {identity.run}"[:40] + f" {SHORT_DISCLAIMER}",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path)
    return path
