"""Text rewards: verifiers (math, exact match), format rewards, toy task rewards."""
