"""Reward-level transforms between the reward models and the normalizer, one module per method, exported here
for `_component_` paths (`toolkit.reward_transforms.TruncationPenalty`)."""

from toolkit.reward_transforms.dler import DifficultyTiers, TruncationPenalty
from toolkit.reward_transforms.medgrpo import LogisticDatasetNorm, PercentileTable
from toolkit.reward_transforms.ppr import ReNorm
from toolkit.reward_transforms.pref_grpo import PairwiseWinRate
from toolkit.reward_transforms.weighted_sum import WeightedSum

__all__ = [
    "DifficultyTiers",
    "LogisticDatasetNorm",
    "PairwiseWinRate",
    "PercentileTable",
    "ReNorm",
    "TruncationPenalty",
    "WeightedSum",
]
