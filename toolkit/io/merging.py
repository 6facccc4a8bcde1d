"""DLER update-selective weight merging (arXiv:2510.15110 §4.6; no released code).

Δ = θ_tuned - θ_base; keep the top-`density` fraction of |Δ| (per tensor by default, or globally over
all tensors), scale it and add it back: θ = θ_base + scale · (M ⊙ Δ). Works on in-memory state dicts and
on Hugging Face safetensors checkpoints (single file or sharded with an index), shard by shard; the
global threshold is found exactly in two streaming passes (radix select on the float32 bit patterns).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from toolkit.io.checkpoint import COMPLETE, META_FILE, OBJECTS_FILE, RNG_FILE
from toolkit.reward_transforms.common import check_choice

Scope = Literal["tensor", "global"]
Ties = Literal["keep_all", "exact"]
PairStream = Callable[[], Iterator[tuple[str, Tensor, Tensor]]]
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# What a renorm training checkpoint holds besides its weights: resume state, not part of a model folder.
CHECKPOINT_BOOKKEEPING = frozenset({COMPLETE, META_FILE, OBJECTS_FILE, RNG_FILE})


def num_kept(numel: int, density: float) -> int:
    """k = floor(density · n), at least 1 when density > 0 (spec reference); 0 when density == 0.

    A 1e-9 slack absorbs float error in density · n (0.29 · 100 = 28.999999999999996 -> 29).
    """
    if numel == 0 or density == 0:
        return 0
    return min(numel, max(1, int(math.floor(density * numel + 1e-9))))


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _bit_chunks(a: Tensor, chunk: int = 1 << 24) -> Iterator[Tensor]:
    """int32 bit patterns of `a` (non-negative float32) in bounded-memory chunks."""
    flat = a.float().flatten()
    for start in range(0, flat.numel(), chunk):
        yield flat[start : start + chunk].view(torch.int32)


def kth_largest(magnitudes: Callable[[], Iterable[Tensor]], k: int) -> float:
    """Exact k-th largest value over a stream of non-negative float32 tensors, in two passes.

    `magnitudes()` must yield the same tensors each time it is called. Non-negative float32 values order
    like their int32 bit patterns, so a 2-level radix select on the high and low 16 bits is exact.
    """
    hist_hi = torch.zeros(1 << 15, dtype=torch.int64)
    for a in magnitudes():
        for bits in _bit_chunks(a):
            hist_hi += torch.bincount(bits >> 16, minlength=1 << 15).cpu()
    total = int(hist_hi.sum())
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must lie in [1, {total}]")
    above = torch.cumsum(hist_hi.flip(0), 0).flip(0)  # above[b] = number of values whose high bits are >= b
    hi = int((above >= k).nonzero().max())
    k_in_bin = k - (int(above[hi + 1]) if hi + 1 < above.numel() else 0)
    hist_lo = torch.zeros(1 << 16, dtype=torch.int64)
    for a in magnitudes():
        for bits in _bit_chunks(a):
            hist_lo += torch.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=1 << 16).cpu()
    above_lo = torch.cumsum(hist_lo.flip(0), 0).flip(0)
    lo = int((above_lo >= k_in_bin).nonzero().max())
    return float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32))


def merge_tensor(base: Tensor, tuned: Tensor, threshold: float, scale: float, quota: int | None = None) -> Tensor:
    """θ_base + scale · Δ where |Δ| >= threshold, cast back to base's dtype.

    Δ is computed in fp32 (fp64 if either input is fp64); |Δ| is ranked in fp32.

    Where a position is kept and scale == 1 the tuned value is copied exactly; dropped positions keep the
    base value exactly. `quota` (tie mode "exact"): keep every |Δ| > threshold and only the first `quota`
    positions (flattened order) with |Δ| == threshold.
    """
    dtype = _compute_dtype(base, tuned)
    b, t = base.to(dtype), tuned.to(dtype)
    delta = t - b
    magnitude = delta.abs().float()
    keep = magnitude >= threshold
    if quota is not None:
        ties = (magnitude == threshold).flatten()
        order = ties.cumsum(0) <= quota
        keep = (magnitude > threshold) | (ties & order).reshape(magnitude.shape)
    kept_value = t if scale == 1.0 else b + scale * delta
    return torch.where(keep, kept_value, b).to(base.dtype)


def _magnitude(base: Tensor, tuned: Tensor) -> Tensor:
    """|Δ| in float32 (Δ computed in the compute dtype), the quantity every threshold ranks."""
    dtype = _compute_dtype(base, tuned)
    return (tuned.to(dtype) - base.to(dtype)).abs().float()


def _check_pair(name: str, base: Tensor, tuned: Tensor) -> bool:
    """Validate one tensor pair; True when it takes part in merging (floating point)."""
    if base.shape != tuned.shape:
        raise ValueError(f"shape mismatch for {name!r}: base {tuple(base.shape)} vs tuned {tuple(tuned.shape)}")
    if not (base.is_floating_point() and tuned.is_floating_point()):
        if not torch.equal(base, tuned.to(base.dtype)):
            raise ValueError(f"non-floating tensor {name!r} differs between base and tuned; cannot merge it")
        return False
    delta = tuned.float() - base.float()
    if not bool(torch.isfinite(delta).all()):
        raise ValueError(f"tensor {name!r} has non-finite values in base or tuned")
    return True


def _check_keys(base: Iterable[str], tuned: Iterable[str]) -> None:
    base_keys, tuned_keys = set(base), set(tuned)
    if base_keys != tuned_keys:
        missing, extra = sorted(base_keys - tuned_keys)[:5], sorted(tuned_keys - base_keys)[:5]
        raise ValueError(f"state dict keys differ: missing in tuned {missing}, only in tuned {extra}")


class _Plan:
    """Per-tensor or global thresholds (and tie quotas) for a set of named tensor pairs."""

    def __init__(self, density: float, scope: Scope, ties: Ties, keep_base: Sequence[str], pairs: PairStream) -> None:
        check_choice("scope", scope, ("tensor", "global"))
        check_choice("ties", ties, ("keep_all", "exact"))
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        self.density, self.scope, self.ties = density, scope, ties
        self.patterns = [re.compile(p) for p in keep_base]
        self.global_threshold: float | None = None
        self.global_quota: int | None = None
        if scope == "global":
            self._fit_global(pairs)

    def merged(self, name: str) -> bool:
        return not any(p.search(name) for p in self.patterns)

    def _fit_global(self, pairs: PairStream) -> None:
        def magnitudes() -> Iterator[Tensor]:
            for name, base, tuned in pairs():
                if self.merged(name) and _check_pair(name, base, tuned):
                    yield _magnitude(base, tuned)

        total = sum(a.numel() for a in magnitudes())
        k = num_kept(total, self.density)
        if k == 0:
            return
        self.global_threshold = kth_largest(magnitudes, k)
        if self.ties == "exact":
            self.global_quota = k - sum(int((a > self.global_threshold).sum()) for a in magnitudes())

    def apply(self, name: str, base: Tensor, tuned: Tensor, scale: float) -> Tensor:
        if not _check_pair(name, base, tuned) or not self.merged(name):
            return base.clone()
        if self.scope == "global":
            if self.global_threshold is None:
                return base.clone()
            quota = self.global_quota
            if quota is not None:  # running quota across tensors, in visiting order
                ties = int((_magnitude(base, tuned) == self.global_threshold).sum())
                self.global_quota = max(0, quota - ties)
            return merge_tensor(base, tuned, self.global_threshold, scale, quota)
        magnitude = _magnitude(base, tuned).flatten()
        k = num_kept(magnitude.numel(), self.density)
        if k == 0:
            return base.clone()
        threshold = float(torch.kthvalue(magnitude, magnitude.numel() - k + 1).values)
        quota = k - int((magnitude > threshold).sum()) if self.ties == "exact" else None
        return merge_tensor(base, tuned, threshold, scale, quota)


@torch.no_grad()
def update_selective_merge(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    density: float = 0.25,
    scale: float = 0.7,
    scope: Scope = "tensor",
    ties: Ties = "keep_all",
    keep_base: Sequence[str] = (),
) -> dict[str, Tensor]:
    """DLER update-selective merge of two state dicts (arXiv:2510.15110 §4.6).

    Args:
        base: θ_base state dict.
        tuned: θ_tuned (DLER) state dict with the same keys and shapes.
        density: fraction of |Δ| entries kept (0.25); k = max(1, floor(density · n)), 0 for density 0.
        scale: factor on the kept Δ (0.7).
        scope: "tensor" ranks |Δ| within each tensor (default [Our decision]); "global" over all tensors.
        ties: "keep_all" keeps every |Δ| >= the k-th largest (spec: may keep more than k); "exact" keeps
            exactly k, breaking ties by flattened position (and key order for "global").
        keep_base: regexes of tensor names left at the base weights (e.g. embeddings or norms).

    Returns:
        Merged state dict with base's dtypes. Non-floating tensors must be equal and are copied.
    """
    _check_keys(base, tuned)
    names = list(base)

    def pairs() -> Iterator[tuple[str, Tensor, Tensor]]:
        return ((name, base[name], tuned[name]) for name in names)

    plan = _Plan(density, scope, ties, keep_base, pairs)
    return {name: plan.apply(name, base[name], tuned[name], scale) for name in names}


def _weight_map(directory: Path) -> dict[str, str]:
    """tensor name -> shard file name of a safetensors checkpoint directory."""
    index = directory / INDEX_NAME
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = directory / SINGLE_NAME
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_NAME)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    raise FileNotFoundError(
        f"no {SINGLE_NAME} or {INDEX_NAME} in {str(directory)!r} (only safetensors checkpoints are supported)"
    )


class _Reader:
    """Lazy tensor access across the shards of one checkpoint (one open shard at a time)."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.weight_map = directory, _weight_map(directory)
        self._name: str | None = None
        self._handle: object = None

    def get(self, key: str) -> Tensor:
        shard = self.weight_map[key]
        if shard != self._name:
            self._handle = safe_open(str(self.directory / shard), framework="pt")
            self._name = shard
        return self._handle.get_tensor(key)  # type: ignore[attr-defined, no-any-return]


def merge_checkpoints(
    base_dir: str | Path,
    tuned_dir: str | Path,
    out_dir: str | Path,
    density: float = 0.25,
    scale: float = 0.7,
    scope: Scope = "tensor",
    ties: Ties = "keep_all",
    keep_base: Sequence[str] = (),
    overwrite: bool = False,
) -> dict[str, float]:
    """`update_selective_merge` over Hugging Face safetensors checkpoint directories, shard by shard.

    The output mirrors the base checkpoint's sharding (same shard names; index json with the weight map
    and total size) and safetensors metadata, and gets the model's side files (`_copy_side_files`: the base's
    config.json, generation_config.json, tokenizer files when it is a Hugging Face folder), so
    `from_pretrained(out_dir)` loads it. Memory: one base shard plus its tuned tensors.

    Returns:
        Statistics: `merge/tensors`, `merge/kept_frac` (fraction of floating entries changed), `merge/shards`.
    """
    base_dir, tuned_dir, out_dir = Path(base_dir), Path(tuned_dir), Path(out_dir)
    if out_dir.resolve() in (base_dir.resolve(), tuned_dir.resolve()):
        raise ValueError(f"out_dir {str(out_dir)!r} must differ from the input checkpoints")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir {str(out_dir)!r} is not empty (pass overwrite=True)")
    base, tuned = _Reader(base_dir), _Reader(tuned_dir)
    _check_keys(base.weight_map, tuned.weight_map)
    shards: dict[str, list[str]] = {}
    for name, shard in base.weight_map.items():
        shards.setdefault(shard, []).append(name)
    order = [name for names in shards.values() for name in names]

    def pairs() -> Iterator[tuple[str, Tensor, Tensor]]:
        return ((name, base.get(name), tuned.get(name)) for name in order)

    plan = _Plan(density, scope, ties, keep_base, pairs)
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = total = size = 0
    for shard, names in shards.items():
        merged: dict[str, Tensor] = {}
        for name in names:
            b = base.get(name)
            merged[name] = plan.apply(name, b, tuned.get(name), scale).contiguous()
            if b.is_floating_point():
                changed += int((merged[name] != b).sum())
                total += b.numel()
            size += merged[name].numel() * merged[name].element_size()
        with safe_open(str(base_dir / shard), framework="pt") as f:
            metadata = f.metadata()
        save_file(merged, str(out_dir / shard), metadata=metadata or {"format": "pt"})
    if (base_dir / INDEX_NAME).is_file():
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(base.weight_map.items()))}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    _copy_side_files(base_dir, tuned_dir, out_dir)
    return {
        "merge/tensors": float(len(order)),
        "merge/kept_frac": changed / total if total else 0.0,
        "merge/shards": float(len(shards)),
    }


def _copy_side_files(base_dir: Path, tuned_dir: Path, out_dir: Path) -> None:
    """Copy the model's top-level side files (config, generation config, tokenizer, chat template, ...) to `out_dir`.

    They come from the base when it is a Hugging Face folder (it has config.json): the merged weights have the
    base's names, dtypes and sharding. Otherwise from the tuned checkpoint. Weights are never copied, nor a
    renorm training checkpoint's bookkeeping (COMPLETE manifest, optimizer/RNG state, meta.json): it
    describes the tuned weights and their run, not the merged ones.
    """
    source = base_dir if (base_dir / "config.json").is_file() else tuned_dir
    for path in source.iterdir():
        is_weight = path.suffix in (".safetensors", ".bin", ".pt", ".pth") or path.name.endswith(".index.json")
        if path.is_file() and not is_weight and path.name not in CHECKPOINT_BOOKKEEPING:
            shutil.copy2(path, out_dir / path.name)
