"""The policy loss: policy terms, KL estimators and loss aggregation composed by one `PolicyObjective`
(`toolkit.objective.PolicyObjective` in configs, its `term:` a `toolkit.objective.ClipTerm`, `CISPOTerm` or
`SAPOTerm`)."""

from toolkit.objective.aggregation import ObjectiveOutput
from toolkit.objective.policy_objective import PolicyObjective
from toolkit.objective.terms import CISPOTerm, ClipTerm, PolicyTerm, PolicyTermOutput, SAPOTerm

__all__ = ["CISPOTerm", "ClipTerm", "ObjectiveOutput", "PolicyObjective", "PolicyTerm", "PolicyTermOutput", "SAPOTerm"]
