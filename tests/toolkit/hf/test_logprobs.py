"""Chunked token log-probs (toolkit.hf.logprobs) against the direct fp32 formula they replace.

Log-probs and entropies are bit-identical for fp32 and bf16 logits, with and without temperature and suppressed
ids, for any block size; the log-probs' gradient is bit-identical too (the backward replays autograd's ops), the
entropy's within float rounding; and no fp32 [N, T, V] tensor is kept for backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from modalities.text_agent.tiny import build_tiny_qwen2
from toolkit.hf.logprobs import token_log_probs, token_log_probs_and_entropy

VOCAB = 300


def direct(logits: Tensor, tokens: Tensor, temperature: float, suppressed: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """The formula the policies used before: full fp32 copy, logsumexp over V, entropy from the softmax."""
    scaled = logits.float() / temperature
    if suppressed:
        scaled = scaled.index_fill(-1, torch.tensor(list(suppressed)), -math.inf)
    normalizer = torch.logsumexp(scaled, dim=-1)
    picked = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    probs = torch.softmax(scaled, dim=-1)
    return picked - normalizer, normalizer - torch.where(probs > 0, probs * scaled, 0.0).sum(-1)


def sample(dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(model output [3, 12, V] leaf, its strided response view [3, 11, V], tokens [3, 11])."""
    generator = torch.Generator().manual_seed(seed)
    output = (3 * torch.randn(3, 12, VOCAB, generator=generator)).to(dtype).requires_grad_()
    tokens = torch.randint(0, VOCAB, (3, 11), generator=generator)
    return output, output[:, :-1], tokens


CASES = [
    (dtype, temperature, suppressed, chunk)
    for dtype in (torch.float32, torch.bfloat16)
    for temperature in (1.0, 0.7)
    for suppressed in ((), (3, 5))
    for chunk in (1, 4, 11, 25, None)
]


@pytest.mark.parametrize(("dtype", "temperature", "suppressed", "chunk"), CASES)
def test_values_and_logprob_gradient_are_bit_identical(
    dtype: torch.dtype, temperature: float, suppressed: tuple[int, ...], chunk: int | None
) -> None:
    output, logits, tokens = sample(dtype)
    weights = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    expected, expected_entropy = direct(logits, tokens, temperature, suppressed)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), output)

    logprobs = token_log_probs(logits, tokens, temperature, suppressed, chunk)
    (grad,) = torch.autograd.grad((logprobs * weights).sum(), output)
    both, entropy = token_log_probs_and_entropy(logits, tokens, temperature, suppressed, chunk)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert torch.equal(logprobs, expected) and torch.equal(both, expected)
    assert torch.equal(entropy, expected_entropy)
    assert grad.dtype == dtype and torch.equal(grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_entropy_gradient_matches_autograd(dtype: torch.dtype, chunk: int | None) -> None:
    output, logits, tokens = sample(dtype, seed=2)
    generator = torch.Generator().manual_seed(3)
    weights, entropy_weights = torch.randn(2, *tokens.shape, generator=generator)
    expected, expected_entropy = direct(logits, tokens, 0.8)
    (expected_grad,) = torch.autograd.grad((expected * weights + expected_entropy * entropy_weights).sum(), output)
    logprobs, entropy = token_log_probs_and_entropy(logits, tokens, 0.8, chunk_rows=chunk)
    (grad,) = torch.autograd.grad((logprobs * weights + entropy * entropy_weights).sum(), output)
    # The closed form p (E[x] - x) rounds differently from autograd's chain through softmax: fp32 rounding, or one
    # bf16 step of the stored gradient.
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 1e-2}
    torch.testing.assert_close(grad, expected_grad, **tolerance)


def test_suppressed_ids_give_the_exact_entropy_gradient() -> None:
    """With suppressed ids the direct formula's backward sends 0·(-inf) = NaN through softmax·x; the closed form gives
    the fp64 reference: entropy over the other ids, zero gradient on the suppressed ones."""
    output, logits, tokens = sample(torch.float32, seed=4)
    _, entropy = token_log_probs_and_entropy(logits, tokens, 1.0, suppressed=(3, 5))
    (grad,) = torch.autograd.grad(entropy.sum(), output)
    kept = torch.ones(VOCAB, dtype=torch.bool)
    kept[[3, 5]] = False
    reference = output.detach().double().requires_grad_()
    log_probs = torch.log_softmax(reference[:, :-1, kept], dim=-1)
    (expected,) = torch.autograd.grad(-(log_probs.exp() * log_probs).sum(), reference)
    assert bool((grad[..., [3, 5]] == 0).all())
    torch.testing.assert_close(grad.double(), expected, atol=1e-5, rtol=1e-5)
    (direct_grad,) = torch.autograd.grad(direct(logits, tokens, 1.0, (3, 5))[1].sum(), output)
    assert torch.isnan(direct_grad).any()  # why the video policy's entropy bonus needed this


@pytest.mark.parametrize("with_entropy", [False, True])
def test_model_gradients_equal_the_direct_formula(with_entropy: bool) -> None:
    """Through a tiny Qwen2: the parameters' gradients equal the direct formula's (bitwise for the log-probs)."""
    model = build_tiny_qwen2(seed=0)
    input_ids = torch.randint(0, 100, (4, 17), generator=torch.Generator().manual_seed(5))
    tokens, weights = input_ids[:, -8:], torch.randn(4, 8, generator=torch.Generator().manual_seed(6))

    def parameter_grads(chunked: bool) -> list[Tensor]:
        logits = model(input_ids=input_ids).logits[:, -9:-1]
        if chunked:
            logprobs, entropy = token_log_probs_and_entropy(logits, tokens, 0.9, chunk_rows=5)
        else:
            logprobs, entropy = direct(logits, tokens, 0.9)
        loss = (logprobs * weights).sum() + (0.1 * entropy.sum() if with_entropy else 0.0)
        return list(torch.autograd.grad(loss, list(model.parameters())))

    for chunked, expected in zip(parameter_grads(True), parameter_grads(False), strict=True):
        if with_entropy:
            torch.testing.assert_close(chunked, expected, atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(chunked, expected)


def test_no_fp32_copy_of_the_logits_is_saved_for_backward() -> None:
    """The direct formula keeps an fp32 [N, T, V] tensor for backward; the chunked one keeps the bf16 logits only."""
    _, logits, tokens = sample(torch.bfloat16)
    full = logits.shape.numel()

    def saved_fp32_elements(function: object) -> int:
        sizes: list[int] = []

        def pack(tensor: Tensor) -> Tensor:
            if tensor.dtype == torch.float32:
                sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            function(logits, tokens, 1.0)  # type: ignore[operator]
        return sum(sizes)

    assert saved_fp32_elements(direct) >= full
    assert saved_fp32_elements(token_log_probs_and_entropy) <= 2 * tokens.numel()


@pytest.mark.parametrize("shape", [(11,), (2, 3, 11)])
def test_any_leading_shape(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(*shape, VOCAB, generator=generator)
    tokens = torch.randint(0, VOCAB, shape, generator=generator)
    logprobs, entropy = token_log_probs_and_entropy(logits, tokens, 1.3, chunk_rows=4)
    expected, expected_entropy = direct(logits, tokens, 1.3)
    assert logprobs.shape == entropy.shape == shape
    assert torch.equal(logprobs, expected) and torch.equal(entropy, expected_entropy)


def test_bad_arguments_name_the_value() -> None:
    logits, tokens = torch.randn(2, 3, VOCAB), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="tokens"):
        token_log_probs(logits, tokens[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        token_log_probs(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        token_log_probs(logits, tokens, chunk_rows=0)
