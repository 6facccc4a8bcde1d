"""Helpers for Hugging Face token models (causal LMs and VLMs) that several modalities share: policy options,
LoRA and reference handling (`policy`), and generation (`generation`)."""
