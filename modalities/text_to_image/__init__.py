"""Text-to-image modality: flow-matching (SD3 / FLUX) policies, the SDE sampler with log-probs, text encoding."""
