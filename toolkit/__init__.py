"""Shared core: rollouts, reward transforms, normalizers, objectives, trainer."""
