"""Helpers for Hugging Face token models (causal LMs and VLMs) that several modalities share: policy options,
LoRA handling (`policy`), the frozen reference copy (`reference`), chunked token log-probs (`logprobs`) and
generation (`generation`)."""
