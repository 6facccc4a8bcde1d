"""Reward models, verifiers and judges, usable without the trainer."""
