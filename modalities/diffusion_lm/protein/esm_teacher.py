"""Protein teachers: an ESM masked LM (ESM-2, DPLM) as a `DenoiserBackbone`, and tiny DiT / ESM factories.

DPLM (Wang et al. 2024, arXiv:2402.18567) is an ESM-2 network trained as a masked diffusion model, saved in
transformers' `EsmForMaskedLM` layout, so `EsmDenoiser.from_pretrained("airkingbd/dplm_150m")` loads it as a
DiDi-Instruct teacher (spec §16). The adapter computes the embeddings itself so that hard ids and soft tokens
share one path: embedding = softmax(tokens) @ E, then ESM's own steps (token dropout, absolute positions,
embedding LayerNorm), then the unchanged encoder and LM head. σ is ignored (ESM has no time conditioning),
and no attention mask is used: <pad> positions are attended like any token.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import EsmConfig, EsmForMaskedLM
from transformers.models.esm.modeling_esm import create_position_ids_from_input_ids

from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM
from modalities.diffusion_lm.protein.tokenizer import STANDARD_AMINO_ACIDS, Layout, ProteinVocab
from modalities.diffusion_lm.teacher import load_teacher
from modalities.diffusion_lm.tiny import build_tiny_teacher

# ESM's token dropout: masked embeddings are zeroed in training and the rest scaled by (1 − 0.15·0.8) / (1 − observed).
MASK_RATIO_TRAIN = 0.15 * 0.8
NEG_LOGIT = -1.0e6
OutputTokens = Literal["all", "residues"]


class EsmDenoiser(EsmForMaskedLM):
    """`EsmForMaskedLM` with the denoiser-backbone interface: `model(tokens, sigma) -> logits [B, L, V]` float32.

    `tokens` are ids [B, L] or soft tokens [B, L, V]. With `config.token_dropout` (ESM-2, DPLM) the soft path
    generalises ESM's rule: the mask row of E is dropped and the scale uses the expected mask fraction
    Σ_ℓ p_ℓ(mask) / L; on one-hot inputs this is exactly ESM's hard-id computation. Unlike ESM, an all-mask
    input stays finite (the scale's denominator is floored at 1/L; the embeddings are zero there anyway).

    Attributes (the protocol): `vocab_size`, `mask_id` (config.mask_token_id), `hidden_size`, `blocks` (the
    encoder layers), `features(tokens, sigma)` (encoder output after ESM's final LayerNorm).
    `output_tokens = "residues"` (set by `restrict_output_tokens`) gives every id other than the 20 standard
    residues a −1e6 logit, as DPLM's sampler does, so generations are pure residue strings.
    """

    logit_bias: Tensor

    def __init__(self, config: EsmConfig) -> None:
        super().__init__(config)
        if config.mask_token_id is None:
            raise ValueError("EsmDenoiser needs config.mask_token_id (the absorbing state)")
        self.vocab_size: int = int(config.vocab_size)
        self.mask_id: int = int(config.mask_token_id)
        self.hidden_size: int = int(config.hidden_size)
        self.output_tokens: OutputTokens = "all"
        self.register_buffer("logit_bias", torch.zeros(self.vocab_size), persistent=False)

    @property
    def blocks(self) -> nn.ModuleList:
        """The ESM encoder layers (last = closest to the output)."""
        layers: nn.ModuleList = self.esm.encoder.layer
        return layers

    def restrict_output_tokens(self, output_tokens: OutputTokens, vocab: ProteinVocab | None = None) -> None:
        """Which ids may be predicted: "all", or "residues" (the 20 standard residues; ids from `vocab`, ESM layout)."""
        if output_tokens not in ("all", "residues"):
            raise ValueError(f"output_tokens={output_tokens!r}; allowed: ['all', 'residues']")
        self.output_tokens = output_tokens
        self.logit_bias.zero_()
        if output_tokens == "residues":
            vocab = vocab or ProteinVocab.from_layout("esm")
            self.logit_bias.fill_(NEG_LOGIT)
            self.logit_bias[[vocab.token_to_id[letter] for letter in STANDARD_AMINO_ACIDS]] = 0.0

    def embed(self, tokens: Tensor) -> Tensor:
        """Input embeddings [B, L, H] of ids [B, L] or soft tokens [B, L, V] (see the class docstring)."""
        embeddings = self.esm.embeddings
        weight = embeddings.word_embeddings.weight
        if tokens.dim() == 2 and not tokens.is_floating_point():
            hard = tokens
            x = F.embedding(tokens, weight)
            mask_weight = (tokens == self.mask_id).to(x.dtype)
        elif tokens.dim() == 3 and tokens.shape[-1] == self.vocab_size:
            probs = torch.softmax(tokens.float(), dim=-1).to(weight.dtype)
            hard = tokens.argmax(dim=-1)
            x = probs @ weight
            mask_weight = probs[..., self.mask_id]
        else:
            raise ValueError(
                f"tokens must be [B, L] ids or [B, L, {self.vocab_size}] soft tokens, got {tuple(tokens.shape)}"
            )
        if embeddings.token_dropout:
            x = x - mask_weight[..., None] * weight[self.mask_id]
            kept = (1.0 - mask_weight.mean(dim=-1)).clamp_min(1.0 / tokens.shape[1])
            x = x * ((1.0 - MASK_RATIO_TRAIN) / kept)[:, None, None]
        if embeddings.position_embedding_type == "absolute":
            x = x + embeddings.position_embeddings(create_position_ids_from_input_ids(hard, embeddings.padding_idx))
        if embeddings.layer_norm is not None:
            x = embeddings.layer_norm(x)
        out: Tensor = x
        return out

    def features(self, tokens: Tensor, sigma: Tensor | None = None) -> Tensor:
        """Encoder output [B, L, H] (after ESM's final LayerNorm), the input of the LM head; σ is ignored."""
        hidden: Tensor = self.esm(inputs_embeds=self.embed(tokens)).last_hidden_state
        return hidden

    def forward(self, tokens: Tensor | None = None, sigma: Tensor | None = None, **kwargs: Any) -> Any:
        """Raw float32 logits [B, L, V] of ids or soft tokens; σ is ignored.

        Called with transformers keywords instead (`input_ids=...`), it is the stock `EsmForMaskedLM.forward`.
        """
        if tokens is None:
            return super().forward(**kwargs)
        logits = self.lm_head(self.features(tokens, sigma)).float()
        return logits + self.logit_bias if self.output_tokens != "all" else logits


def load_esm_denoiser(
    model_name: str = "airkingbd/dplm_150m",
    output_tokens: OutputTokens = "residues",
    dtype: Literal["float32", "bfloat16"] = "float32",
) -> EsmDenoiser:
    """An ESM-2 / DPLM masked LM from the hub or a local folder, as a denoiser backbone (GPU recipes)."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}; allowed: ['float32', 'bfloat16']")
    model: EsmDenoiser = EsmDenoiser.from_pretrained(model_name, dtype=getattr(torch, dtype))
    model.restrict_output_tokens(output_tokens)
    return model


def build_tiny_esm_denoiser(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_length: int = 64,
    position_embedding_type: Literal["rotary", "absolute"] = "rotary",
    token_dropout: bool = True,
    output_tokens: OutputTokens = "all",
    seed: int = 0,
) -> EsmDenoiser:
    """A random-init ESM denoiser over the ESM-2 vocabulary (V = 33, mask 32, pad 1): the CPU DPLM stand-in.

    Weights depend only on the arguments (initialised under a forked RNG seeded with `seed`).
    """
    vocab = ProteinVocab.from_layout("esm")
    config = EsmConfig(
        vocab_size=vocab.size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        pad_token_id=vocab.pad_id,
        mask_token_id=vocab.mask_id,
        max_position_embeddings=max_length + 2,
        position_embedding_type=position_embedding_type,
        token_dropout=token_dropout,
        emb_layer_norm_before=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EsmDenoiser(config)
    model.restrict_output_tokens(output_tokens, vocab)
    model.eval()
    return model


def load_esm_teacher(
    model_name: str = "airkingbd/dplm_150m",
    output_tokens: OutputTokens = "residues",
    dtype: Literal["float32", "bfloat16"] = "float32",
    mixed_precision: str = "no",
) -> MaskedDiffusionLM:
    """A DPLM / ESM-2 masked-diffusion teacher (log-linear schedule, no time conditioning) for the GPU recipes."""
    return MaskedDiffusionLM(load_esm_denoiser(model_name, output_tokens, dtype), mixed_precision=mixed_precision)


def build_tiny_esm_teacher(seed: int = 0, output_tokens: OutputTokens = "all", **overrides: Any) -> MaskedDiffusionLM:
    """`build_tiny_esm_denoiser` wrapped as a masked-diffusion LM (the CPU stand-in of `load_esm_teacher`)."""
    return MaskedDiffusionLM(build_tiny_esm_denoiser(output_tokens=output_tokens, seed=seed, **overrides))


def build_tiny_protein_teacher(
    checkpoint: str | None = None,
    layout: Layout = "compact",
    seed: int = 0,
    hidden_size: int = 64,
    num_blocks: int = 2,
    num_heads: int = 2,
    max_length: int = 48,
    mixed_precision: str = "no",
) -> MaskedDiffusionLM:
    """A tiny DiT protein teacher over `layout`'s vocabulary (mask = V − 1 in both layouts).

    Loaded from `checkpoint` (a `train_teacher` run or checkpoint directory) when given, else random-init.
    """
    if checkpoint is not None:
        return load_teacher(checkpoint, mixed_precision=mixed_precision)
    vocab = ProteinVocab.from_layout(layout)
    assert vocab.mask_id == vocab.size - 1, "DiT puts the mask at V - 1"
    return build_tiny_teacher(
        vocab.size,
        seed,
        mixed_precision=mixed_precision,
        hidden_size=hidden_size,
        num_blocks=num_blocks,
        num_heads=num_heads,
        cond_dim=16,
        max_length=max_length,
    )
