"""Fixed features, computed once per case and process.

A model whose front end is fixed — scatter-cnn's wavelet scattering, filterbank-3d's filter
statistics — maps each case to the same features every epoch, every round and every
evaluation; without augmentation its inputs never change during a run. Recomputing them was
most of a training step (scatter-cnn on the 2D demo: ~86 %), so the front ends memoise their
output here, per case, keyed by the bytes of the case and the front end's own settings.

The cache lives in the process: a simulated hospital's Ray actor and the server keep it across
rounds; a deployed node's ClientApp (one forked process per message) keeps it across the
epochs of a round. It is bounded in bytes, least recently used out. Augmented inputs differ
every time: they miss, are computed afresh, and age out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch

CACHE_BYTES = 512 * 2**20  # at most this much memoised feature data in a process
_CACHE: OrderedDict[bytes, torch.Tensor] = OrderedDict()
_SIZE = [0]  # bytes held in _CACHE


def memoised(
    tag: str,
    x: torch.Tensor,
    compute: Callable[[torch.Tensor], torch.Tensor],
    chunk: int = 64,
) -> torch.Tensor:
    """compute(x) for a batch `x` (cases along dim 0), each case's row computed once.

    `tag` names the front end and its settings (two front ends, or one at other settings,
    never share an entry); `compute` must be a fixed function of each case alone, run on at
    most `chunk` cases at a time without gradients."""
    x = x.detach()
    if len(x) == 0:  # Poisson sampling draws empty batches; FFTs refuse them, so shape by one
        with torch.no_grad():
            return compute(x.new_zeros((1, *x.shape[1:])))[:0].cpu().to(x.device)
    keys = [_key(tag, case) for case in x]
    rows = {k: _CACHE[k] for k in keys if k in _CACHE}
    missing = [i for i, k in enumerate(keys) if k not in rows]
    if missing:
        with torch.no_grad():
            fresh = torch.cat(
                [compute(x[missing[i : i + chunk]]).cpu() for i in range(0, len(missing), chunk)]
            )
        for i, features in zip(missing, fresh, strict=True):
            rows[keys[i]] = features.clone()
    for k, features in rows.items():
        _store(k, features)
    return torch.stack([rows[k] for k in keys]).to(x.device)


def _key(tag: str, case: torch.Tensor) -> bytes:
    h = hashlib.blake2b(tag.encode(), digest_size=16)
    h.update(repr((tuple(case.shape), str(case.dtype))).encode())
    h.update(case.cpu().contiguous().numpy().tobytes())
    return h.digest()


def _store(key: bytes, features: torch.Tensor) -> None:
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return
    _CACHE[key] = features
    _SIZE[0] += features.numel() * features.element_size()
    while _SIZE[0] > CACHE_BYTES and len(_CACHE) > 1:
        _, old = _CACHE.popitem(last=False)  # least recently used first
        _SIZE[0] -= old.numel() * old.element_size()


def clear() -> None:
    """Forget every memoised feature (tests; a process that wants its memory back)."""
    _CACHE.clear()
    _SIZE[0] = 0
