"""The (row, trained step) transitions a flow-matching re-scoring pass evaluates, gathered from a rollout.

The sampler stores every row's latent path x_0..x_S, its σ grid and its conditioning (`FlowSDESampler`); a
re-scoring pass needs, at each True entry of the rollout mask, the pair (x_k, x_{k+1}) of the step it trained on,
its σ pair and the row's conditioning, flattened to M = mask.sum() entries, and puts its M results back at [N, T].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from toolkit.rollout import Rollout

# rollout.data keys the sampler writes and the policy reads (see FlowSDESampler).
COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")
REQUIRED_KEYS = ("latents", "step_indices", "sigmas", "eta", "guidance_scale")


@dataclass
class Transitions:
    """The (row, step) pairs a re-scoring pass evaluates, flattened to M = mask.sum() entries."""

    rows: Tensor
    cols: Tensor
    latents: Tensor
    next_latents: Tensor
    sigmas: Tensor
    next_sigmas: Tensor
    guards: Tensor
    eta: Tensor
    guidance: Tensor
    cond: dict[str, Tensor]


def gather_transitions(rollout: Rollout, device: torch.device) -> Transitions:
    """Gather x_k, x_{k+1}, σ_k, σ_{k+1} and conditioning for every (row, trained step) in the mask, on `device`."""
    data = rollout.data
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"rollout.data lacks {missing}: sample with FlowSDESampler")
    rows, cols = rollout.mask.to(device).nonzero(as_tuple=True)
    steps = data["step_indices"].to(device)[rows, cols]
    latents, sigmas = data["latents"].to(device), data["sigmas"].to(device)
    return Transitions(
        rows=rows,
        cols=cols,
        latents=latents[rows, steps],
        next_latents=latents[rows, steps + 1],
        sigmas=sigmas[rows, steps],
        next_sigmas=sigmas[rows, steps + 1],
        guards=sigmas[rows, 1],
        eta=data["eta"].to(device)[rows],
        guidance=data["guidance_scale"].to(device)[rows],
        cond={k: data[k].to(device)[rows] for k in COND_KEYS if k in data},
    )


def scatter_transitions(rollout: Rollout, trans: Transitions, values: Tensor) -> Tensor:
    """[N, T] float32: the M per-transition `values` at their (row, step), 0 elsewhere."""
    out = torch.zeros(rollout.mask.shape, dtype=torch.float32, device=values.device)
    return out.index_put((trans.rows, trans.cols), values.float())


def rollout_image_size(rollout: Rollout) -> tuple[int, int] | None:
    """(height, width) in pixels the sampler recorded (FLUX's positional ids need it), or None."""
    size = rollout.data.get("image_size")
    if size is None:
        return None
    return int(size[0, 0]), int(size[0, 1])
