"""Every model the `model` run-config key can name, with what the rest of fedvox asks of it.

One entry per model: its builder per task, the dimensionality it takes and its traits. The
config's allowed `model` values, the task's model, the node's statistic release, the
filterbank-only strategy rule and the saliency method are all read from here, so adding a
model is one `register(ModelEntry(...))` (docs/architecture.md, "Extending fedvox"). Like
Opacus' grad-sampler registry and MONAI's layer factories, the table is keyed by name and the
builders import their modules only when called: `common.config` reads this without torch.
"""

from __future__ import annotations

import importlib
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
    builders: Mapping[str, Callable[[Any], Any] | str]  # or "module:function"
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
    builder = entry.builders[task]
    if isinstance(builder, str):
        module, _, function = builder.partition(":")
        builder = getattr(importlib.import_module(module), function)
    return builder(spec)


def _quoted(names: list[str]) -> str:
    return " or ".join(f'model="{n}"' for n in names) or "another model"


# -- fedvox's own models: "module:function" builders, imported on first use (this module stays
# torch-free, and the model modules may import it without a cycle)

# "cnn" is the classifier CNN. For segmentation it is the earlier name of "unet" (the U-Net
# of the same blocks), kept so that run configs and checkpoints from before still build.
register(
    ModelEntry(
        "cnn",
        {"classification": "common.models:cnn", "segmentation": "common.unet:unet"},
        summary='is a CNN classifier (for segmentation, the earlier name of "unet")',
    )
)
register(
    ModelEntry(
        "scatter-cnn",
        {"classification": "common.models:scatter_cnn"},
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
        {"classification": "common.models:filterbank_3d"},
        spatial_dims=(3,),
        summary="classifies 3D volumes (fixed filter statistics + a linear head)",
        releases_statistic=True,
        server_optimiser=False,
        saliency=OCCLUSION,
    )
)
# Per-position scores pooled over the volume: no released statistic (each case standardises
# its own features), and no grid a Grad-CAM could use after the pooling, so occlusion.
register(
    ModelEntry(
        "mil-3d",
        {"classification": "common.mil3d:mil_3d"},
        spatial_dims=(3,),
        summary="classifies 3D volumes by a local finding (fixed local filters, a small "
        "per-position scorer, soft-maximum pooling)",
        saliency=OCCLUSION,
    )
)
register(
    ModelEntry(
        "slice-unet",
        {"segmentation": "common.unet:slice_unet"},
        spatial_dims=(3,),
        summary="segments 3D volumes (a 2D U-Net over axial slices)",
    )
)
register(
    ModelEntry(
        "unet",
        {"segmentation": "common.unet:unet"},
        summary="segments 2D or 3D images (a U-Net of conv-GroupNorm-ReLU blocks)",
    )
)
