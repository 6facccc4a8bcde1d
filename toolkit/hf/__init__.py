"""Helpers for Hugging Face token models (causal LMs and VLMs) that several modalities share: policy options,
LoRA handling (`policy`), the frozen reference copy (`reference`), and generation (`generation`)."""
