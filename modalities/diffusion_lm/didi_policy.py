"""DiDi-Instruct student policy: re-scores two-step student trajectories for the generic Trainer (arXiv:2509.25035).

T = 2 trained steps per row: step 1 all-mask z_1 → z_τ, step 2 z_τ → x (spec docs/methods/didi_instruct.md §8). The
step log-prob follows the `prev_is_mask` convention: Σ over positions masked before the step of
log(x_ν(z_prev)[z_next] + 1e-10), so positions that stay masked add the constant log(1e-10) (no gradient).
The analytic per-step KL to the frozen teacher (Jeffrey, β = 0.5, or forward KL; §10) and the entropy are
means over the step's masked positions; training computes all three from the raw logits a block of positions at a
time (`subs_stats`: no fp32 [N, L, V] log-probs). An EMA copy of the student (0.999; `student_ema`: sharded like the
student under FSDP2) is updated after every optimizer step and checkpointed through `state_dict()` (under FSDP also
as shards, `sharded_state_dict`); `export` writes it (or the student) as safetensors + JSON
(`checkpoint_io.save_dlm_folder`). Simplified: the last-k trainable option unfreezes blocks only.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from modalities.diffusion_lm.backbone import autocast_context
from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM, subs_log_probs
from modalities.diffusion_lm.student_ema import StudentEMA
from modalities.diffusion_lm.subs_stats import subs_stats
from toolkit.distributed import unwrap
from toolkit.rollout import Rollout
from toolkit.train.sharded_copy import LOAD_SHARDS

Regularization = Literal["jeffrey", "forward_kl", "reverse_kl"]
LogprobMode = Literal["prev_is_mask", "changed_only"]
ExportWeights = Literal["ema", "student"]
LOGPROB_EPS = 1e-10


def step_log_probs(
    log_probs_x0: Tensor, z_prev: Tensor, z_next: Tensor, mask_id: int, mode: LogprobMode = "prev_is_mask"
) -> Tensor:
    """Log-probability of one student transition z_prev → z_next [N] (spec §8, `logprob_mode`).

    Args:
        log_probs_x0: [N, L, V] SUBS log x_ν(z_prev).
        z_prev, z_next: [N, L] ids before and after the step.
        mask_id: the mask id.
        mode: "prev_is_mask" sums log(p + 1e-10) over positions masked in z_prev (staying masked adds the
            constant log 1e-10); "changed_only" over newly unmasked positions (same gradient).

    Returns:
        [N] float32 log-probs (differentiable through `log_probs_x0`).
    """
    picked = log_probs_x0.float().gather(-1, z_next.unsqueeze(-1)).squeeze(-1)
    return picked_step_log_probs(picked, z_prev, z_next, mask_id, mode)


def picked_step_log_probs(
    picked: Tensor, z_prev: Tensor, z_next: Tensor, mask_id: int, mode: LogprobMode = "prev_is_mask"
) -> Tensor:
    """`step_log_probs` from the picked SUBS log-probs log x_ν(z_prev)[z_next] [N, L] (only masked positions read)."""
    values = torch.log(picked.exp() + LOGPROB_EPS)
    positions = z_prev == mask_id
    if mode == "changed_only":
        positions = positions & (z_next != mask_id)
    return torch.where(positions, values, 0.0).sum(-1)


def masked_mean(values: Tensor, positions: Tensor) -> Tensor:
    """[N] mean of values [N, L] over positions [N, L] (0 for rows without positions)."""
    return torch.where(positions, values, 0.0).sum(-1) / positions.sum(-1).clamp_min(1)


def categorical_entropy(log_probs: Tensor) -> Tensor:
    """[N, L] entropy −Σ_v p log p of log-probs [N, L, V] (zero-mass entries contribute 0)."""
    return -(log_probs.exp() * log_probs).sum(-1)


def teacher_divergence(
    student_log_probs: Tensor, teacher_log_probs: Tensor, regularization: Regularization = "jeffrey", beta: float = 0.5
) -> Tensor:
    """Per-position divergence [N, L] between teacher T and student S (spec §10).

    J = (1 − β)·KL(T‖S) + β·KL(S‖T) ("jeffrey"); "forward_kl" = KL(T‖S) (development code), "reverse_kl" = KL(S‖T).

    Args:
        student_log_probs, teacher_log_probs: [N, L, V] SUBS log-probs (the teacher's detached).
        regularization: "jeffrey", "forward_kl" or "reverse_kl".
        beta: Jeffrey β (0 → forward, 1 → reverse).
    """
    s, t = student_log_probs.float(), teacher_log_probs.float().detach()
    forward = (t.exp() * (t - s)).sum(-1)
    reverse = (s.exp() * (s - t)).sum(-1)
    if regularization == "forward_kl":
        return forward
    if regularization == "reverse_kl":
        return reverse
    return (1 - beta) * forward + beta * reverse


@dataclass
class StepInputs:
    """The trained steps of a rollout: inputs z [T][N, L], targets [T][N, L], times t [T][N]."""

    inputs: tuple[Tensor, ...]
    targets: tuple[Tensor, ...]
    times: tuple[Tensor, ...]


def rollout_steps(rollout: Rollout, mask_id: int) -> StepInputs:
    """Step inputs/targets/times from `rollout.data`.

    Two-step rollouts record `z_tau`, `x`, `tau` (all-mask → z_τ → x); multi-step rollouts (`num_steps` > 2 in
    `TwoStepStudentSampler`) record the whole path `z_path` [N, T+1, L] and its times `t_path` [N, T+1].
    """
    if "z_path" in rollout.data:
        path, times = rollout.data["z_path"], rollout.data["t_path"]
        count = path.shape[1] - 1
        return StepInputs(
            tuple(path[:, k] for k in range(count)),
            tuple(path[:, k + 1] for k in range(count)),
            tuple(times[:, k] for k in range(count)),
        )
    z_tau, x, tau = rollout.data["z_tau"], rollout.data["x"], rollout.data["tau"]
    z_1 = torch.full_like(z_tau, mask_id)
    return StepInputs((z_1, z_tau), (z_tau, x), (torch.ones_like(tau), tau))


class StudentPolicy:
    """Policy + EntropyPolicy + AnalyticKLPolicy over two-step student trajectories (see the module docstring).

    `module` is the student backbone (what the Trainer's optimizer, accelerate and checkpoints see).
    """

    def __init__(
        self,
        student: MaskedDiffusionLM,
        teacher: MaskedDiffusionLM | None = None,
        num_trainable_blocks: int | None = None,
        regularization: Regularization = "jeffrey",
        jeffrey_beta: float = 0.5,
        ema_decay: float | None = 0.999,
        logprob_mode: LogprobMode = "prev_is_mask",
        disable_dropout: bool = True,
        tokenizer: Any = None,
        export_weights: ExportWeights = "ema",
    ) -> None:
        """Set up trainable parameters, the frozen teacher and the EMA copy.

        Args:
            student: the student (initialised from the teacher's weights).
            teacher: the frozen teacher for the KL regulariser (None: `analytic_kl` raises).
            num_trainable_blocks: train only the last k blocks (None = every parameter, spec default).
            regularization: "jeffrey" (spec default, β = `jeffrey_beta`), "forward_kl" (development code) or
                "reverse_kl".
            jeffrey_beta: β in [0, 1].
            ema_decay: EMA decay of `ema` (0.999), or None for no EMA.
            logprob_mode: "prev_is_mask" (spec) or "changed_only".
            disable_dropout: zero the backbone's dropout so re-scored log-probs equal the sampler's (as TRL).
            tokenizer: the student's tokenizer, saved beside the weights by `export` (None: no tokenizer files;
                `renorm dlm sample --corpus` then names the vocabulary).
            export_weights: what `export` writes: "ema" (the EMA student; the student itself without EMA) or
                "student" (the raw trained weights).
        """
        if regularization not in get_args(Regularization):
            raise ValueError(f"regularization={regularization!r} is not one of {get_args(Regularization)}")
        if logprob_mode not in get_args(LogprobMode):
            raise ValueError(f"logprob_mode={logprob_mode!r} is not one of {get_args(LogprobMode)}")
        if export_weights not in get_args(ExportWeights):
            raise ValueError(f"export_weights={export_weights!r} is not one of {get_args(ExportWeights)}")
        if not 0.0 <= jeffrey_beta <= 1.0 or (ema_decay is not None and not 0.0 <= ema_decay < 1.0):
            raise ValueError(f"need 0 <= jeffrey_beta <= 1 and 0 <= ema_decay < 1, got {jeffrey_beta}, {ema_decay}")
        self.student, self.teacher = student, teacher
        self._module: nn.Module = student.backbone
        self.mask_id, self.regularization, self.beta = student.mask_id, regularization, jeffrey_beta
        self.logprob_mode, self.ema_decay = logprob_mode, ema_decay
        self.tokenizer, self.export_weights = tokenizer, export_weights
        if disable_dropout:
            _disable_dropout(self.module)
        if num_trainable_blocks is not None:
            _train_last_blocks(self.module, num_trainable_blocks)
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        # Taken when the Trainer hands back the prepared student (the `module` setter) or at first use.
        self._ema = StudentEMA(student.backbone, ema_decay) if ema_decay is not None else None
        self.num_updates = 0
        # The student's per-step logits from the last log_probs call, reused once by analytic_kl on the same
        # rollout (the Trainer asks for both in one micro-step): one student forward per step instead of two.
        self._reuse: tuple[weakref.ref[Rollout], bool, list[Tensor]] | None = None

    @property
    def module(self) -> nn.Module:
        """The student backbone (what the Trainer's optimizer, accelerate and checkpoints see)."""
        return self._module

    @module.setter
    def module(self, module: nn.Module) -> None:
        """The Trainer hands back the prepared student here, before any update: the EMA copy is taken now, as this
        rank's shards when `module` is FSDP2-sharded (no rank holds a whole EMA)."""
        self._module = module
        if self._ema is not None:
            self._ema.take(module, updated=self.num_updates > 0, prepared=True)

    @property
    def ema(self) -> nn.Module | None:
        """The EMA student backbone (None without EMA); taken from the initial student at first use."""
        return None if self._ema is None else self._ema.take(self._module, updated=self.num_updates > 0)

    # ------------------------------------------------------------------ forwards
    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def x0_logits(self, z: Tensor, t: Tensor) -> Tensor:
        """Raw student logits [N, L, V] through `module` (σ zeroed unless time-conditioned), in the trunk's dtype."""
        sigma = self.student.backbone_sigma(t.to(z.device), z.shape[0]).to(z.device)
        with autocast_context(z.device, self.student.mixed_precision):
            logits: Tensor = self.module(z, sigma)
        return logits

    def x0_log_probs(self, z: Tensor, t: Tensor) -> Tensor:
        """Student SUBS log x_ν(z_t) [N, L, V] float32 (the sampler's; training reads `x0_logits` in blocks)."""
        return subs_log_probs(self.x0_logits(z, t).float(), z, self.mask_id)

    def teacher_logits(self, z: Tensor, t: Tensor) -> Tensor:
        """Raw teacher logits [N, L, V] (no grad; float32, as every backbone returns them)."""
        if self.teacher is None:
            raise ValueError("StudentPolicy has no teacher: pass `teacher` to use the KL regulariser")
        if next(self.teacher.parameters()).device != z.device:
            self.teacher.to(z.device)
        with torch.no_grad():
            return self.teacher.logits_at(z, t)

    def _per_step(self, rollout: Rollout, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
        steps = rollout_steps(rollout, self.mask_id)
        logprobs, entropies, forwards = [], [], []
        for z, target, t in zip(steps.inputs, steps.targets, steps.times, strict=True):
            logits = self.x0_logits(z, t)
            forwards.append(logits)
            # Blockwise over the masked positions (subs_stats): no fp32 [N, L, V] log-probs, the same numbers.
            stats = subs_stats(logits, z, self.mask_id, targets=target, entropy=with_entropy)
            assert stats.picked is not None
            logprobs.append(picked_step_log_probs(stats.picked, z, target, self.mask_id, self.logprob_mode))
            if with_entropy:
                assert stats.entropy is not None
                entropies.append(masked_mean(stats.entropy, z == self.mask_id))
        self._reuse = (weakref.ref(rollout), torch.is_grad_enabled(), forwards) if self.teacher is not None else None
        mask = rollout.mask
        out = torch.where(mask, torch.stack(logprobs, dim=1), 0.0)
        entropy = torch.where(mask, torch.stack(entropies, dim=1), 0.0) if with_entropy else None
        return out, entropy

    # ------------------------------------------------------------------ Policy protocols
    def log_probs(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 step log-probs, T = 2 (or the sampler's `num_steps`); 0 where `rollout.mask` is False."""
        return self._per_step(rollout, with_entropy=False)[0]

    def log_probs_and_entropy(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """([N, T] log-probs, [N, T] mean entropy over each step's masked positions)."""
        logprobs, entropy = self._per_step(rollout, with_entropy=True)
        assert entropy is not None
        return logprobs, entropy

    def analytic_kl(self, rollout: Rollout) -> Tensor:
        """[N, T] divergence to the teacher per step, averaged over the step's masked positions (spec §10)."""
        steps = rollout_steps(rollout, self.mask_id)
        reuse, self._reuse = self._reuse, None
        fresh = reuse is not None and reuse[0]() is rollout and reuse[1] == torch.is_grad_enabled()
        cached = reuse[2] if reuse is not None and fresh else None
        kls = []
        for k, (z, t) in enumerate(zip(steps.inputs, steps.times, strict=True)):
            student = cached[k] if cached is not None else self.x0_logits(z, t)
            teacher = self.teacher_logits(z, t)
            div = subs_stats(
                student, z, self.mask_id, teacher_logits=teacher, regularization=self.regularization, beta=self.beta
            ).divergence
            assert div is not None
            kls.append(masked_mean(div, z == self.mask_id))
        return torch.where(rollout.mask, torch.stack(kls, dim=1), 0.0)

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """EMA update ema ← decay·ema + (1 − decay)·student (called by the Trainer after each step; shard by shard
        under FSDP2)."""
        self._reuse = None  # the weights changed: a cached forward is stale
        if self._ema is not None:
            self._ema.update(self.module, updated=self.num_updates > 0)
        self.num_updates += 1

    def ema_model(self) -> MaskedDiffusionLM:
        """The EMA student as a MaskedDiffusionLM sharing the student's schedule (the student itself without EMA).

        Raises:
            ValueError: the EMA is sharded (FSDP2): export a checkpoint (`renorm export`), which holds it gathered.
        """
        ema = self.ema
        if ema is None:
            return self.student
        if self._ema is not None and self._ema.sharded:
            raise ValueError(
                "the EMA is sharded (FSDP2): `renorm export` a checkpoint of the run, which holds it whole"
            )
        return MaskedDiffusionLM(
            ema,
            self.student.schedule,
            self.student.time_conditioning,
            self.student.mixed_precision,
            self.student.final,
        )

    def state_dict(self) -> dict[str, Any]:
        """EMA weights and the update count (the student weights are the Trainer's `module` state).

        The EMA is None while it is sharded: an FSDP checkpoint holds its shards (`sharded_state_dict`) and its
        gathered weights (`full_state_dict`), written by toolkit.train.sharding on every rank.
        """
        if self._ema is None:
            return {"ema": None, "num_updates": self.num_updates}
        self._ema.take(self._module, updated=self.num_updates > 0)
        return {"ema": self._ema.state_dict(), "num_updates": self.num_updates}

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's EMA shards under FSDP2 ({"ema": DTensors}), saved with the student's; {} otherwise."""
        shards = self._ema.sharded_state_dict() if self._ema is not None else {}
        return {"ema": shards} if shards else {}

    def full_state_dict(self) -> dict[str, Any]:
        """`state_dict()` with the EMA gathered whole (collective under FSDP2; kept on rank 0 only)."""
        ema = self._ema.full_state_dict() if self._ema is not None else None
        return {"ema": ema, "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load `state_dict()`'s (or `full_state_dict()`'s) output; a sharded EMA reads its shards through the loader
        that toolkit.train.sharding puts into the state of an FSDP checkpoint (collective)."""
        if self._ema is not None and state.get("ema") is not None:
            self._ema.load_state_dict(state["ema"], state.get(LOAD_SHARDS))
        self.num_updates = int(state.get("num_updates", 0))

    # ------------------------------------------------------------------ export
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The student backbone's whole state dict (what the Trainer checkpoints, frozen blocks included)."""
        return unwrap(self.module).state_dict()

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load what `trainable_state_dict` returned (strict)."""
        unwrap(self.module).load_state_dict(state)

    def load_export(self, folder: str | Path) -> None:
        """Load what `export` wrote (`model.safetensors` + `config.json`) as the student's weights (the EMA too):
        `renorm eval --checkpoint OUT` evaluates the exported (by default EMA) student."""
        from modalities.diffusion_lm.checkpoint_io import load_dlm_folder

        state = load_dlm_folder(folder).backbone.state_dict()
        unwrap(self.module).load_state_dict(state)
        if self._ema is not None:
            self._ema.load_state_dict(state, None)

    def export(self, out_dir: str | Path, merge_lora: bool = False, dtype: torch.dtype | None = None) -> None:
        """Write the EMA student (or the student, `export_weights`) as `model.safetensors` + `config.json` (+ the
        tokenizer) into `out_dir`; `checkpoint_io.load_dlm_folder` and `renorm dlm sample OUT` load it.

        Args:
            out_dir: an existing folder (written into).
            merge_lora: refused (the student trains all its weights: there are no adapters to merge).
            dtype: cast the written weights (None keeps them).
        """
        from modalities.diffusion_lm.checkpoint_io import save_dlm_folder

        if merge_lora:
            raise ValueError("merge_lora needs a LoRA policy; the DiDi student trains all weights (export it as is)")
        use_ema = self.export_weights == "ema" and self._ema is not None
        model = self.ema_model() if use_ema else self.student
        save_dlm_folder(model, out_dir, self.tokenizer, dtype, {"weights": "ema" if use_ema else "student"})


def _disable_dropout(module: nn.Module) -> None:
    """Zero nn.Dropout probabilities and float `dropout` attributes (our DiT blocks use F.dropout)."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
        elif isinstance(getattr(sub, "dropout", None), float):
            setattr(sub, "dropout", 0.0)  # noqa: B010  # a plain float attribute, not a submodule


def _train_last_blocks(module: nn.Module, k: int) -> None:
    blocks = getattr(module, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not 1 <= k <= len(blocks):
        raise ValueError(f"num_trainable_blocks={k} must be in [1, number of blocks] of a backbone with `blocks`")
    module.requires_grad_(False)
    for block in list(blocks)[len(blocks) - k :]:
        block.requires_grad_(True)
