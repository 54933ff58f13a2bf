"""Every model the `model` run-config key can name, with what the rest of fedvox asks of it.

One entry per model: its builder per task, the dimensionality it takes and its traits. The
config's allowed `model` values, the task's model, the node's statistic release, the
filterbank-only strategy rule and the saliency method are all read from here, so adding a
model is one `register(ModelEntry(...))` (docs/architecture.md, "Extending fedvox"). Like
Opacus' grad-sampler registry and MONAI's layer factories, the table is keyed by name and the
builders import their modules only when called: `common.config` reads this without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

GRAD_CAM, OCCLUSION = "Grad-CAM", "occlusion"
_DATA = {2: "2D images", 3: "3D volumes"}


@dataclass(frozen=True)
class ModelEntry:
    """`builders`: task ("classification", "segmentation") -> builder(spec) -> nn.Module, where
    `spec` has spatial_dims, in_channels, num_classes, image_size, width (None = the model's
    default) and depth (`common.tasks.ModelSpec`)."""

    name: str
    builders: Mapping[str, Callable[[Any], Any]]
    spatial_dims: tuple[int, ...] = (2, 3)
    summary: str = ""  # for people: what it is, as in "model=... <summary>"
    releases_statistic: bool = False  # nodes release a DP data statistic with the weights
    server_optimiser: bool = True  # may be stepped by a server optimiser (FedAdam & co.)
    saliency: str = GRAD_CAM  # Grad-CAM at the last ReLU of `model.features`, or occlusion
    traits: dict[str, Any] = field(default_factory=dict)  # anything else a plug-in needs

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.builders)


MODELS: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    """Adds (or replaces) `entry`; the run config accepts its name from then on."""
    MODELS[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    MODELS.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(MODELS)


def get(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"model={name!r} (run config) is not one of {', '.join(MODELS)}")
    return MODELS[name]


def serving(task: str, spatial_dims: int | None = None) -> list[str]:
    """Names of the models for `task` (and `spatial_dims`), in registration order."""
    return [
        e.name
        for e in MODELS.values()
        if task in e.builders and (spatial_dims is None or spatial_dims in e.spatial_dims)
    ]


def build(task: str, spec: Any) -> Any:
    """The `spec.arch` model for `task`; ValueError naming the model when it does not fit."""
    entry = get(spec.arch)
    if task not in entry.builders:
        raise ValueError(
            f'model="{entry.name}" {entry.summary}; {task} uses {_quoted(serving(task))}'
        )
    if spec.spatial_dims not in entry.spatial_dims:
        data = " and ".join(_DATA[d] for d in entry.spatial_dims)
        raise ValueError(
            f'model="{entry.name}" is for {data}; these are {spec.spatial_dims}D '
            f"(use {_quoted(serving(task, spec.spatial_dims))})"
        )
    return entry.builders[task](spec)


def _quoted(names: list[str]) -> str:
    return " or ".join(f'model="{n}"' for n in names) or "another model"


# -- fedvox's own models (imports inside the builders keep this module torch-free) ----------


def _cnn(spec: Any) -> Any:
    from common.models import CNN, default_width

    width = spec.width or default_width(spec.spatial_dims)
    return CNN(spec.spatial_dims, spec.in_channels, spec.num_classes, width, spec.depth)


def _unet(spec: Any) -> Any:
    from common.unet import build_unet

    return build_unet(spec.spatial_dims, spec.in_channels, spec.num_classes, spec.width)


def _scatter_cnn(spec: Any) -> Any:
    from common.models import ScatterCNN

    if spec.image_size is None or len(spec.image_size) != 2:
        raise ValueError(f'model="scatter-cnn" is for 2D images; got size {spec.image_size}')
    return ScatterCNN(tuple(spec.image_size), spec.in_channels, spec.num_classes, spec.width or 32)


def _filterbank_3d(spec: Any) -> Any:
    from common.filterbank3d import FilterBank3D

    if spec.image_size is None or len(spec.image_size) != 3:
        raise ValueError(f'model="filterbank-3d" is for 3D volumes; got size {spec.image_size}')
    return FilterBank3D(tuple(spec.image_size), spec.in_channels, spec.num_classes)


def _slice_unet(spec: Any) -> Any:
    from common.unet import SliceUNet

    return SliceUNet(spec.in_channels, spec.num_classes, spec.width)


# "cnn" is two networks: a classifier CNN, and for segmentation the U-Net of the same blocks.
register(
    ModelEntry(
        "cnn",
        {"classification": _cnn, "segmentation": _unet},
        summary="is a CNN classifier or, for segmentation, a U-Net",
    )
)
register(
    ModelEntry(
        "scatter-cnn",
        {"classification": _scatter_cnn},
        spatial_dims=(2,),
        summary="classifies 2D images (fixed scattering + a small CNN)",
    )
)
# Its released feature mean travels with the weights: a server optimiser's step (Adam,
# momentum) would move it away from the mean instead of averaging it. No spatial grid is left
# after its whole-volume statistics, so saliency is occlusion.
register(
    ModelEntry(
        "filterbank-3d",
        {"classification": _filterbank_3d},
        spatial_dims=(3,),
        summary="classifies 3D volumes (fixed filter statistics + a linear head)",
        releases_statistic=True,
        server_optimiser=False,
        saliency=OCCLUSION,
    )
)
register(
    ModelEntry(
        "slice-unet",
        {"segmentation": _slice_unet},
        spatial_dims=(3,),
        summary="segments 3D volumes (a 2D U-Net over axial slices)",
    )
)
