"""Apply a run's global model to new scans: the core of `fedvox predict`.

A checkpoint carries everything needed (`predict_fields`, written by the server with every
checkpoint): model spec, preprocessing settings, class names, the decision threshold and the
temperature chosen on the hospitals' validation aggregates for that very model. So predict never
reads the training config, and it preprocesses with the training chain itself
(`common.transforms.build_transform`), which is why it reproduces the server's held-out numbers.

Outputs live on the INPUT's grid: a segmentation mask or saliency map is mapped back through
the inverse of the preprocessing geometry (`common.geometry`) and saved with the input's shape
and affine. Lives in `common/` so the server and the command line (simulations/predict.py) can
both use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from common import model_registry
from common.geometry import FileGeometry, like
from common.metrics import mirrored_logits
from common.site.index import NIFTI_SUFFIXES, case_id
from common.tasks import ModelSpec, build_task_model
from common.transforms import PreprocessConfig, build_transform, effective_shape
from common.weights import load_checkpoint_weights

PREDICT_FORMAT = 1


class InputError(ValueError):
    """One input can't be predicted; the message names the file and the reason."""


def predict_fields(
    preprocess: PreprocessConfig,
    class_names: tuple[str, ...],
    central: dict[str, Any],
    test_time_flips: bool = False,
) -> dict[str, Any]:
    """What a checkpoint carries for predict (plain types: loads with weights_only=True).

    `central` are the round's held-out metrics: its `threshold` / `temperature` are the
    calibration chosen for this model (absent before any hospital validated: 0.5 and 1).
    `test_time_flips`: segmentation predicts with test-time mirroring (run config)."""
    threshold = central.get("threshold")
    return {
        "format": PREDICT_FORMAT,
        "preprocess": {
            "spatial_size": list(preprocess.spatial_size),
            "modality": preprocess.modality,
            "ct_window": list(preprocess.ct_window),
        },
        "class_names": list(class_names),
        "threshold": float(threshold) if threshold is not None else 0.5,
        "temperature": float(central.get("temperature") or 1.0),
        "test_time_flips": bool(test_time_flips),
    }


def checkpoint_path(run_dir: Path, which: str = "last") -> Path:
    """checkpoints/<best|last>.pt or round-N -> checkpoints/round-NNN.pt."""
    name = which
    if which.startswith("round-"):
        try:
            name = f"round-{int(which[len('round-') :]):03d}"
        except ValueError:
            raise ValueError(f"--checkpoint {which!r}: expected best, last or round-N") from None
    elif which not in ("best", "last"):
        raise ValueError(f"--checkpoint {which!r}: expected best, last or round-N")
    path = Path(run_dir) / "checkpoints" / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (is {run_dir} a fedvox run folder?)")
    return path


@dataclass
class CaseResult:
    case: str
    file: Path
    row: dict[str, Any]  # one predictions.csv row
    written: list[Path] = field(default_factory=list)


@dataclass
class Predictor:
    model: torch.nn.Module
    spec: ModelSpec
    preprocess: PreprocessConfig
    class_names: list[str]
    threshold: float
    temperature: float
    round: int
    source: Path
    flips: bool = False  # segmentation: test-time mirroring (absent in older checkpoints)

    @classmethod
    def load(cls, run_dir: Path, which: str = "last") -> Predictor:
        path = checkpoint_path(run_dir, which)
        ck = torch.load(path, map_location="cpu", weights_only=True)
        info = ck.get("predict")
        if not isinstance(info, dict) or info.get("format") != PREDICT_FORMAT:
            raise ValueError(
                f"{path}: written before fedvox predict existed (no 'predict' fields); "
                "train or resume the run with this version to get a usable checkpoint"
            )
        spec = ModelSpec(**{**ck["model"], "image_size": tuple(ck["model"]["image_size"])})
        model = build_task_model(spec)
        load_checkpoint_weights(model, ck["state_dict"], path)
        model.eval()
        prep = info["preprocess"]
        return cls(
            model,
            spec,
            PreprocessConfig(tuple(prep["spatial_size"]), prep["modality"], prep["ct_window"]),
            list(info["class_names"]),
            float(info["threshold"]),
            float(info["temperature"]),
            int(ck["round"]),
            path,
            bool(info.get("test_time_flips", False)),
        )

    @property
    def segmentation(self) -> bool:
        return self.spec.task == "segmentation"

    def load_input(self, path: Path, modality: str | None) -> tuple[Any, torch.Tensor]:
        """(nibabel image, preprocessed tensor) or InputError naming the file."""
        if path.is_dir():
            raise InputError(
                f"{path}: a folder without NIfTI files (images/<case>.nii.gz) or DICOM files"
            )
        try:
            img = nib.load(path)
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as e:  # nibabel raises many types for a bad file
            raise InputError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
        dims = len(effective_shape(img.shape))
        if dims != self.spec.spatial_dims:
            raise InputError(
                f"{path}: a {dims}D image (shape {tuple(img.shape)}); this model takes "
                f"{self.spec.spatial_dims}D images"
            )
        if not np.isfinite(data).all():
            raise InputError(f"{path}: has NaN or infinite voxel values")
        self._check_modality(path, modality, data)
        return img, build_transform(self.preprocess)(img)

    def _check_modality(self, path: Path, modality: str | None, data: np.ndarray) -> None:
        want = self.preprocess.modality
        if modality is not None and modality.strip().upper() != want.strip().upper():
            raise InputError(
                f"{path}: modality {modality!r} (its dataset.json); this model was trained on "
                f"{want!r} images"
            )
        # CT is windowed in Hounsfield units: an image without air (~-1000 HU) is not HU.
        if self.preprocess.is_ct and data.size and float(np.nanmin(data)) > -500.0:
            raise InputError(
                f"{path}: voxel values {float(np.nanmin(data)):.0f}..{float(np.nanmax(data)):.0f}"
                " do not look like CT in Hounsfield units (air is about -1000); this model "
                "was trained on CT"
            )

    @torch.no_grad()
    def logits(self, image: torch.Tensor) -> torch.Tensor:
        if self.segmentation and self.flips:
            return mirrored_logits(self.model, image[None])[0]
        return self.model(image[None])[0]

    def classify(self, logits: torch.Tensor) -> dict[str, Any]:
        """Calibrated probability, label at the run's threshold, class name."""
        raw = torch.softmax(logits.double(), dim=0).numpy()
        calibrated = torch.softmax(logits.double() / self.temperature, dim=0).numpy()
        if len(raw) == 2:
            # The server's decision rule: uncalibrated P(class 1) >= threshold (scaling by T
            # keeps the order, so this is the same case split as on the calibrated scale).
            label = int(raw[1] >= self.threshold)
            probability = float(calibrated[1])
        else:
            label = int(np.argmax(raw))
            probability = float(calibrated[label])
        return {"probability": probability, "label": label, "class_name": self.class_names[label]}


def find_inputs(paths: list[Path]) -> list[tuple[Path, str | None]]:
    """(NIfTI file, modality from its folder's dataset.json or None) for each input: a file, a
    hospital-layout folder (images/<case>.nii.gz) or a folder of NIfTI files. A path that is
    neither is returned as is, and fails with a named error when predicted."""
    out: list[tuple[Path, str | None]] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            out.append((path, None))
            continue
        folder = path / "images" if (path / "images").is_dir() else path
        files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        if not files:
            out.append((path, None))  # reported as unreadable: nothing to predict
        out.extend((f, folder_modality(path)) for f in files)
    return out


def folder_modality(folder: Path) -> str | None:
    import json

    try:
        spec = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    modality = spec.get("modality") if isinstance(spec, dict) else None
    return modality if isinstance(modality, str) else None


def case_name(path: Path) -> str:
    return case_id(path.name) or path.name


def predict_file(
    predictor: Predictor, path: Path, modality: str | None, out: Path, saliency: bool
) -> CaseResult:
    """Predict one input; masks and heat maps go to `out` on the input's own grid."""
    img, image = predictor.load_input(path, modality)
    case = case_name(path)
    geometry = FileGeometry.of(img, predictor.preprocess.spatial_size)
    logits = predictor.logits(image)
    result = CaseResult(case, path, {"case": case, "file": str(path)})
    if predictor.segmentation:
        probs = torch.softmax(logits.float(), dim=0)
        labels = geometry.to_file_grid(probs).argmax(0).astype(np.uint8)
        result.written.append(_save(out / f"{case}_mask.nii.gz", like(img, labels)))
        counts = np.bincount(labels.ravel(), minlength=len(predictor.class_names))
        result.row.update(
            {f"{n}_voxels": int(c) for n, c in zip(predictor.class_names, counts, strict=False)}
        )
    else:
        result.row.update(predictor.classify(logits))
    if saliency:
        result.written += write_saliency(predictor, img, image, geometry, logits, out / case)
    return result


def write_saliency(
    predictor: Predictor,
    img: Any,
    image: torch.Tensor,
    geometry: FileGeometry,
    logits: torch.Tensor,
    stem: Path,
) -> list[Path]:
    """<case>_saliency.nii.gz on the input's grid (+ a PNG overlay for 2D)."""
    from common.saliency import class_saliency, foreground_probability, overlay_png

    if predictor.segmentation:
        heat, what = foreground_probability(torch.softmax(logits.float(), dim=0)), "P(foreground)"
    else:
        target = 1 if len(logits) == 2 else int(logits.argmax())
        method = model_registry.get(predictor.spec.arch).saliency
        heat, what = class_saliency(predictor.model, image, target, method)
    heat_file = geometry.to_file_grid(heat)[0]
    written = [_save(Path(f"{stem}_saliency.nii.gz"), like(img, heat_file))]
    if predictor.spec.spatial_dims == 2:
        from common.transforms import to_canonical

        scan_ras, _ = to_canonical(img)
        heat_ras, _ = to_canonical(like(img, heat_file))
        png = Path(f"{stem}_saliency.png")
        overlay_png(png, scan_ras, heat_ras, f"{stem.name}: {what}")
        written.append(png)
    return written


def _save(path: Path, image: nib.Nifti1Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path
