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

`persisted(path)` keeps the features a block of code used in a file as well (a node's own
cache folder, next to its decoded cases): the next process, round or run on the same cases
starts with them instead of recomputing (round 1 of the 2D demo computed ~5,000 scatterings).

Hashing a case to find its features costs ~3 ms a MB (filterbank-3d: 0.4 s a step of 128
64^3 cases, most of the step). `known(cases)` registers the tensor a node samples its
batches from: a batch row is then matched to its row there by a fingerprint (a few hundred
of its values), confirmed byte for byte (~0.2 ms a MB), and its key hashed once per row,
front end and process. A changed case never matches a row it no longer equals, and an
in-place change of the registered tensor drops the registration.

Cheaper still, a batch that a loader gathered from a registered tensor says which rows it
holds (`CaseRows`, the dataset local_sgd samples from, and `rows_of`): its features are then
one gather from a dense per-source table, with no per-case work at all once every row was
computed (the 2D demo's step spent ~15 % finding 64 rows' features one by one).
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset, default_collate

from common.files import atomic_write

CACHE_BYTES = 512 * 2**20  # at most this much memoised feature data in a process
DENSE_BYTES = 256 * 2**20  # a source's dense table (its rows' features) at most this large
_CACHE: OrderedDict[bytes, torch.Tensor] = OrderedDict()
_SIZE = [0]  # bytes held in _CACHE
FILE_FORMAT = 2
FEATURES_FILE = "features.fedvox-cache.pt"  # the name `persisted` files get in a cache folder
_LOADED: dict[Path, set[bytes]] = {}  # file -> the keys it holds (read once per process)
SAMPLES = 256  # values of a case its fingerprint reads
_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.uint8, torch.int16, torch.int32}


class _Block(set):
    """The keys a `persisted` block used; `fresh`: some were computed in it."""

    fresh = False


_BLOCKS: list[_Block] = []


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
    dense = _dense_lookup(tag, x)
    if dense is not None:
        return dense
    noted = _noted(x)
    x = x.detach()
    if len(x) == 0:  # Poisson sampling draws empty batches; FFTs refuse them, so shape by one
        with torch.no_grad():
            return compute(x.new_zeros((1, *x.shape[1:])))[:0].cpu().to(x.device)
    keys = _keys(tag, x)
    rows = {k: _CACHE[k] for k in keys if k in _CACHE}
    missing = [i for i, k in enumerate(keys) if k not in rows]
    for block in _BLOCKS:
        block.update(keys)
        block.fresh = block.fresh or bool(missing)
    if missing:
        with torch.no_grad():
            fresh = torch.cat(
                [compute(x[missing[i : i + chunk]]).cpu() for i in range(0, len(missing), chunk)]
            )
        for i, features in zip(missing, fresh, strict=True):
            rows[keys[i]] = features.clone()
    for k, features in rows.items():
        _store(k, features)
    out = torch.stack([rows[k] for k in keys])
    if noted is not None:
        noted[0].fill(tag, noted[1], out, keys)
    return out.to(x.device)


class _Source:
    """A registered tensor of cases: its rows by fingerprint, and each row's keys so far."""

    def __init__(self, cases: torch.Tensor) -> None:
        ident = id(cases)  # not `cases`: the callback must not keep it alive
        self.ref = weakref.ref(cases, lambda _: _SOURCES.pop(ident, None))
        self.version = cases._version  # torch counts in-place changes (of views too)
        self.rows: dict[bytes, list[int]] = {}
        for i, fp in enumerate(_fingerprints(cases)):
            self.rows.setdefault(fp, []).append(i)
        self.keys: dict[tuple[str, int], bytes] = {}
        self.dense: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # tag -> (rows, filled)

    def current(self) -> torch.Tensor | None:
        """The registered tensor, or None once it is gone or changed in place."""
        cases = self.ref()
        return cases if cases is not None and cases._version == self.version else None

    def fill(self, tag: str, index: torch.Tensor, features: torch.Tensor, keys: list) -> None:
        """Rows `index` have `features` (keys: theirs): kept densely, when small enough."""
        cases = self.current()
        if cases is None or len(index) == 0:
            return
        if tag not in self.dense:
            size = len(cases) * features[0].numel() * features.element_size()
            if _DENSE_SIZE[0] + size > DENSE_BYTES:
                return  # over the budget: this source's rows stay per case
            table = torch.zeros((len(cases), *features.shape[1:]), dtype=features.dtype)
            self.dense[tag] = (table, torch.zeros(len(cases), dtype=torch.bool))
            _DENSE_SIZE[0] += size
            weakref.finalize(self, _give_back_dense, size)  # when the source goes
        table, filled = self.dense[tag]
        if table.shape[1:] != features.shape[1:] or table.dtype != features.dtype:
            return
        table[index] = features
        filled[index] = True
        for i, k in zip(index.tolist(), keys, strict=True):
            self.keys[(tag, i)] = k

    def key(self, tag: str, case: torch.Tensor, fp: bytes) -> bytes | None:
        """`case`'s key if it is, byte for byte, one of this tensor's rows; else None."""
        cases = self.current()
        if cases is None:
            return None
        for i in self.rows.get(fp, ()):
            if _same_bytes(cases[i], case):
                if (tag, i) not in self.keys:
                    self.keys[(tag, i)] = _key(tag, case)
                return self.keys[(tag, i)]
        return None


_SOURCES: dict[int, _Source] = {}
_DENSE_SIZE = [0]  # bytes held in every source's dense tables


def _give_back_dense(size: int) -> None:
    _DENSE_SIZE[0] = max(0, _DENSE_SIZE[0] - size)


def known(cases: torch.Tensor) -> None:
    """Let `memoised` find the features of rows of `cases` (cases along dim 0: the tensor a
    node samples its batches from) without hashing each case of each batch: registered
    once per tensor and process (again after an in-place change), forgotten with it."""
    source = _SOURCES.get(id(cases))
    if source is not None and source.ref() is cases and source.version == cases._version:
        return
    if cases.device.type == "cpu" and len(cases) and cases.dtype in _NUMPY_DTYPES:
        _SOURCES[id(cases)] = _Source(cases)


# id(batch) -> (the batch, its version when noted, its source, its rows there)
_NOTED: dict[int, tuple[weakref.ref, int, _Source, torch.Tensor]] = {}


def rows_of(batch: torch.Tensor, cases: torch.Tensor, index: torch.Tensor) -> None:
    """Note that `batch` was gathered as `cases[index]` (cases registered with `known`), so
    `memoised` finds its features by row. Forgotten with the batch, and ignored after an
    in-place change of either tensor."""
    source = _SOURCES.get(id(cases))
    if source is None or source.current() is not cases:
        return
    ident = id(batch)
    ref = weakref.ref(batch, lambda _: _NOTED.pop(ident, None))
    _NOTED[ident] = (ref, batch._version, source, index)


def _noted(x: torch.Tensor) -> tuple[_Source, torch.Tensor] | None:
    """(source, rows) of a noted batch `x`, unchanged since; else None."""
    entry = _NOTED.get(id(x))
    if entry is None or entry[0]() is not x or entry[1] != x._version:
        return None
    source, index = entry[2], entry[3]
    return (source, index) if source.current() is not None else None


def _dense_lookup(tag: str, x: torch.Tensor) -> torch.Tensor | None:
    """`x`'s features by one gather, where `x` is a noted batch of a source whose rows were
    all computed before; else None (the caller goes the per-case way)."""
    noted = _noted(x)
    if noted is None or tag not in noted[0].dense:
        return None
    source, index = noted
    table, filled = source.dense[tag]
    if len(index) == 0 or not bool(filled[index].all()):
        return None
    for block in _BLOCKS:
        block.update(source.keys[(tag, i)] for i in index.tolist())
    return table[index].to(x.device)


class CaseRows(TensorDataset):
    """A TensorDataset whose batches say which rows they are (`rows_of`): a loader over it
    gathers each batch with one index per tensor instead of stacking cases one by one, and
    a fixed front end finds the batch's features by row. Use with `collate_rows`.

    `view(*tensors, rows) -> batch`, when set, makes each batch from the rows directly (a
    model's training view: client/train.py), so whole cases are never gathered."""

    view: Any = None

    def __getitems__(self, indices: list[int]) -> _Picked:
        return _Picked(self, indices)


class _Picked(list):
    def __init__(self, dataset: CaseRows, indices: list[int]) -> None:
        super().__init__(indices)
        self.dataset = dataset


def collate_rows(batch: list) -> Any:
    """The loader's collate for `CaseRows` (anything else: torch's default)."""
    if not isinstance(batch, _Picked):
        return default_collate(batch)
    index = torch.as_tensor(list(batch), dtype=torch.long)
    tensors = batch.dataset.tensors
    view = getattr(batch.dataset, "view", None)
    if view is not None:  # a model's training view of the rows (slice-unet: slice stacks)
        return list(view(*tensors, index))
    out = [t[index] for t in tensors]
    rows_of(out[0], tensors[0], index)
    return out


def _fingerprints(x: torch.Tensor) -> list[bytes]:
    """Each case's shape, dtype and SAMPLES of its values, spread over it (cheap; equal
    cases have equal fingerprints, most unequal ones differ)."""
    flat = x.detach().reshape(len(x), -1)
    size = flat.shape[1]
    positions = (torch.arange(min(SAMPLES, size)) * 2654435761) % max(size, 1)
    head = repr((tuple(x.shape[1:]), str(x.dtype))).encode()
    values = flat[:, positions].cpu().contiguous().numpy()
    return [head + row.tobytes() for row in values]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().contiguous().numpy(), b.detach().cpu().contiguous().numpy()
    return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def _keys(tag: str, x: torch.Tensor) -> list[bytes]:
    """Each case's key: from a registered tensor it is a row of, else hashed."""
    sources = [s for s in list(_SOURCES.values()) if s.ref() is not None]
    if not sources:
        return [_key(tag, case) for case in x]
    keys = []
    for case, fp in zip(x, _fingerprints(x), strict=True):
        found = next((k for s in sources if (k := s.key(tag, case, fp)) is not None), None)
        keys.append(found or _key(tag, case))
    return keys


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
    _LOADED.clear()
    _SOURCES.clear()
    _NOTED.clear()
    _SIZE[0] = 0


@contextmanager
def persisted(path: Path | None) -> Iterator[None]:
    """Features memoised inside the block are read from `path` first (once per process) and,
    when the block computed any afresh, written back with every feature the block used, so a
    later process finds them. None: memory only. An unreadable file is ignored (and replaced);
    a file that cannot be written costs only the time saved."""
    if path is None:
        yield
        return
    path = Path(path)
    if path not in _LOADED:
        _LOADED[path] = _load(path)
    block = _Block()
    _BLOCKS.append(block)
    try:
        yield
    finally:
        _BLOCKS.remove(block)
    if block.fresh:
        keep = [k for k in _LOADED[path] | block if k in _CACHE]
        try:
            atomic_write(path, lambda f: torch.save(_entries(keep), f))
            _LOADED[path] = set(keep)
        except OSError:
            pass


def _entries(keys: list[bytes]) -> dict:
    """One stacked tensor per feature shape (thousands of small tensors save ~5x slower)."""
    groups: dict[tuple, list[bytes]] = {}
    for k in keys:
        groups.setdefault((tuple(_CACHE[k].shape), str(_CACHE[k].dtype)), []).append(k)
    return {
        "format": FILE_FORMAT,
        "groups": [
            {"keys": [k.hex() for k in ks], "rows": torch.stack([_CACHE[k] for k in ks])}
            for ks in groups.values()
        ],
    }


def _load(path: Path) -> set[bytes]:
    try:
        saved = torch.load(path, weights_only=True)
        if saved.get("format") != FILE_FORMAT:
            return set()
        keys: set[bytes] = set()
        for group in saved["groups"]:
            for key, features in zip(group["keys"], group["rows"], strict=True):
                _store(bytes.fromhex(key), features.clone())  # its own memory, to be evicted
                keys.add(bytes.fromhex(key))
        return keys
    except Exception:  # noqa: BLE001 - missing, another version's or damaged: computed afresh
        return set()
