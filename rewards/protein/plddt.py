"""pLDDT of generated protein sequences under ESMFold (transformers' EsmForProteinFolding), GPU only.

DiDi-Instruct's protein experiment (arXiv:2509.25035, §16 of the spec) reports structure confidence
(pLDDT > 70 with 8-32 steps); the folding model is not stated, ESMFold is our choice. The weights
(`facebook/esmfold_v1`, ~8 GB) are a runtime dependency: they are never downloaded in tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rewards.base import RewardOutput
from rewards.protein.metrics import STANDARD_AMINO_ACIDS, sequence_of


def mean_plddt(plddt: Tensor, atom_mask: Tensor, scale: float = 100.0) -> Tensor:
    """Per-sequence mean pLDDT over existing atoms, as ESMFold reports it.

    Args:
        plddt: [B, L, 37] per-atom confidence in [0, 1] (transformers' `EsmForProteinFoldingOutput.plddt`).
        atom_mask: [B, L, 37] 1 where the atom exists (`atom37_atom_exists`, 0 on padding).
        scale: 100 gives the usual 0-100 scale.

    Returns:
        [B] float32; NaN for a row with no atom.
    """
    if plddt.shape != atom_mask.shape:
        raise ValueError(f"plddt {tuple(plddt.shape)} and atom_mask {tuple(atom_mask.shape)} differ in shape")
    mask = atom_mask.to(torch.float32)
    total = (plddt.float() * mask).sum(dim=(1, 2))
    count = mask.sum(dim=(1, 2))
    return torch.where(count > 0, scale * total / count.clamp_min(1.0), torch.full_like(total, math.nan))


class ESMFoldPLDDTReward:
    """RewardModel: mean pLDDT (0-100) of each sample folded by ESMFold; NaN for an invalid sample.

    The model loads lazily on the first call. Without a CUDA device (and `require_gpu=True`), or when the
    weights cannot be loaded (offline, not cached), the call raises a RuntimeError saying why.

    Args:
        model_name: a hub id or local folder of `transformers.EsmForProteinFolding` weights.
        device: torch device for folding ("cuda" by default).
        batch_size: sequences folded per forward.
        max_length: longer sequences are scored NaN (ESMFold memory grows with L^2).
        require_gpu: refuse to fold on CPU (minutes per sequence for the real model).
        fp16_trunk: run the ESM-2 language-model trunk in fp16, as ESMFold's authors recommend on GPU.
    """

    def __init__(
        self,
        model_name: str = "facebook/esmfold_v1",
        device: str = "cuda",
        batch_size: int = 4,
        max_length: int = 1024,
        require_gpu: bool = True,
        fp16_trunk: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name, self.device, self.batch_size = model_name, device, batch_size
        self.max_length, self.require_gpu, self.fp16_trunk = max_length, require_gpu, fp16_trunk
        self.model: Any = None

    def load(self) -> Any:
        """Load (once) and return the folding model."""
        if self.model is not None:
            return self.model
        if self.require_gpu and not (self.device.startswith("cuda") and torch.cuda.is_available()):
            raise RuntimeError(
                f"ESMFold pLDDT needs a CUDA GPU (device={self.device!r}, cuda available: "
                f"{torch.cuda.is_available()}); use the CPU metrics in rewards.protein.metrics instead"
            )
        from transformers import EsmForProteinFolding

        try:
            model: Any = EsmForProteinFolding.from_pretrained(self.model_name)
        except OSError as error:
            raise RuntimeError(
                f"could not load ESMFold weights {self.model_name!r} (offline or not cached?): {error}"
            ) from error
        if self.fp16_trunk and self.device.startswith("cuda"):
            model.esm = model.esm.half()
        self.model = model.to(self.device).eval()
        return self.model

    @torch.no_grad()
    def fold(self, sequences: Sequence[str]) -> Tensor:
        """Mean pLDDT [N] of valid residue strings (no length or alphabet check here)."""
        model = self.load()
        scores = []
        for start in range(0, len(sequences), self.batch_size):
            output = model.infer(list(sequences[start : start + self.batch_size]))
            scores.append(mean_plddt(output["plddt"], output["atom37_atom_exists"]).cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        sequences = [sequence_of(sample) for sample in samples]
        ok = [bool(s) and len(s) <= self.max_length and set(s) <= set(STANDARD_AMINO_ACIDS) for s in sequences]
        scores = torch.full((len(sequences),), math.nan)
        kept = [i for i, flag in enumerate(ok) if flag]
        if kept:
            scores[kept] = self.fold([sequences[i] for i in kept])
        valid = scores[~scores.isnan()]
        metrics = {"mean_plddt": float(valid.mean()) if len(valid) else math.nan, "folded": float(len(kept))}
        if len(valid):
            metrics["plddt_above_70"] = float((valid > 70).float().mean())
        return RewardOutput(scores=scores, components={"plddt": scores.clone()}, metrics=metrics)
