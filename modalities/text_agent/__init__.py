"""Text modality: causal-LM policy, single-turn sampler, and the tiny model/tokenizer for tests and demos."""

from modalities.text_agent.policy import CausalLMPolicy
from modalities.text_agent.sampler import SingleTurnSampler
from modalities.text_agent.tiny import build_char_tokenizer, build_tiny_qwen2, tiny_causal_lm, tiny_tokenizer

__all__ = [
    "CausalLMPolicy",
    "SingleTurnSampler",
    "build_char_tokenizer",
    "build_tiny_qwen2",
    "tiny_causal_lm",
    "tiny_tokenizer",
]
