"""Model weights <-> Flower `ArrayRecord`, with clean state_dict keys.

Opacus wraps a model in `GradSampleModule`, whose state_dict keys gain a
`_module.` prefix. Everything that leaves a node goes through `to_record`,
which always serialises the unwrapped module, so the global state_dict loads
into a fresh `build_model(...)` with no key fix-ups.
"""

from __future__ import annotations

import hashlib

import torch
from flwr.app import ArrayRecord
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside an Opacus GradSampleModule (or the model itself)."""
    return getattr(model, "_module", model)


def to_record(model: nn.Module) -> ArrayRecord:
    return ArrayRecord(unwrap(model).state_dict())


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    """Load global weights in place (hooks and optimizer references stay valid)."""
    unwrap(model).load_state_dict(record.to_torch_state_dict(), strict=True)


def load_checkpoint_weights(model: nn.Module, state_dict: dict, source: object) -> None:
    """Load a saved state_dict, or say which file does not fit the model this version builds
    (e.g. one written with another model width or by a version with another channel plan)."""
    try:
        unwrap(model).load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
        raise ValueError(
            f"{source}: its weights do not fit the model this fedvox version builds ({first}); "
            "it was written by another fedvox version or with other model settings: train "
            "again, or use the version that wrote it"
        ) from None


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names and values: which exact weights a round started from."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# Normalisation layers whose affine parameters FedBN-style training keeps at each site.
_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def norm_parameter_names(model: nn.Module) -> list[str]:
    """state_dict keys of every normalisation layer's affine weight and bias (FedBN)."""
    names = []
    for prefix, module in unwrap(model).named_modules():
        if isinstance(module, _NORM_TYPES):
            for p in ("weight", "bias"):
                if getattr(module, p, None) is not None:
                    names.append(f"{prefix}.{p}" if prefix else p)
    return names


def keep_local(model: nn.Module, names: list[str]) -> ArrayRecord:
    """The named parameters of `model`, to keep at the site between rounds."""
    state = unwrap(model).state_dict()
    return ArrayRecord({n: state[n].detach().clone() for n in names})


def restore_local(model: nn.Module, kept: ArrayRecord) -> None:
    """Overwrite the global values of the kept parameters with this site's own."""
    unwrap(model).load_state_dict(kept.to_torch_state_dict(), strict=False)
