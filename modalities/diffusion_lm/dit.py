"""MDLM-style diffusion transformer (DiT): adaLN on σ, plain-torch rotary, SDPA, untied embeddings, soft tokens.

Spec docs/methods/didi_instruct.md §4 (the DiT of the MDLM/DUO code bases, arXiv:2406.07524). Module and parameter names
follow the MDLM checkpoint layout (`vocab_embed.embedding`, `sigma_map.mlp.*`, `blocks.i.attn_qkv` ...), so an
MDLM state dict loads with only its `backbone.` prefix stripped (`checkpoint_io.py`). Simplified: no
flash-attn (rotary in torch, `F.scaled_dot_product_attention`), bidirectional attention only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

PresetName = Literal["tiny", "small", "medium", "large"]
_PRESETS: dict[str, dict[str, Any]] = {
    # spec §19 CPU stand-in
    "tiny": {"hidden_size": 64, "num_blocks": 2, "num_heads": 2, "cond_dim": 16, "max_length": 32, "dropout": 0.0},
    # spec §4 table (MDLM configs/model/{small,medium,large}.yaml)
    "small": {"hidden_size": 768, "num_blocks": 12, "num_heads": 12, "cond_dim": 128, "max_length": 1024},
    "medium": {"hidden_size": 1024, "num_blocks": 24, "num_heads": 16, "cond_dim": 128, "max_length": 1024},
    "large": {"hidden_size": 1280, "num_blocks": 36, "num_heads": 20, "cond_dim": 128, "max_length": 1024},
}
FREQUENCY_EMBEDDING_SIZE = 256
ROTARY_BASE = 10000.0


@dataclass
class DiTConfig:
    """Size and options of a DiT.

    Attributes:
        vocab_size: V including the mask token (GPT-2 + mask = 50258).
        mask_id: the mask id; None means the last id (V − 1, the MDLM convention).
        hidden_size, num_blocks, num_heads: trunk width, depth and attention heads.
        cond_dim: width of the σ conditioning vector c.
        max_length: longest sequence (rotary tables are computed on the fly; this is a guard).
        dropout: residual dropout (MDLM 0.1).
        mlp_ratio: MLP width / hidden_size (4).
        time_conditioning: whether models wrapping this backbone feed it the real σ (MDLM teachers: False,
            σ is zeroed by `MaskedDiffusionLM`); the DiT itself always uses the σ it is given.
    """

    vocab_size: int
    hidden_size: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    cond_dim: int = 128
    max_length: int = 1024
    dropout: float = 0.1
    mlp_ratio: int = 4
    time_conditioning: bool = False
    mask_id: int | None = None

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (tokens + mask), got {self.vocab_size}")
        if (
            min(self.hidden_size, self.num_heads, self.cond_dim, self.max_length, self.mlp_ratio) < 1
            or self.num_blocks < 0
        ):
            raise ValueError(f"DiT sizes must be positive (num_blocks >= 0), got {self}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size={self.hidden_size} must split into num_heads={self.num_heads} heads of even size"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mask_id is not None and not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id={self.mask_id} outside [0, {self.vocab_size})")

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides: Any) -> DiTConfig:
        """A named size ("tiny", "small", "medium", "large") for `vocab_size`, with field overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(vocab_size=vocab_size, **{**_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (for checkpoints)."""
        return asdict(self)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x·(1 + scale) + shift; x [B, L, H], shift/scale [B, 1, H]."""
    return x * (1 + scale) + shift


def rotary_cos_sin(length: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rotary tables (base 10000, GPT-NeoX half rotation), each [L, head_dim], float32."""
    inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate q or k [B, heads, L, D] by the position tables cos/sin [L, D] (non-interleaved halves)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def timestep_embedding(sigma: Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of σ [B] (cos half first, as in MDLM's TimestepEmbedder), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LayerNorm(nn.Module):
    """LayerNorm without bias, computed in float32 (MDLM's `LayerNorm`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), [self.dim]) * self.weight.float()


class TimestepEmbedder(nn.Module):
    """σ → sinusoidal(256) → Linear → SiLU → Linear (→ cond_dim)."""

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, sigma: Tensor) -> Tensor:
        embedded: Tensor = self.mlp(timestep_embedding(sigma))
        return embedded


class EmbeddingLayer(nn.Module):
    """Token table E [V, H]: ids → rows; soft tokens [B, L, V] → softmax(x) @ E."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.is_floating_point():
            return torch.softmax(tokens.float(), dim=-1) @ self.embedding
        return self.embedding[tokens]


class DiTBlock(nn.Module):
    """LN → adaLN → qkv → rotary → bidirectional SDPA → out → gated residual → LN → adaLN → MLP → gated residual."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.dropout = config.num_heads, config.dropout
        self.norm1 = LayerNorm(hidden)
        self.attn_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, config.mlp_ratio * hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.mlp_ratio * hidden, hidden),
        )
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * hidden)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B, L, H], c [B, cond_dim], cos/sin [L, H/heads] → [B, L, H]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        qkv = self.attn_qkv(modulate(self.norm1(x), shift1, scale1))
        q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        attn = self.attn_out(rearrange(attn, "b h l d -> b l (h d)"))
        x = x + gate1 * F.dropout(attn, self.dropout, self.training)
        mlp: Tensor = self.mlp(modulate(self.norm2(x), shift2, scale2))
        out: Tensor = x + gate2 * F.dropout(mlp, self.dropout, self.training)
        return out


class DiTFinalLayer(nn.Module):
    """LN → adaLN(shift, scale) → Linear(H, V); the adaLN and the projection are zero-initialised."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.norm_final = LayerNorm(config.hidden_size)
        self.linear = nn.Linear(config.hidden_size, config.vocab_size)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_size)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def features(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        logits: Tensor = self.linear(self.features(x, c))
        return logits


class DiT(nn.Module):
    """The MDLM diffusion transformer; implements `DenoiserBackbone` (spec §4).

    Call as `dit(tokens, sigma) -> logits [B, L, V]` (float32). `tokens` are ids [B, L] or soft tokens
    [B, L, V]; `sigma` [B] (float). Runs under bf16 autocast; LayerNorms, σ embedding and logits stay fp32.
    """

    _no_split_modules = ["DiTBlock"]  # the FSDP units (accelerate's transformer auto-wrap reads this, as for HF models)

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab_size, self.hidden_size = config.vocab_size, config.hidden_size
        self.mask_id = config.vocab_size - 1 if config.mask_id is None else config.mask_id
        self.vocab_embed = EmbeddingLayer(config.vocab_size, config.hidden_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_blocks))
        self.output_layer = DiTFinalLayer(config)

    def _trunk(self, tokens: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        if tokens.dim() not in (2, 3) or (tokens.dim() == 3 and tokens.shape[-1] != self.vocab_size):
            raise ValueError(
                f"tokens must be [B, L] ids or [B, L, {self.vocab_size}] soft tokens, got {tuple(tokens.shape)}"
            )
        batch, length = tokens.shape[:2]
        if length > self.config.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length={self.config.max_length}")
        sigma = sigma.reshape(-1).float().expand(batch) if sigma.numel() == 1 else sigma.float()
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must be [B]={batch} or a scalar, got {tuple(sigma.shape)}")
        x = self.vocab_embed(tokens)
        c = F.silu(self.sigma_map(sigma))
        cos, sin = rotary_cos_sin(length, self.hidden_size // self.config.num_heads, x.device)
        for block in self.blocks:
            x = block(x, c, cos, sin)
        return x, c

    def features(self, tokens: Tensor, sigma: Tensor) -> Tensor:
        """Hidden states after the final norm and adaLN modulation (the input of the output Linear) [B, L, H]."""
        x, c = self._trunk(tokens, sigma)
        return self.output_layer.features(x, c)

    def forward(self, tokens: Tensor, sigma: Tensor) -> Tensor:
        x, c = self._trunk(tokens, sigma)
        logits: Tensor = self.output_layer(x, c)
        return logits.float()


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of `module`."""
    return sum(p.numel() for p in module.parameters())
