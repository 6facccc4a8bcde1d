"""LAION-style aesthetic score: a linear or MLP head on L2-normalised CLIP image embeddings.

The LAION "improved aesthetic predictor" (v2) is an MLP 768→1024→128→64→16→1 with dropout and no
non-linearities on OpenAI CLIP ViT-L/14 embeddings (weights file `sac+logos+ava1-l14-linearMSE.pth`);
v1 is a single linear layer. The head's layer names (`layers.*`) follow that state-dict layout.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from rewards.base import RewardOutput
from rewards.image.clip import ClipScore, build_tiny_open_clip

HeadKind = Literal["mlp", "linear"]


class AestheticHead(nn.Module):
    """score = head(embedding); "mlp" = LAION v2 layout (no activations), "linear" = one Linear."""

    def __init__(self, embed_dim: int = 768, kind: HeadKind = "mlp") -> None:
        super().__init__()
        if kind not in ("mlp", "linear"):
            raise ValueError(f"kind={kind!r} is not supported; allowed: ['mlp', 'linear']")
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(embed_dim, 1))
        else:
            self.layers = nn.Sequential(
                nn.Linear(embed_dim, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N]."""
        return self.layers(embeddings).squeeze(-1)  # type: ignore[no-any-return]


class AestheticScore:
    """Aesthetic head on normalised CLIP image embeddings, as a RewardModel (captions are ignored).

    Args:
        clip: a ClipScore whose image tower embeds the images (default: OpenAI CLIP ViT-L/14).
        head: "mlp" (LAION v2) or "linear" (v1).
        weights: path of the head's state dict (a `.pth` with `layers.*` keys, or {"state_dict": ...});
            None keeps a random head (tests only).
        normalize_embeddings: L2-normalise the CLIP embeddings first (as LAION's predictor).
        name: the component name.
    """

    def __init__(
        self,
        clip: ClipScore | None = None,
        head: HeadKind = "mlp",
        weights: str | None = None,
        normalize_embeddings: bool = True,
        name: str = "aesthetic",
    ) -> None:
        self.clip = clip if clip is not None else ClipScore("ViT-L-14", pretrained="openai")
        embed_dim = int(getattr(self.clip.model, "embed_dim", 0) or self.clip.model.visual.output_dim)
        self.head = AestheticHead(embed_dim, head).eval().to(self.clip.device)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.head.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        self.normalize_embeddings, self.name = normalize_embeddings, name

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        if len(samples) == 0:
            return RewardOutput(scores=torch.zeros(0), components={self.name: torch.zeros(0)})
        began = time.perf_counter()
        embeddings = self.clip.embed_images(samples)
        if self.normalize_embeddings:
            embeddings = F.normalize(embeddings, dim=-1)
        scores = self.head(embeddings.to(self.clip.device)).float().cpu()
        metrics = {f"{self.name}/mean": float(scores.mean()), f"{self.name}/latency_s": time.perf_counter() - began}
        return RewardOutput(scores=scores, components={self.name: scores.clone()}, metrics=metrics)


def tiny(seed: int = 0, head: HeadKind = "linear", name: str = "aesthetic") -> AestheticScore:
    """AestheticScore over a tiny random open_clip model and a random head (tiny recipes, tests)."""
    clip = ClipScore.from_model(build_tiny_open_clip(seed=seed))
    torch.manual_seed(seed + 1)
    return AestheticScore(clip=clip, head=head, name=name)
