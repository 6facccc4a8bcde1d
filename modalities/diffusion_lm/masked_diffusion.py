"""Masked (absorbing-state) diffusion LM: corruption, SUBS parameterisation, the MDLM NELBO, sampling.

Spec docs/methods/didi_instruct.md §2 (MDLM arXiv:2406.07524 Eq. 10–11: SUBS; continuous-time NELBO with antithetic t).
`MaskedDiffusionLM` wraps any `DenoiserBackbone`; the backbone may run in bf16 (`mixed_precision`), the
log-probs, the NELBO weights and the schedule are float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalities.diffusion_lm.backbone import DenoiserBackbone, autocast_context, check_mixed_precision
from modalities.diffusion_lm.sampling import FINAL_MODES, T_MIN, AncestralSampler
from modalities.diffusion_lm.schedules import MaskingSchedule, make_schedule

NEG_INF = -1e6  # SUBS "−∞" (official value)
SAMPLING_EPS = 1e-3  # lower bound of training times t (MDLM `sampling_eps`)


def corrupt(x: Tensor, alpha: Tensor, mask_id: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Absorbing forward process q(z_t | x): each token is masked independently with probability 1 − α_t.

    Args:
        x: [B, L] clean ids. alpha: [B] α_t per row (or a scalar). mask_id: the mask id.

    Returns:
        (z [B, L], masked [B, L] bool) with z = where(masked, mask_id, x) (spec §2).
    """
    alpha = torch.as_tensor(alpha, device=x.device, dtype=torch.float32).reshape(-1, 1)
    noise = torch.rand(x.shape, generator=generator, device=x.device)
    masked = noise < 1 - alpha
    return torch.where(masked, torch.full_like(x, mask_id), x), masked


def subs_log_probs(logits: Tensor, z: Tensor, mask_id: int) -> Tensor:
    """SUBS output processing (spec §2): [B, L, V] float32 log x_θ.

    The mask logit is set to −1e6 before a log-softmax over V (zero mass on the mask); positions where z is
    not the mask get the carry-over one-hot (log p = 0 on z, −1e6 elsewhere).
    """
    logits = logits.float()
    mask_column = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    mask_column[mask_id] = True
    log_probs = torch.log_softmax(logits.masked_fill(mask_column, NEG_INF), dim=-1)
    carry = torch.full_like(log_probs, NEG_INF).scatter(-1, z.unsqueeze(-1), 0.0)
    return torch.where((z == mask_id).unsqueeze(-1), log_probs, carry)


def antithetic_times(
    batch_size: int,
    generator: torch.Generator | None = None,
    eps: float = SAMPLING_EPS,
    device: torch.device | None = None,
) -> Tensor:
    """Low-discrepancy t [B] on [eps, 1]: (u + i/B) mod 1 rescaled (MDLM `_sample_t`), float32."""
    u = torch.rand(1, generator=generator, device=device)
    t = (u + torch.arange(batch_size, device=device) / batch_size) % 1
    return (1 - eps) * t + eps


def nelbo_per_token(log_probs: Tensor, x: Tensor, masked: Tensor, weight: Tensor) -> Tensor:
    """MDLM continuous-time NELBO terms [B, L]: −log x_θ(x) · (−α'_t/(1 − α_t)) on masked positions, 0 elsewhere.

    Args:
        log_probs: [B, L, V] SUBS log-probs. x: [B, L] clean ids. masked: [B, L] bool. weight: [B] −α'/(1−α).
    """
    log_px = log_probs.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    return -log_px * weight.float().unsqueeze(-1) * masked


class MaskedDiffusionLM(nn.Module):
    """A masked diffusion LM = a denoiser backbone + a masking schedule + SUBS (spec §2–3).

    Args:
        backbone: a `DenoiserBackbone` (our `DiT`, an adapted ESM ...).
        schedule: "loglinear" (ε = 1e-3), "linear", "cosine", or a schedule object.
        time_conditioning: feed the backbone the real σ_t; False (MDLM teachers) feeds σ = 0.
        mixed_precision: "no" or "bf16" (autocast around the backbone; log-probs stay float32).
        final: noise removal after the last sampling step: "sample", "argmax" or "none".
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: str | MaskingSchedule = "loglinear",
        time_conditioning: bool = False,
        mixed_precision: str = "no",
        final: str = "sample",
    ) -> None:
        super().__init__()
        if not isinstance(backbone, DenoiserBackbone):
            raise ValueError(f"backbone {type(backbone).__name__} does not implement DenoiserBackbone")
        check_mixed_precision(mixed_precision)
        if final not in FINAL_MODES:
            raise ValueError(f"final must be one of {FINAL_MODES}, got {final!r}")
        self.backbone = backbone
        self.schedule = make_schedule(schedule) if isinstance(schedule, str) else schedule
        self.time_conditioning, self.mixed_precision, self.final = time_conditioning, mixed_precision, final
        self.mask_id: int = backbone.mask_id
        self.vocab_size: int = backbone.vocab_size
        self.last_num_forward = 0

    def backbone_sigma(self, t: Tensor, batch_size: int) -> Tensor:
        """σ fed to the backbone [B]: σ_t when time-conditioned, zeros otherwise."""
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(batch_size)
        return self.schedule.sigma(t).float() if self.time_conditioning else torch.zeros_like(t)

    def logits(self, z: Tensor, sigma: Tensor) -> Tensor:
        """Raw float32 backbone logits [B, L, V] under this model's precision."""
        with autocast_context(z.device, self.mixed_precision):
            logits: Tensor = self.backbone(z, sigma.to(z.device))
        return logits.float()

    def logits_at(self, z: Tensor, t: Tensor | float) -> Tensor:
        """Raw float32 backbone logits [B, L, V] at time t (scalar or [B]), before SUBS."""
        return self.logits(z, self.backbone_sigma(torch.as_tensor(t, device=z.device), z.shape[0]))

    def log_probs_x0(self, z: Tensor, t: Tensor | float) -> Tensor:
        """log x_θ(z_t) [B, L, V] float32 with SUBS applied; t scalar or [B]."""
        return subs_log_probs(self.logits_at(z, t), z, self.mask_id)

    def forward(self, z: Tensor, t: Tensor | float) -> Tensor:
        """Alias of `log_probs_x0`."""
        return self.log_probs_x0(z, t)

    def nelbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean per-token MDLM NELBO (nats) of clean ids x [B, L] with antithetic t (spec §2); a scalar."""
        t = antithetic_times(x.shape[0], generator, device=x.device)
        z, masked = corrupt(x, self.schedule.alpha(t), self.mask_id, generator)
        log_probs = self.log_probs_x0(z, t)
        return nelbo_per_token(log_probs, x, masked, self.schedule.loss_weight(t)).mean()

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        length: int,
        num_steps: int,
        generator: torch.Generator | None = None,
        block_size: int | None = None,
        cache: bool = True,
        prefix: Tensor | None = None,
        device: torch.device | str | None = None,
        time_grid: str = "uniform",
        temperature: float = 1.0,
    ) -> Tensor:
        """Ancestral samples [num_samples, length] over an N-step time grid plus noise removal (spec §3).

        Args:
            num_steps: N ancestral steps (per block when `block_size` is set).
            generator: seeds the corruption-free sampling noise (on the model's device).
            block_size: semi-autoregressive blocks of this many positions, left to right.
            cache: skip the forward when nothing changed (ignored with time conditioning, where σ changes).
            prefix: ids [P] or [num_samples, P] fixed at the first P positions (never changed).
            time_grid: "uniform" (the spec's linspace) or "cosine" (`sampling.sampling_grid`).
            temperature: x_θ tempered as softmax(log x_θ / T) (`sampling.temper`); 1, the spec's, leaves it as is.
        """
        device = torch.device(device) if device is not None else next(self.backbone.parameters()).device
        z = torch.full((num_samples, length), self.mask_id, dtype=torch.long, device=device)
        if prefix is not None:
            prefix = torch.as_tensor(prefix, dtype=torch.long, device=device)
            if prefix.shape[-1] > length:
                raise ValueError(f"prefix of {prefix.shape[-1]} tokens is longer than length={length}")
            z[:, : prefix.shape[-1]] = prefix
        sampler = AncestralSampler(
            self.log_probs_x0,
            self.schedule,
            self.mask_id,
            cache and not self.time_conditioning,
            self.final,
            T_MIN,
            time_grid,
            temperature,
        )
        out = sampler.sample(z, num_steps, generator, block_size)
        self.last_num_forward = sampler.num_forward
        return out


def sample_in_batches(
    model: MaskedDiffusionLM,
    num_samples: int,
    length: int,
    num_steps: int,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    **sample_kwargs: object,
) -> Tensor:
    """`model.sample` for many sequences [num_samples, length], `batch_size` at a time, with a progress bar.

    One generator on the model's device seeded with `seed` drives every batch, so the result depends only on
    (seed, batch_size). `sample_kwargs` go to `MaskedDiffusionLM.sample` (block_size, cache, prefix).
    """
    from toolkit.io.console import ProgressBar

    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks: list[Tensor] = []
    with ProgressBar(num_samples, enabled=progress, description="sample") as bar:
        while sum(c.shape[0] for c in chunks) < num_samples:
            size = min(batch_size, num_samples - sum(c.shape[0] for c in chunks))
            chunks.append(model.sample(size, length, num_steps, generator, **sample_kwargs).cpu())  # type: ignore[arg-type]
            bar.update(sum(c.shape[0] for c in chunks))
    return torch.cat(chunks)
