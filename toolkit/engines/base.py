"""The rollout-engine seam under the token samplers: a request of prompt token ids and sampling settings in, the
sampled token ids, the engine's own log-probs and finish reasons out.

An engine only generates. The sampler builds the `Rollout` and re-scores it with the trainer's policy, so the
old log-probs stay the trainer's whatever the engine (its log-probs are kept to measure the mismatch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
from torch import Tensor, nn

from toolkit.engines.multimodal import MultimodalInputs
from toolkit.interfaces import Policy
from toolkit.rollout import Rollout

FinishReason = Literal["stop", "length"]
EngineName = Literal["hf", "server", "vllm"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion: the knobs every engine (HF `generate`, vLLM, SGLang, ...) understands.

    Args:
        max_new_tokens: generation budget per completion.
        temperature: logits are divided by it before sampling (ignored when `do_sample` is False).
        top_p, top_k: nucleus / top-k truncation; top_p 1.0 and top_k 0 are off.
        do_sample: False = greedy.
        eos_token_ids: ids that end a completion; the ending token is part of it.
        stop_strings: strings that end a completion; the token completing one is part of it.
        pad_token_id: the id an engine pads with (None: the tokenizer's pad, else the first EOS id).
        suppress_token_ids: ids never sampled (their logits are set to -inf before any warper, as HF
            `suppress_tokens` does): exactly so by `hf` (its `generate` path), `renorm serve-policy` and the colocated
            `vllm` engine (a -inf logit bias); a `vllm serve` server gets a logit bias of -100, its floor.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    pad_token_id: int | None = None
    suppress_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (do_sample=False for greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


ModelInputs = Callable[[slice, Tensor], Mapping[str, Any]]
"""A multimodal request's extra model inputs: called with the request rows of one forward batch (a slice) and their
left-padded prompt ids [n, L], it returns the keyword inputs the model takes next to `input_ids` and `attention_mask`
for those rows (Qwen2.5-VL: `pixel_values_videos` or the cached vision embeddings, `video_grid_thw`,
`second_per_grid_ts`, `mm_token_type_ids`). A callable rather than tensors, because patches are concatenated across
rows and token types follow the padding, so only the engine's batching decides their shapes. Engines outside the
process take the request's `multimodal` form instead (`toolkit.engines.multimodal`)."""


@dataclass(frozen=True)
class GenerationRequest:
    """`num_samples` completions of each prompt, reproducible from `seed`.

    Args:
        prompt_ids: P prompts as token-id lists (no padding).
        params: the sampling settings, shared by every row.
        num_samples: completions per prompt (G); the result has P·G rows, prompt-major.
        seed: the engine's sampling seed (the same request and weights give the same tokens).
        return_logprobs: also return the engine's log-prob of each sampled token.
        model_inputs: extra per-row model inputs of a multimodal prompt (`ModelInputs`, row indices prompt-major as
            in `rows()`); None = text only. The `hf` engine forwards them to `generate`.
        multimodal: the same inputs per prompt in a serialisable form (`MultimodalInputs`: tensors plus how each
            key batches), which the `server` engine sends and the `vllm` engine hands to vLLM; a multimodal request
            without it is refused by both. The sampler fills both: `model_inputs` may use what cannot travel (the
            cached vision embeddings), so the `hf` engine keeps its exact behaviour.
    """

    prompt_ids: Sequence[Sequence[int]]
    params: SamplingParams
    num_samples: int = 1
    seed: int = 0
    return_logprobs: bool = True
    model_inputs: ModelInputs | None = None
    multimodal: MultimodalInputs | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a generation request needs at least one prompt")
        empty = [i for i, ids in enumerate(self.prompt_ids) if len(ids) == 0]
        if empty:
            raise ValueError(f"prompts {empty[:5]} have no tokens")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.model_inputs is not None and not callable(self.model_inputs):
            raise ValueError(
                f"model_inputs must be callable as (rows, prompt_ids) -> model kwargs, got {self.model_inputs!r:.80}"
            )
        if self.multimodal is not None:
            if not isinstance(self.multimodal, MultimodalInputs):
                raise ValueError(f"multimodal must be a MultimodalInputs, got {type(self.multimodal).__name__}")
            if self.model_inputs is None:
                raise ValueError("a request with `multimodal` inputs needs `model_inputs` too (for the hf engine)")
            self.multimodal.check_prompts([len(ids) for ids in self.prompt_ids])

    @property
    def num_rows(self) -> int:
        """P·G, the number of completions."""
        return len(self.prompt_ids) * self.num_samples

    def rows(self) -> list[list[int]]:
        """Each row's prompt ids, prompt-major (row i·G + j is sample j of prompt i)."""
        return [list(ids) for ids in self.prompt_ids for _ in range(self.num_samples)]


@dataclass
class GenerationResult:
    """An engine's answer to a `GenerationRequest`, one entry per row (prompt-major).

    Attributes:
        token_ids: each row's sampled tokens (the EOS or stop-string token that ended it included).
        finish_reasons: "stop" (EOS or a stop string) or "length" (the budget ran out).
        logprobs: the engine's log-prob of each sampled token (None when not requested); for the `hf` engine and
            `renorm serve-policy` those of the temperature-scaled full distribution, as the policy computes them.
        weights_version: the weights version that generated them (engines that track one).
        metrics: scalars the engine measured (`time/weight_sync_s`, ...).
    """

    token_ids: list[list[int]]
    finish_reasons: list[FinishReason]
    logprobs: list[list[float]] | None = None
    weights_version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = len(self.token_ids)
        if len(self.finish_reasons) != rows:
            raise ValueError(f"{len(self.finish_reasons)} finish reasons for {rows} rows")
        bad = sorted({r for r in self.finish_reasons if r not in get_args(FinishReason)})
        if bad:
            raise ValueError(f"finish reasons {bad} are not one of {list(get_args(FinishReason))}")
        if self.logprobs is not None:
            if len(self.logprobs) != rows:
                raise ValueError(f"{len(self.logprobs)} log-prob rows for {rows} rows")
            for i, (ids, values) in enumerate(zip(self.token_ids, self.logprobs, strict=True)):
                if len(ids) != len(values):
                    raise ValueError(f"row {i} has {len(ids)} tokens but {len(values)} log-probs")

    def padded_tokens(self, pad: int) -> Tensor:
        """The sampled tokens as one [rows, longest] long tensor on the CPU, right-padded with `pad`."""
        width = max((len(ids) for ids in self.token_ids), default=0)
        tokens = torch.full((len(self.token_ids), width), pad, dtype=torch.long)
        for row, ids in enumerate(self.token_ids):
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens

    def padded_logprobs(self, width: int) -> Tensor:
        """The engine's log-probs as one [rows, width] float32 tensor on the CPU, 0 after each row's tokens."""
        if self.logprobs is None:
            raise ValueError("the result has no log-probs (the request did not ask for them)")
        values = torch.zeros(len(self.token_ids), width, dtype=torch.float32)
        for row, row_values in enumerate(self.logprobs):
            values[row, : len(row_values)] = torch.tensor(row_values[:width], dtype=torch.float32)
        return values

    def check_rows(self, request: GenerationRequest) -> None:
        """Raise unless there is one non-empty completion per requested row (never an empty rollout)."""
        if len(self.token_ids) != request.num_rows:
            raise ValueError(f"the engine returned {len(self.token_ids)} completions for {request.num_rows} rows")
        empty = [i for i, ids in enumerate(self.token_ids) if not ids]
        if empty:
            raise ValueError(
                f"the engine returned no tokens for rows {empty[:5]} (finish reasons "
                f"{[self.finish_reasons[i] for i in empty[:5]]}): is the prompt as long as the engine's max_model_len?"
            )
        if request.return_logprobs and self.logprobs is None:
            raise ValueError("log-probs were requested but the engine returned none")


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates completions for a token sampler; `policy` is the trainer's (engines that hold their own copy of
    the weights bring it up to date with the policy before generating)."""

    def generate(self, policy: Policy, request: GenerationRequest) -> GenerationResult: ...


def weights_version(module: nn.Module) -> int:
    """A number that grows whenever any parameter is changed in place (an optimizer step, a checkpoint load).

    The sum of the parameters' in-place version counters: an engine holding a copy of the weights compares it
    with the one it last synced to know whether the copy is stale. Under FSDP2, those of the sharded parameters the
    optimizer updates (`versioned_parameters`), the same inside and outside `gathered_weights`.
    """
    from toolkit.engines.weights import versioned_parameters

    return sum(p._version for p in versioned_parameters(module))


def weights_key(module: nn.Module) -> tuple[int, int]:
    """(which module, its `weights_version`): what an engine's copy of the weights was last synced from."""
    return id(module), weights_version(module)


def record_engine_logprobs(rollout: Rollout, result: GenerationResult, compare: bool) -> None:
    """Keep the engine's log-probs as `rollout.data["engine_logprobs"]` [N, T]; with `compare` (old_logprobs are
    the re-scored ones already) log their mean/max |Δ| on trained steps as the train/inference mismatch."""
    if result.logprobs is None:
        return
    engine = result.padded_logprobs(rollout.old_logprobs.shape[1]).to(rollout.device)
    rollout.data["engine_logprobs"] = engine
    if compare:
        gap = (rollout.old_logprobs - engine).abs()[rollout.mask]
        empty = gap.numel() == 0
        rollout.metrics["rollout/engine_logprob_abs_diff_mean"] = 0.0 if empty else float(gap.mean())
        rollout.metrics["rollout/engine_logprob_abs_diff_max"] = 0.0 if empty else float(gap.max())


def cut_at_ends(
    tokens: list[list[int]], values: list[list[float]] | None, ends: list[int], budget: int
) -> tuple[list[list[int]], list[FinishReason], list[list[float]]]:
    """Rows decoded to a common width, cut where each ended: (tokens, finish reasons, log-probs; [] without `values`).

    `ends[i]` is the step whose token ended row i (kept), -1 when it never ended: it then ran the whole `budget`.
    """
    lengths = [end + 1 if end >= 0 else budget for end in ends]
    reasons: list[FinishReason] = ["stop" if end >= 0 else "length" for end in ends]
    kept = [ids[:n] for ids, n in zip(tokens, lengths, strict=True)]
    logprobs = [] if values is None else [row[:n] for row, n in zip(values, lengths, strict=True)]
    return kept, reasons, logprobs


def require_portable(request: GenerationRequest, engine: str) -> None:
    """Raise NotImplementedError when a multimodal request carries only its in-process `model_inputs` callable:
    `engine` runs elsewhere and needs the serialisable `GenerationRequest.multimodal` form."""
    if request.model_inputs is not None and request.multimodal is None:
        raise NotImplementedError(
            f"the {engine} engine takes multimodal requests only with GenerationRequest.multimodal (per-prompt "
            "tensors and how they batch); model_inputs is a callable of this process: use engine 'hf', or have "
            "the sampler fill `multimodal` too"
        )
