"""The optional vLLM engine is import-guarded: the modules import without vLLM, use fails clearly; its weight-sync
trigger (the weights version) moves with every update. The colocated engine's GPU contract is in
tests/toolkit/engines/test_engine_contract.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from modalities.text_agent import vllm_sampler
from modalities.text_agent.tiny import build_tiny_qwen2
from toolkit.engines import weights_version

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: the guard is not hit")
def test_missing_vllm_names_the_extra() -> None:
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
        vllm_sampler.VLLMSampler(model="Qwen/Qwen2.5-0.5B-Instruct", max_new_tokens=8)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
        vllm_sampler.SingleTurnSampler(engine="vllm")


def test_options_are_checked_before_vllm_is_needed() -> None:
    from toolkit.engines.vllm_engine import VLLMEngine

    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\), got 1.5"):
        VLLMEngine(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="max_model_len must be >= 1 or None, got 0"):
        VLLMEngine(max_model_len=0)


def test_weights_version_changes_after_an_update() -> None:
    model = build_tiny_qwen2(seed=0)
    before = weights_version(model)
    assert weights_version(model) == before
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert weights_version(model) > before
