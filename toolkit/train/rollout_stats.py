"""Per-step statistics of a processed rollout: lengths, truncation, advantage scale and, for normalizers that
work within groups, the illusory-advantage diagnostic (`toolkit.advantages.diagnostics`), warned on when most
groups' advantages come from reward noise."""

from __future__ import annotations

import math
import warnings
from typing import Any

from toolkit.advantages.diagnostics import ILLUSORY_METRIC, illusory_advantage_metrics
from toolkit.rollout import Rollout
from toolkit.train.scoring import nanmean

# Above this fraction of illusory groups in a step the run warns (once per process: Python's warning filter).
ILLUSORY_WARN_FRAC = 0.25


def rollout_metrics(rollout: Rollout, within_groups: bool = True) -> dict[str, float]:
    """Length, truncation and advantage statistics of a processed rollout.

    `within_groups`: the normalizer compares the responses of one prompt (see `normalizes_within_groups`);
    only then is `advantage/illusory_frac` computed (a critic's advantages are another matter).
    """
    metrics: dict[str, float] = {}
    lengths = rollout.lengths if rollout.lengths is not None else rollout.mask.sum(dim=1)
    metrics["rollout/length_mean"] = float(lengths.float().mean())
    metrics["rollout/length_max"] = float(lengths.max())
    if rollout.truncated is not None:
        metrics["rollout/truncated_frac"] = float(rollout.truncated.float().mean())
    if rollout.advantages is not None:
        adv = rollout.advantages
        metrics["advantage/mean"] = float(adv.float().mean())
        metrics["advantage/std"] = float(adv.float().std()) if adv.numel() > 1 else 0.0
        metrics["advantage/abs_max"] = float(adv.abs().max())
        if within_groups:
            metrics.update(illusory_metrics(rollout))
    if rollout.scores is not None:
        metrics["reward/score_mean"] = nanmean(rollout.scores)
    return metrics


def illusory_metrics(rollout: Rollout) -> dict[str, float]:
    """`advantage/illusory_frac` when some group qualifies (omitted otherwise); warns when it is high."""
    fraction = illusory_advantage_metrics(rollout).get(ILLUSORY_METRIC, math.nan)
    if math.isnan(fraction):
        return {}
    if fraction > ILLUSORY_WARN_FRAC:
        warnings.warn(
            f"{fraction:.0%} of this step's groups have near-identical rewards (std < 1e-3) but unit-scale "
            "advantages: std normalization is amplifying reward noise. Consider a mean-only baseline "
            "(GroupNormalizer scale_by_std: false, Dr. GRPO), a std floor, or a less noisy reward",
            stacklevel=2,
        )
    return {ILLUSORY_METRIC: fraction}


def normalizes_within_groups(normalizer: Any) -> bool:
    """True when `normalizer` (or the one it wraps, as `inner` or `base`) declares `needs_groups`.

    The declaration is a class attribute, or a class method of the constructor arguments (read back from the
    instance's attributes), as `toolkit.train.trainer_config.check_group_size` reads it from a config.
    """
    for name in ("inner", "base"):
        wrapped = vars(normalizer).get(name) if hasattr(normalizer, "__dict__") else None
        if wrapped is not None and callable(wrapped):
            return normalizes_within_groups(wrapped)
    flag = getattr(type(normalizer), "needs_groups", False)
    if callable(flag):
        return bool(flag(vars(normalizer) if hasattr(normalizer, "__dict__") else {}))
    return bool(flag)
