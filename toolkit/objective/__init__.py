"""The policy loss: policy terms, KL estimators and loss aggregation composed by one `PolicyObjective`
(`toolkit.objective.PolicyObjective` in configs)."""

from toolkit.objective.aggregation import ObjectiveOutput
from toolkit.objective.policy_objective import PolicyObjective

__all__ = ["ObjectiveOutput", "PolicyObjective"]
