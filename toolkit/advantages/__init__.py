"""Rewards → advantages: one method family per module, exported here for `_component_` paths
(`toolkit.advantages.GroupNormalizer`). Shared statistics conventions live in `stats`."""

from toolkit.advantages.batch import BatchWhitenNormalizer, GroupMeanBatchStdNormalizer
from toolkit.advantages.beta import BetaNormalizer
from toolkit.advantages.boost import CorrectSampleBoost
from toolkit.advantages.gae import GAENormalizer
from toolkit.advantages.group import GroupNormalizer, LeaveOneOutNormalizer
from toolkit.advantages.history import PromptHistoryNormalizer
from toolkit.advantages.multi_reward import MultiRewardNormalizer
from toolkit.advantages.turn import TurnGroupNormalizer

__all__ = [
    "BatchWhitenNormalizer",
    "BetaNormalizer",
    "CorrectSampleBoost",
    "GAENormalizer",
    "GroupMeanBatchStdNormalizer",
    "GroupNormalizer",
    "LeaveOneOutNormalizer",
    "MultiRewardNormalizer",
    "PromptHistoryNormalizer",
    "TurnGroupNormalizer",
]
