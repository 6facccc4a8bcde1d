"""The DiDi-Instruct discriminator network and its per-token objective (arXiv:2509.25035).

`Discriminator` is a teacher-trunk copy with a spectral-norm per-token head; at the BCE optimum its logit
D(z, t) = log q_θ,t(z) − log q_ν,t(z). The clamped log-odds, the smoothed BCE and the sequence reward are pure
functions (spec docs/methods/didi_instruct.md §6, E4, E6); `discriminator.DiscriminatorReward` trains and uses them.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from modalities.diffusion_lm.backbone import DenoiserBackbone


def discriminator_log_odds(logits: Tensor, eps: float = 1e-6, clip: float | None = 8.0) -> Tensor:
    """ℓ = log(p + eps) − log(1 − p + eps), p = sigmoid(logits), clamped to ±clip (spec §6).

    Args:
        logits: [B, L] discriminator logits (any float dtype; computed in float32).
        eps: the log-odds eps (1e-6).
        clip: `reward_clip_val` (8.0), or None for no clamp.

    Returns:
        [B, L] float32 log-odds (≈ logits inside the clamp).
    """
    p = torch.sigmoid(logits.float())
    odds = torch.log(p + eps) - torch.log(1.0 - p + eps)
    return odds if clip is None else odds.clamp(-clip, clip)


def sequence_reward(logits: Tensor, mask: Tensor, eps: float = 1e-6, clip: float | None = 8.0) -> Tensor:
    """r_i = Σ_ℓ ℓ_iℓ·m_iℓ / (Σ_ℓ m_iℓ + 1e-8): clamped log-odds averaged over masked positions (spec §6, E4).

    Args:
        logits: [B, L] discriminator logits.
        mask: [B, L] bool, True where the scored input is masked.
        eps, clip: as in `discriminator_log_odds`.

    Returns:
        [B] float32 rewards (0 for a row without masked positions).
    """
    m = mask.float()
    return (discriminator_log_odds(logits, eps, clip) * m).sum(-1) / (m.sum(-1) + 1e-8)


def smoothed_bce(logits: Tensor, target: float, mask: Tensor) -> Tensor:
    """BCE-with-logits against a constant (smoothed) target, averaged over masked positions (spec §6, E6).

    Args:
        logits: [B, L] discriminator logits.
        target: the smoothed label (real 1 − s = 0.9, fake s = 0.1).
        mask: [B, L] bool, positions that count.

    Returns:
        Scalar float32 loss (0 when the mask is empty).
    """
    losses = F.binary_cross_entropy_with_logits(
        logits.float(), torch.full_like(logits.float(), target), reduction="none"
    )
    m = mask.float()
    return (losses * m).sum() / m.sum().clamp_min(1.0)


def discriminator_loss(
    real_logits: Tensor, real_mask: Tensor, fake_logits: Tensor, fake_mask: Tensor, label_smoothing: float = 0.1
) -> Tensor:
    """loss_D = ½(BCE(real, 1 − s) + BCE(fake, s)), each a mean over its masked positions (spec §6, §11).

    Args:
        real_logits, fake_logits: [B, L] logits on corrupted real / student sequences.
        real_mask, fake_mask: [B, L] bool masked positions of each side.
        label_smoothing: s (0.1).

    Returns:
        Scalar float32 loss.
    """
    real = smoothed_bce(real_logits, 1.0 - label_smoothing, real_mask)
    fake = smoothed_bce(fake_logits, label_smoothing, fake_mask)
    return 0.5 * (real + fake)


class Discriminator(nn.Module):
    """D_λ(z, σ) -> per-token logits [B, L]: a deep copy of a backbone's trunk + a spectral-norm MLP head.

    Only the last `num_trainable_blocks` blocks of the copied trunk and the head are trainable (spec §6:
    4 of 12 for MDLM-small). The copy's output layer stays in the module (frozen, unused): `features`
    stops before it. The head is `SN(Linear(H, H)) → SiLU → SN(Linear(H, 1))`, applied per token.
    Soft tokens ([B, L, V] floats) pass through the trunk as they do for the backbone (RGAS tilting).
    """

    def __init__(self, backbone: DenoiserBackbone, num_trainable_blocks: int = 4, head_hidden: int | None = None):
        """Copy `backbone` and set up the trainable parts.

        Args:
            backbone: the teacher trunk to copy (not modified).
            num_trainable_blocks: k last blocks left trainable (0 = head only); at most the number of blocks.
            head_hidden: the head's hidden width (default: the backbone's hidden size).
        """
        super().__init__()
        blocks = len(backbone.blocks)
        if not 0 <= num_trainable_blocks <= blocks:
            raise ValueError(f"num_trainable_blocks={num_trainable_blocks} must be in [0, {blocks}]")
        self.trunk: nn.Module = copy.deepcopy(backbone)  # type: ignore[assignment]
        self.trunk.requires_grad_(False)
        trunk_blocks: nn.ModuleList = self.trunk.blocks  # type: ignore[assignment]
        for block in list(trunk_blocks)[blocks - num_trainable_blocks :]:
            block.requires_grad_(True)
        hidden, width = backbone.hidden_size, head_hidden or backbone.hidden_size
        self.head = nn.Sequential(
            spectral_norm(nn.Linear(hidden, width)), nn.SiLU(), spectral_norm(nn.Linear(width, 1))
        )
        self.num_trainable_blocks = num_trainable_blocks
        self.mask_id: int = backbone.mask_id
        self.vocab_size: int = backbone.vocab_size

    def forward(self, tokens: Tensor, sigma: Tensor) -> Tensor:
        """Per-token logits [B, L] float32 of `tokens` ([B, L] ids or [B, L, V] soft tokens) at σ [B]."""
        hidden = self.trunk.features(tokens, sigma)  # type: ignore[operator]
        return self.head(hidden.float()).squeeze(-1).float()  # type: ignore[no-any-return]


def discriminator_from_teacher(
    teacher: nn.Module, num_trainable_blocks: int = 4, head_hidden: int | None = None
) -> Discriminator:
    """A `Discriminator` on a copy of `teacher`'s backbone (a MaskedDiffusionLM or a bare backbone); for configs."""
    backbone = getattr(teacher, "backbone", teacher)
    return Discriminator(backbone, num_trainable_blocks, head_hidden)  # type: ignore[arg-type]
