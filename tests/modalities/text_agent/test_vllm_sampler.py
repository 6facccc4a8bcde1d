"""The optional vLLM engine is import-guarded: the module imports without vLLM, use fails clearly."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from modalities.text_agent import vllm_sampler
from modalities.text_agent.tiny import build_tiny_qwen2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: the guard is not hit")
def test_missing_vllm_names_the_extra() -> None:
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
        vllm_sampler.VLLMSampler(model="Qwen/Qwen2.5-0.5B-Instruct", max_new_tokens=8)


def test_weights_version_changes_after_an_update() -> None:
    model = build_tiny_qwen2(seed=0)
    before = vllm_sampler._weights_version(model)
    assert vllm_sampler._weights_version(model) == before
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert vllm_sampler._weights_version(model) != before
