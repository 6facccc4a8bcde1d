"""The `hf` engine's lean decode loop (`HFEngine(decode="lean")`) against HF `generate`: the same greedy tokens,
finish reasons and log-probs; the same sampling distribution (a chi-square test over many draws of the first two
tokens); EOS, budget and left-padding handling; the policy contract through the sampler."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from modalities.text_agent.policy import CausalLMPolicy
from modalities.text_agent.sampler import SingleTurnSampler
from tests.modalities.text_agent.test_text_policy import TextContract
from tests.tiny import EOS_TOKEN_ID, tiny_prompts, tiny_text_policy, tiny_tokenizer
from toolkit.engines import GenerationRequest, GenerationResult, HFEngine, SamplingParams, lean
from toolkit.engines.lean import sample_rows, sampling_warpers

CACHES = ["dynamic", "static", "chunked"]


def prompt_ids(count: int = 5) -> list[list[int]]:
    tokenizer = tiny_tokenizer()
    return [tokenizer(p["prompt"])["input_ids"] for p in tiny_prompts(count)]  # lengths 19, 2, 13, 2, 9


def request_for(prompts: list[list[int]], samples: int = 2, seed: int = 3, **params: Any) -> GenerationRequest:
    settings = {"max_new_tokens": 12, "eos_token_ids": (EOS_TOKEN_ID,), "pad_token_id": 0, **params}
    return GenerationRequest(prompts, SamplingParams(**settings), samples, seed)


def assert_same(a: GenerationResult, b: GenerationResult) -> None:
    assert a.token_ids == b.token_ids and a.finish_reasons == b.finish_reasons
    assert a.logprobs is not None and b.logprobs is not None
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize(
    "params",
    [{}, {"eos_token_ids": ()}, {"max_new_tokens": 1}, {"temperature": 0.7, "top_k": 5, "top_p": 0.8}],
    ids=["eos", "no-eos", "one-token", "warpers-ignored"],
)
def test_greedy_lean_decode_is_token_identical_to_generate(cache: str, params: dict[str, Any]) -> None:
    """Mixed prompt lengths (left padding), rows ending at EOS and rows running the whole budget."""
    policy = tiny_text_policy(seed=2, eos_logit=0.5)  # greedy ends some rows at EOS, not all
    request = request_for(prompt_ids(), do_sample=False, **params)
    reference = HFEngine().generate(policy, request)
    lean = HFEngine(decode="lean", cache=cache, stop_check_every=3).generate(policy, request)  # type: ignore[arg-type]
    assert_same(lean, reference)
    if not params:
        assert set(reference.finish_reasons) == {"stop", "length"}  # both ways of ending are exercised


@pytest.mark.parametrize("cache", ["static", "chunked"])
@pytest.mark.parametrize("chunk", [3, 64])
def test_precomputed_step_masks_change_nothing(monkeypatch: pytest.MonkeyPatch, chunk: int, cache: str) -> None:
    """The decode masks made once per chunk of steps (`StepMasks`) give bitwise the same sampled tokens and
    log-probs as the 2-D mask rebuilt every step, across chunk boundaries (chunk 3, 12 steps; the chunked cache
    grows at steps 4 and 7)."""
    policy, request = tiny_text_policy(seed=2, eos_logit=0.5), request_for(prompt_ids(), samples=3, seed=5)
    engine = HFEngine(decode="lean", cache=cache)  # type: ignore[arg-type]
    grown: list[int] = []
    real_grown = lean.grown_cache
    monkeypatch.setattr(lean, "grown_cache", lambda *args: grown.append(args[-1]) or real_grown(*args))
    made: list[object] = []
    real = lean.step_masks

    def recording(*args: Any) -> object:
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(lean, "MASK_CHUNK", chunk)
    monkeypatch.setattr(lean, "step_masks", recording)
    chunked = engine.generate(policy, request)
    assert made and all(m is not None for m in made)  # the fast path ran (Qwen2 + sdpa gives plain mask tensors)
    decode_steps = request.params.max_new_tokens - 1  # steps 1-11 need masks: chunks start at steps 1, 4, 7, 10
    assert len(made) == -(-decode_steps // chunk)
    monkeypatch.setattr(lean, "step_masks", lambda *args: None)
    per_step = engine.generate(policy, request)
    assert chunked.token_ids == per_step.token_ids and chunked.logprobs == per_step.logprobs
    assert set(chunked.finish_reasons) == {"stop", "length"}
    width = max(len(ids) for ids in prompt_ids())
    if cache == "chunked" and chunk == 3:  # room for 3, then doubled (6, 12) when a chunk would not fit
        assert grown[: len(grown) // 2] == [width + 6, width + 12]
    else:
        assert not grown


def test_greedy_rows_do_not_depend_on_their_batch() -> None:
    """A prompt decoded alone or next to longer prompts (so behind more padding) gives the same tokens."""
    policy, engine, prompts = tiny_text_policy(eos_logit=None), HFEngine(decode="lean"), prompt_ids()
    batch = engine.generate(policy, request_for(prompts, samples=1, do_sample=False, eos_token_ids=()))
    for row, ids in enumerate(prompts):
        alone = engine.generate(policy, request_for([ids], samples=1, do_sample=False, eos_token_ids=()))
        assert alone.token_ids[0] == batch.token_ids[row]


def test_identical_prompts_are_prefilled_once() -> None:
    """The G copies of a prompt share one prefill row; rows equal only after padding (the pad id is also a prompt
    token here) are not merged, and the tokens stay `generate`'s."""
    policy, widths = tiny_text_policy(), []
    policy.module.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    engine, prompts, samples = HFEngine(decode="lean"), prompt_ids(3), 4
    engine.generate(policy, request_for(prompts, samples=samples, do_sample=False, eos_token_ids=()))
    assert widths[0] == (len(prompts), max(map(len, prompts))) and set(widths[1:]) == {(len(prompts) * samples, 1)}
    widths.clear()
    request = request_for([[50, 60], [60]], samples=3, do_sample=False, pad_token_id=50)
    assert_same(engine.generate(policy, request), HFEngine().generate(policy, request))
    assert widths[0] == (2, 2)


def test_lean_sampling_is_seeded_keeps_the_global_rng_and_respects_eos_and_budget() -> None:
    policy, engine = tiny_text_policy(), HFEngine(decode="lean", stop_check_every=1)
    request = request_for(prompt_ids(3), samples=6, max_new_tokens=9)
    before = torch.get_rng_state()
    first, again = engine.generate(policy, request), engine.generate(policy, request)
    assert torch.equal(torch.get_rng_state(), before)
    assert first.token_ids == again.token_ids
    other = engine.generate(policy, request_for(prompt_ids(3), samples=6, max_new_tokens=9, seed=4))
    assert other.token_ids != first.token_ids
    assert set(first.finish_reasons) == {"stop", "length"}
    for ids, reason in zip(first.token_ids, first.finish_reasons, strict=True):
        assert 1 <= len(ids) <= 9 and EOS_TOKEN_ID not in ids[:-1]
        assert (reason == "stop") == (ids[-1] == EOS_TOKEN_ID)
        assert reason == "stop" or len(ids) == 9


def test_lean_loop_stops_once_every_row_has_ended() -> None:
    """With EOS almost certain, every row stops within a few tokens and the loop runs no further forwards."""
    policy, calls = tiny_text_policy(eos_logit=12.0), []
    policy.module.register_forward_hook(lambda *args: calls.append(1))
    result = HFEngine(decode="lean", stop_check_every=1).generate(policy, request_for(prompt_ids(2), 4, seed=0))
    assert set(result.finish_reasons) == {"stop"}
    assert len(calls) == max(len(ids) for ids in result.token_ids) < 12


def test_stop_strings_fall_back_to_generate() -> None:
    """The lean loop cannot check stop strings: such requests give exactly `generate`'s results."""
    policy = tiny_text_policy()
    request = request_for(prompt_ids(3), samples=3, stop_strings=("a",))
    assert_same(HFEngine(decode="lean").generate(policy, request), HFEngine().generate(policy, request))


# ---------------------------------------------------------------------------------------------- distribution
PROMPT = [20, 30, 40]


def peaked_policy() -> CausalLMPolicy:
    """The tiny policy with random lm_head biases (std 2), so temperature and truncation visibly move the
    distribution (the random-init model alone is close to uniform)."""
    policy = tiny_text_policy(eos_logit=None)
    head = policy.module.lm_head
    bias = 2.0 * torch.randn(head.out_features, generator=torch.Generator().manual_seed(0))
    head.bias = torch.nn.Parameter(bias)
    return policy


SAMPLED = {"temperature": 0.8, "top_k": 6, "top_p": 0.9}
DRAWS = 6000


def exact_pair_probabilities(policy: CausalLMPolicy, params: SamplingParams) -> dict[tuple[int, int], float]:
    """P(first two tokens) under the warped distribution, computed from the model's logits (no sampling)."""
    warpers = sampling_warpers(params)

    def next_probs(ids: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            scores = policy.module(input_ids=torch.tensor(ids)).logits[:, -1].float()
        for warper in warpers:
            scores = warper(torch.tensor(ids), scores)  # type: ignore[arg-type]
        return torch.softmax(scores, dim=-1)

    first = next_probs([PROMPT])[0]
    support = first.nonzero().flatten().tolist()
    second = next_probs([[*PROMPT, token] for token in support])
    return {
        (a, int(b)): float(first[a] * second[i, b])
        for i, a in enumerate(support)
        for b in second[i].nonzero().flatten()
    }


def pair_counts(engine: HFEngine, policy: CausalLMPolicy, params: SamplingParams, seed: int) -> Counter[Any]:
    result = engine.generate(policy, GenerationRequest([PROMPT], params, DRAWS, seed, return_logprobs=False))
    return Counter(tuple(ids[:2]) for ids in result.token_ids)


def chi_square_p_value(counts: Counter[Any], probabilities: dict[tuple[int, int], float]) -> float:
    """Pearson's goodness-of-fit p-value; outcomes outside the support make it 0, rare cells are pooled."""
    if set(counts) - set(probabilities):
        return 0.0
    total = sum(counts.values())
    cells, pooled_observed, pooled_expected = [], 0.0, 0.0
    for pair, p in probabilities.items():
        if p * total >= 5:
            cells.append((counts[pair], p * total))
        else:
            pooled_observed, pooled_expected = pooled_observed + counts[pair], pooled_expected + p * total
    if pooled_expected > 0:
        cells.append((pooled_observed, pooled_expected))
    statistic = sum((o - e) ** 2 / e for o, e in cells)
    dof = torch.tensor((len(cells) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.mark.parametrize("decode", ["lean", "generate"])
@pytest.mark.parametrize("warped", [SAMPLED, {"temperature": 1.0}], ids=["temperature-top_k-top_p", "plain"])
def test_first_two_tokens_follow_the_warped_distribution(decode: str, warped: dict[str, Any]) -> None:
    """6000 draws of the first two tokens fit the exact warped distribution (chi-square) and never leave its
    support."""
    policy = peaked_policy()
    params = SamplingParams(max_new_tokens=2, **warped)
    counts = pair_counts(HFEngine(decode=decode), policy, params, seed=11)  # type: ignore[arg-type]
    assert chi_square_p_value(counts, exact_pair_probabilities(policy, params)) > 1e-3


def test_the_chi_square_check_rejects_a_nearby_temperature() -> None:
    """The same check has power: top-k draws at temperature 0.8 reject temperature 0.9 (same support)."""
    policy = peaked_policy()
    params = SamplingParams(max_new_tokens=2, temperature=0.8, top_k=6)
    counts = pair_counts(HFEngine(decode="lean"), policy, params, seed=11)
    assert chi_square_p_value(counts, exact_pair_probabilities(policy, params)) > 1e-3
    nearby = exact_pair_probabilities(policy, SamplingParams(max_new_tokens=2, temperature=0.9, top_k=6))
    assert set(nearby) == set(counts) and chi_square_p_value(counts, nearby) < 1e-6


def test_lean_and_generate_draws_agree_in_total_variation() -> None:
    """Two-sample check: the empirical pair distributions of both paths are within sampling noise of each other."""
    policy = peaked_policy()
    params = SamplingParams(max_new_tokens=2, **SAMPLED)  # type: ignore[arg-type]
    lean = pair_counts(HFEngine(decode="lean"), policy, params, seed=5)
    reference = pair_counts(HFEngine(), policy, params, seed=6)
    distance = 0.5 * sum(abs(lean[k] - reference[k]) for k in set(lean) | set(reference)) / DRAWS
    cells = len(exact_pair_probabilities(policy, params))
    assert distance < 0.5 * (cells / DRAWS) ** 0.5 + 0.02  # noise scale: ~sqrt(cells / draws) / 2


def test_inverse_cdf_sampling_never_draws_excluded_tokens() -> None:
    scores = torch.full((4000, 7), float("-inf"))
    scores[:, 2], scores[:, 5] = 0.0, 1.0  # everything else excluded, as top-k / top-p leave it
    scores[0] = torch.tensor([float("-inf")] * 6 + [3.0])  # only the last token
    torch.manual_seed(0)
    tokens = sample_rows(scores)
    assert tokens[0] == 6 and set(tokens[1:].tolist()) == {2, 5}
    share = (tokens[1:] == 5).double().mean()
    assert abs(share - torch.sigmoid(torch.tensor(1.0)).double()) < 0.03


# ---------------------------------------------------------------------------------------------- sampler contract
class TestLeanHFEngineContract(TextContract):
    """Shapes, ratio 1 on-policy, masks, gradients and seeding through SingleTurnSampler with the lean loop."""

    def make_sampler(self) -> SingleTurnSampler:
        return SingleTurnSampler(max_new_tokens=10, engine=HFEngine(decode="lean"))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_lean_engine_logprobs_are_the_policy_scores(temperature: float) -> None:
    policy = tiny_text_policy(temperature=temperature)
    sampler = SingleTurnSampler(max_new_tokens=10, engine=HFEngine(decode="lean"))
    rollout = sampler.sample(policy, tiny_prompts(3), 4, torch.Generator().manual_seed(0))
    engine, mask = rollout.data["engine_logprobs"], rollout.mask
    torch.testing.assert_close(engine[mask], rollout.old_logprobs[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("option", "value"), [("decode", "fast"), ("cache", "paged"), ("stop_check_every", 0)], ids=str
)
def test_bad_options_are_named(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        HFEngine(**{option: value})


@pytest.mark.gpu
@pytest.mark.parametrize("cache", CACHES)
def test_lean_decode_on_cuda(cache: str) -> None:
    """fp32 on CUDA: greedy tokens are `generate`'s. bf16: sampling runs on device (host check every 8 tokens) and
    the engine's log-probs stay near the policy's re-scored ones (bf16 rounding, so a loose bound)."""
    policy = tiny_text_policy(seed=2, eos_logit=0.5)
    policy.module.to("cuda")
    engine = HFEngine(decode="lean", cache=cache)  # type: ignore[arg-type]
    request = request_for(prompt_ids(), do_sample=False)
    lean, reference = engine.generate(policy, request), HFEngine().generate(policy, request)
    assert lean.token_ids == reference.token_ids and lean.finish_reasons == reference.finish_reasons
    policy.module.to(torch.bfloat16)
    rollout = SingleTurnSampler(max_new_tokens=12, engine=engine).sample(
        policy, tiny_prompts(3), 4, torch.Generator().manual_seed(0)
    )
    assert rollout.mask.any() and rollout.metrics["rollout/engine_logprob_abs_diff_mean"] < 0.05
