"""The SD3 / FLUX transformer as a velocity field v(x_σ, σ, text): SD3's true CFG and FLUX's guidance embedding.

`TransformerVelocity` is the base of `FlowMatchingPolicy`: the sampler calls `velocity` while it samples, and the
policy calls it again when it re-scores the stored transitions (optionally under `torch.utils.checkpoint`, and with
the unconditional CFG half under no_grad). Forwards run in the transformer's dtype (bf16 autocast on CUDA when
asked); the velocity comes back in float32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modalities.text_to_image.latents import Arch, image_ids
from toolkit.distributed import unwrap
from toolkit.hf.policy import bf16_autocast, unwrap_model

CfgGradient = Literal["conditional", "both"]


class TransformerVelocity:
    """Velocity of the policy's transformer (`module`), set up by the subclass's `__init__`.

    Attributes the subclass sets: `module` (the transformer, maybe LoRA- or DDP-wrapped), `arch`,
    `quantize_timesteps` (time input int(σ·1000)/1000), `cfg_gradient`, `autocast` (bf16 on CUDA) and
    `vae_scale_factor` (pixels per latent cell, for FLUX's positional ids).
    """

    module: nn.Module
    arch: Arch
    quantize_timesteps: bool
    cfg_gradient: CfgGradient
    autocast: bool
    vae_scale_factor: int

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def config(self) -> Any:
        """The transformer's diffusers config (through LoRA and DDP wrappers)."""
        return unwrap_model(unwrap(self.module)).config

    def autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        return bf16_autocast(self.autocast, self.device)

    def velocity(
        self,
        latents: Tensor,
        sigmas: Tensor,
        cond: Mapping[str, Tensor],
        guidance: Tensor,
        module: nn.Module | None = None,
        image_size: tuple[int, int] | None = None,
        checkpointed: bool = False,
        split_cfg: bool = False,
    ) -> Tensor:
        """[n, ...] float32 velocity at latents [n, ...], per-row sigmas [n], conditioning and guidance [n].

        SD3 with negative embeddings in `cond`: true CFG, by default over one batched [uncond; cond] forward. With
        `split_cfg` and cfg_gradient "conditional" the unconditional half is a forward of its own under no_grad (it
        keeps no activations for backward). FLUX: the guidance value goes to the guidance embedder (when the model
        has one), one forward. `checkpointed`: each forward that records gradients runs under
        `torch.utils.checkpoint` (only its inputs stay alive until backward).
        """
        module = self.module if module is None else module
        timesteps = sigmas.float()
        if self.quantize_timesteps:
            timesteps = torch.floor(timesteps * 1000.0) / 1000.0
        run = functools.partial(call_checkpointed, checkpointed and torch.is_grad_enabled())
        if self.arch == "flux":
            return run(self._flux_velocity, module, latents, timesteps, cond, guidance, image_size)
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        if "negative_prompt_embeds" not in cond:
            return run(self._sd3_forward, module, latents, timesteps, embeds, pooled)
        negative, negative_pooled = cond["negative_prompt_embeds"], cond["negative_pooled_prompt_embeds"]
        if split_cfg and self.cfg_gradient == "conditional":
            with torch.no_grad():
                v_uncond = self._sd3_forward(module, latents, timesteps, negative, negative_pooled)
            v_cond = run(self._sd3_forward, module, latents, timesteps, embeds, pooled)
        else:
            doubled = (torch.cat([latents, latents]), timesteps.repeat(2), torch.cat([negative, embeds]))
            both = run(self._sd3_forward, module, *doubled, torch.cat([negative_pooled, pooled]))
            v_uncond, v_cond = both.chunk(2)
            if self.cfg_gradient == "conditional":
                v_uncond = v_uncond.detach()
        w = guidance.float().reshape(-1, *([1] * (latents.dim() - 1)))
        return v_uncond + w * (v_cond - v_uncond)

    def _sd3_forward(self, module: nn.Module, x: Tensor, t: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        dtype = param_dtype(module)
        with self.autocast_context():
            out: Tensor = module(
                hidden_states=x.to(dtype),
                timestep=(t * 1000.0).to(dtype),
                encoder_hidden_states=embeds.to(dtype),
                pooled_projections=pooled.to(dtype),
                return_dict=False,
            )[0]
        return out.float()

    def _flux_velocity(
        self,
        module: nn.Module,
        x: Tensor,
        t: Tensor,
        cond: Mapping[str, Tensor],
        guidance: Tensor,
        image_size: tuple[int, int] | None,
    ) -> Tensor:
        if image_size is None:
            raise ValueError("FLUX needs the image size for its positional ids")
        dtype = param_dtype(module)
        embeds = cond["prompt_embeds"]
        cell = self.vae_scale_factor * 2
        kwargs: dict[str, Any] = {
            "hidden_states": x.to(dtype),
            "timestep": t.to(dtype),
            "encoder_hidden_states": embeds.to(dtype),
            "pooled_projections": cond["pooled_prompt_embeds"].to(dtype),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype),
            "img_ids": image_ids(image_size[0] // cell, image_size[1] // cell, x.device).to(dtype),
            "return_dict": False,
        }
        if getattr(self.config, "guidance_embeds", False):
            kwargs["guidance"] = guidance.to(dtype)
        with self.autocast_context():
            out: Tensor = module(**kwargs)[0]
        return out.float()


def call_checkpointed(checkpointed: bool, function: Callable[..., Tensor], *args: Any) -> Tensor:
    """`function(*args)`, under `torch.utils.checkpoint` (non-reentrant) when `checkpointed`."""
    if not checkpointed:
        return function(*args)
    out: Tensor = checkpoint(function, *args, use_reentrant=False)
    return out


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of `module`'s first parameter (the dtype its forward's inputs are cast to)."""
    return next(module.parameters()).dtype
