"""Each `configs/algorithms/*.yaml` preset reproduces its paper's formula on a toy batch.

The presets are built from YAML with `instantiate` (transforms, normalizer, objective) and run on a
`Rollout` of 3 groups × G = 4 rows and T = 5 steps with padding (NaN log-probs at padded steps, which
must never leak). Advantages and losses are compared with independent numpy oracles written here from
the papers' formulas (float64; tolerance 1e-5), and a second test pins the spec's worked examples.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from toolkit.config import import_object, instantiate, load_config
from toolkit.rollout import Rollout

ALGORITHMS = Path(__file__).resolve().parents[1] / "configs" / "algorithms"
PRESETS = ["bnpo", "cispo", "dapo", "didi", "dler", "dr_grpo", "flow_grpo", "gspo", "grpo", "medgrpo", "ppr"]
PRESETS += ["pref_grpo", "reinforce_pp", "rloo"]
B, G, T = 3, 4, 5
N = B * G
GROUPS = np.repeat(np.arange(B), G)
LENGTHS = np.array([5, 3, 4, 2, 5, 5, 1, 3, 4, 2, 5, 3])
MASK = np.arange(T)[None, :] < LENGTHS[:, None]
R_CONT = [0.2, 0.9, 0.4, 0.4, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]  # group 2 is constant
R_E1 = [1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]  # docs/methods/bnpo.md E1


def _f32(values: Any) -> np.ndarray:
    """float64 copy of the float32-rounded values (what the library sees)."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def _toy_arrays() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    old = -rng.uniform(0.1, 2.0, (N, T))
    lp = old + rng.normal(0.0, 0.3, (N, T))
    lp[[1, 6, 9], 0] = old[[1, 6, 9], 0] + 2.5  # ratio 12.2: beyond every clip bound and the dual clip 10
    lp[[2, 4], 0] = old[[2, 4], 0] - 2.5
    ref = lp + rng.normal(0.0, 0.2, (N, T))
    entropy = rng.uniform(0.5, 2.0, (N, T))
    kl = rng.uniform(0.0, 0.1, (N, T))
    values = np.where(MASK, rng.uniform(0.0, 0.5, (N, T)), 0.0)
    arrays = [_f32(a) for a in (old, lp, ref, entropy, kl, values)]
    for a in arrays[:5]:
        a[~MASK] = np.nan  # padding must never reach the loss
    return tuple(arrays)


OLD, LP, REF, ENTROPY, KL, VALUES = _toy_arrays()


# ------------------------------------------------------------------------------------------ numpy oracles


def np_group_z(r: Any, ddof: int, eps: float, scale: bool = True, groups: np.ndarray = GROUPS) -> np.ndarray:
    """(r - mean_g) / (std_g + eps) per group (or r - mean_g), constant groups exactly 0."""
    r, out = _f32(r), np.zeros(len(groups))
    for g in np.unique(groups):
        x = r[groups == g]
        if x.max() > x.min():
            d = x - x.mean()
            out[groups == g] = d / (x.std(ddof=ddof) + eps) if scale else d
    return out


def np_leave_one_out(r: Any) -> np.ndarray:
    r, out = _f32(r), np.zeros(N)
    for g in range(B):
        x = r[np.equal(GROUPS, g)]
        out[np.equal(GROUPS, g)] = x - (x.sum() - x) / (len(x) - 1)
    return out


def np_token_whiten(values: np.ndarray, weights: np.ndarray, eps: float) -> np.ndarray:
    """(v - mean_w) * rsqrt(var_w + eps), weighted mean and Bessel-corrected variance (n = sum of weights)."""
    n = weights.sum()
    mean = (weights * values).sum() / n
    var = (weights * (values - mean) ** 2).sum() / (n - 1)
    return np.asarray((values - mean) / math.sqrt(var + eps), dtype=np.float64)


def np_bnpo(r: Any, groups: np.ndarray = GROUPS) -> np.ndarray:
    """A = (s - p)/f_N(p; alpha, beta) with the method-of-moments Beta fit over per-prompt p
    (docs/methods/bnpo.md §3-5)."""
    s, ids = _f32(r), np.unique(groups)
    p = np.array([s[groups == g].mean() for g in ids])
    mu, var = p.mean(), p.var(ddof=1)
    k = mu * (1 - mu) / var - 1
    alpha, beta = max(1.0, 1 + k * mu / 3), max(1.0, 1 + k * (1 - mu) / 3)
    log_norm = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    out = np.zeros(len(s))
    for g, pg in zip(ids, p, strict=True):
        if 0 < pg < 1:
            density = math.exp((alpha - 1) * math.log(pg) + (beta - 1) * math.log(1 - pg) - log_norm)
            out[groups == g] = (s[groups == g] - pg) / density
    return out


def np_dler(correct: Any, lengths: np.ndarray, max_length: int, groups: np.ndarray = GROUPS) -> np.ndarray:
    """DLER Eq. 3: R' = R·1[len <= L], A = R' - mean_g, then (A - mean_batch)/(std_batch + 1e-8), unbiased."""
    r = _f32(correct) * (lengths <= max_length)
    centred = np_group_z(r, ddof=0, eps=0.0, scale=False, groups=groups)
    out = (centred - centred.mean()) / (centred.std(ddof=1) + 1e-8)
    constant = np.array([r[groups == g].max() == r[groups == g].min() for g in groups])
    return np.where(constant, 0.0, out)


def np_ppr(boundaries: list[list[int]], prm: list[list[float | None]], outcome: Any, values: np.ndarray) -> np.ndarray:
    """ReNorm rewards (r_p + r_o - 1 at judged turns, r_o at the final token; invalid r_p = 0.5), GAE with
    gamma = lambda = 1 (A_t = sum_{t' >= t} r - V_t) and token whitening (unbiased, rsqrt(var + 1e-8))."""
    n, t = values.shape
    rewards, advantages, mask = np.zeros((n, t)), np.zeros((n, t)), np.zeros((n, t), dtype=bool)
    for i, ends in enumerate(boundaries):
        for pos, rp in zip(ends[:-1], prm[i], strict=True):
            rewards[i, pos] = (0.5 if rp is None else rp) + outcome[i] - 1.0
        rewards[i, ends[-1]] = outcome[i]
        length = ends[-1] + 1
        mask[i, :length] = True
        advantages[i, :length] = np.cumsum(rewards[i, :length][::-1])[::-1] - values[i, :length]
    out = np.zeros((n, t))
    out[mask] = np_token_whiten(advantages[mask], np.ones(mask.sum()), 1e-8)
    return out


def np_win_rates(pairs: np.ndarray) -> np.ndarray:
    """wins_i / (G - 1) from upper-triangle judgements (1 = lower index wins), NaN counted as a tie, 3 decimals."""
    g = pairs.shape[-1]
    out = np.zeros(pairs.shape[:-1])
    for b in range(pairs.shape[0]):
        for i in range(g):
            wins = 0.0
            for j in range(g):
                if i != j:
                    v = pairs[b, min(i, j), max(i, j)]
                    v = 0.5 if math.isnan(v) else v
                    wins += v if i < j else 1.0 - v
            out[b, i] = round(wins / (g - 1), 3)
    return out.reshape(-1)


def np_kl(name: str, lp: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """k1 = log pi - log pi_ref, k2 = (log pi - log pi_ref)^2 / 2, k3 = r - 1 - log r (r = pi_ref/pi, verl clamps)."""
    log_r = np.clip(ref - lp, -20, 20)
    k3 = np.clip(np.expm1(log_r) - log_r, -10, 10)
    values: dict[str, np.ndarray] = {"k1": lp - ref, "k2": 0.5 * (lp - ref) ** 2, "k3": k3}
    return values[name]


@dataclass(frozen=True)
class Loss:
    """The policy-loss conventions a preset must implement (written from the paper, not read from YAML)."""

    clip_low: float
    clip_high: float
    aggregation: str
    dual_clip: float | None = None
    term: str = "clip"
    level: str = "token"
    kl: tuple[str, float] = ("k3", 0.0)
    entropy_coef: float = 0.0
    norm_length: float = 0.0
    cispo_eps_high: float = 0.0


def np_aggregate(x: np.ndarray, how: str, mask: np.ndarray, norm_length: float) -> float:
    x = np.where(mask, x, 0.0)
    tokens, rows = mask.sum(1), int(mask.any(1).sum())
    if how == "token_mean":
        return float(x.sum() / mask.sum())
    if how == "seq_mean_token_mean":
        return float((x.sum(1) / np.maximum(tokens, 1)).sum() / rows)
    if how == "seq_mean_token_sum":
        return float(x.sum() / rows)
    assert how == "seq_mean_token_sum_norm"
    return float(x.sum() / (rows * norm_length))


def np_loss(spec: Loss, adv: np.ndarray, kl: np.ndarray | None, mask: np.ndarray = MASK) -> float:
    """PPO clip (decoupled bounds, dual clip) or CISPO, token or GSPO sequence ratio, KL, entropy, aggregation."""
    lp, old, ref = (np.where(mask, a, 0.0) for a in (LP, OLD, REF))
    a = np.where(mask, adv if adv.ndim == 2 else np.repeat(adv[:, None], mask.shape[1], 1), 0.0)
    log_ratio = np.clip(lp - old, -20, 20)
    if spec.level == "sequence":
        seq = (log_ratio * mask).sum(1) / np.maximum(mask.sum(1), 1)
        log_ratio = np.repeat(seq[:, None], mask.shape[1], 1)
    ratio = np.exp(log_ratio)
    if spec.term == "cispo":
        steps = -np.minimum(ratio, 1 + spec.cispo_eps_high) * a * lp
    else:
        steps = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - spec.clip_low, 1 + spec.clip_high))
        if spec.dual_clip is not None:
            steps = np.where(a < 0, np.minimum(steps, -spec.dual_clip * a), steps)
    loss = np_aggregate(steps, spec.aggregation, mask, spec.norm_length)
    name, coef = spec.kl
    if coef:
        kl_steps = np_kl(name, lp, ref) if kl is None else kl
        loss += coef * np_aggregate(kl_steps, spec.aggregation, mask, spec.norm_length)
    if spec.entropy_coef:
        loss -= spec.entropy_coef * np_aggregate(ENTROPY, spec.aggregation, mask, spec.norm_length)
    return loss


# -------------------------------------------------------------------------------------------- the cases


def make_rollout(scores: Any, **fields: Any) -> Rollout:
    scores_t = torch.tensor(scores, dtype=torch.float32)
    return Rollout(
        group_ids=torch.tensor(GROUPS),
        old_logprobs=torch.tensor(OLD, dtype=torch.float32),
        mask=torch.tensor(MASK),
        rewards={"score": scores_t.clone()},
        scores=scores_t,
        lengths=torch.tensor(LENGTHS),
        **fields,
    )


@dataclass
class Case:
    rollout: Rollout
    advantages: np.ndarray
    loss: Loss
    overrides: tuple[str, ...] = ()
    analytic_kl: bool = False


def case_dler(tmp: Path) -> Case:
    correct = [1, 0, 1, 1, 1, 1, 0, 1, 0, 0, 1, 0]  # after L = 4: group 2 is all 0 (its raw score is not)
    loss = Loss(0.2, 0.28, "token_mean", dual_clip=10.0, kl=("k2", 5e-4))
    return Case(make_rollout(correct), np_dler(correct, LENGTHS, 4), loss, ("transforms.0.max_length=4",))


PPR_ENDS = {5: [1, 3, 4], 4: [1, 3], 3: [0, 2], 2: [1], 1: [0]}
PPR_PRM: list[list[float | None]] = [
    [4 / 6, None], [0.2], [1.0], [], [0.5, 0.25], [0.0, 0.6], [], [0.8], [0.3], [], [0.9, 0.1], [0.4]
]  # fmt: skip


def case_ppr(tmp: Path) -> Case:
    outcome = [1.0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0]
    ends = [PPR_ENDS[int(n)] for n in LENGTHS]
    turn_ends = np.zeros((N, T), dtype=bool)
    for i, e in enumerate(ends):
        turn_ends[i, e] = True
    rollout = make_rollout(outcome, turn_ends=torch.tensor(turn_ends), values=torch.tensor(VALUES, dtype=torch.float32))
    rollout.data["process_rewards"] = PPR_PRM
    expected = np_ppr(ends, PPR_PRM, outcome, VALUES)
    return Case(rollout, expected, Loss(0.2, 0.2, "token_mean", entropy_coef=0.001))


def case_flow_grpo(tmp: Path) -> Case:
    r = _f32(R_CONT)
    means = np.array([r[np.equal(GROUPS, g)].mean() for g in GROUPS])
    expected = np.clip(np.where(r == means, 0.0, (r - means) / (r.std(ddof=0) + 1e-4)), -5, 5)
    rollout = make_rollout(R_CONT, prompt_keys=[f"prompt-{g}" for g in GROUPS])
    loss = Loss(1e-4, 1e-4, "seq_mean_token_mean", kl=("analytic", 0.04))
    return Case(rollout, expected, loss, analytic_kl=True)


# docs/methods/pref_grpo.md P1: entry (i, j) = 1 when the lower index i wins ("(0,1)->0" means image 0 wins).
P1_PAIRS = {(0, 1): 1.0, (0, 2): 0.0, (0, 3): 1.0, (1, 2): 0.0, (1, 3): 0.5, (2, 3): 1.0}
CLIP_SCORES = [0.31, 0.30, 0.33, 0.29, 0.2, 0.25, 0.22, 0.3, 0.28, 0.28, 0.28, 0.28]


def pairwise_matrices() -> np.ndarray:
    pairs = np.full((B, G, G), np.nan)
    for (i, j), v in P1_PAIRS.items():
        pairs[0, i, j] = v
    for (i, j), v in {(0, 1): 1.0, (0, 2): np.nan, (0, 3): 1.0, (1, 2): 0.0, (1, 3): 1.0, (2, 3): 0.5}.items():
        pairs[1, i, j] = v  # (0, 2) unparsable: a tie
    for i, j in P1_PAIRS:
        pairs[2, i, j] = 0.5  # all ties: constant win rates
    return pairs


def case_pref_grpo(tmp: Path) -> Case:
    pairs = pairwise_matrices()
    rollout = make_rollout(np.zeros(N))
    rollout.rewards = {"clip": torch.tensor(CLIP_SCORES, dtype=torch.float32)}
    rollout.data["pairwise"] = torch.tensor(pairs, dtype=torch.float32)
    mixed = 0.7 * np_group_z(np_win_rates(pairs), 1, 1e-8) + 1.4 * np_group_z(CLIP_SCORES, 1, 1e-8)
    return Case(rollout, np.clip(mixed, -5, 5), Loss(1e-4, 1e-4, "seq_mean_token_mean"))


MED_TABLE = {
    "version": 1,
    "pairs": {
        "cholec80": {"tal": {"p25": 0.4, "p50": 0.5, "p75": 0.6}},
        "egosurgery": {"stg": {"p25": 0.07, "p50": 0.12, "p75": 0.17}},
    },
    "tasks": {"tal": {"p25": 0.4, "p50": 0.4, "p75": 0.4}},  # IQR 0: the 1e-3 floor applies
}
MED_ROWS = [("cholec80", "tal")] * 4 + [("egosurgery", "stg")] * 4 + [("avos", "tal")] * 4  # avos/tal: unseen


def write_med_table(tmp: Path) -> Path:
    path = tmp / "percentiles.json"
    path.write_text(json.dumps(MED_TABLE))
    return path


def case_medgrpo(tmp: Path) -> Case:
    x = [0.5, 0.6, 0.3, 0.5, 0.12, 0.2, 0.05, 0.3, 0.4, 0.4005, 0.399, 0.41]
    stats = [(0.5, 0.2)] * 4 + [(0.12, 0.1)] * 4 + [(0.4, 1e-3)] * 4  # (p50, max(IQR, 1e-3)) per row
    r = [1 / (1 + math.exp(-3.0 * (xi - p50) / iqr)) for xi, (p50, iqr) in zip(_f32(x), stats, strict=True)]
    rollout = make_rollout(x, dataset_ids=[d for d, _ in MED_ROWS], task_ids=[t for _, t in MED_ROWS])
    overrides = (f"transforms.0.table={write_med_table(tmp)}",)
    return Case(rollout, np_group_z(_f32(r), 1, 1e-6), Loss(0.2, 0.3, "token_mean"), overrides)


def simple_case(scores: Any, advantages: np.ndarray, loss: Loss, *overrides: str) -> Callable[[Path], Case]:
    return lambda tmp: Case(make_rollout(scores), advantages, loss, tuple(overrides))


R_DAPO = [1.0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0]
R_DIDI = [0.5, -0.2, 1.3, 0.1, 5.0, 0, 0, 0, 2, 2, 2, 2]  # docs/methods/didi_instruct.md E5
CASES: dict[str, Callable[[Path], Case]] = {
    "grpo": simple_case(R_CONT, np_group_z(R_CONT, 1, 1e-6), Loss(0.2, 0.2, "seq_mean_token_mean", kl=("k3", 0.04))),
    "dr_grpo": simple_case(
        R_CONT,
        np_group_z(R_CONT, 1, 1e-6, scale=False),
        Loss(0.2, 0.2, "seq_mean_token_sum_norm", norm_length=5.0),
        "objective.norm_length=5",
    ),
    "dapo": simple_case(R_DAPO, np_group_z(R_DAPO, 1, 1e-6), Loss(0.2, 0.28, "token_mean")),
    "gspo": simple_case(R_CONT, np_group_z(R_CONT, 1, 1e-6), Loss(3e-4, 4e-4, "seq_mean_token_mean", level="sequence")),
    "rloo": simple_case(R_CONT, np_leave_one_out(R_CONT), Loss(0.2, 0.2, "seq_mean_token_sum")),
    "cispo": simple_case(
        R_CONT, np_group_z(R_CONT, 1, 1e-6), Loss(0.2, 0.2, "token_mean", term="cispo", cispo_eps_high=0.28)
    ),
    "reinforce_pp": simple_case(
        R_CONT, np_token_whiten(_f32(R_CONT), LENGTHS.astype(float), 1e-8), Loss(0.2, 0.2, "token_mean")
    ),
    "bnpo": simple_case(R_E1, np_bnpo(R_E1), Loss(0.2, 0.28, "seq_mean_token_sum", dual_clip=10.0)),
    "dler": case_dler,
    "ppr": case_ppr,
    "flow_grpo": case_flow_grpo,
    "pref_grpo": case_pref_grpo,
    "medgrpo": case_medgrpo,
    "didi": lambda tmp: Case(
        make_rollout(R_DIDI),
        np.clip(np_group_z(R_DIDI, 1, 1e-8), -3, 3),
        Loss(0.2, 0.2, "seq_mean_token_sum", kl=("analytic", 0.01), entropy_coef=5e-4),
        analytic_kl=True,
    ),
}


def build(name: str, overrides: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[Any], Any, Any]:
    """The preset's config and its transforms, normalizer and objective, built with `instantiate`."""
    cfg = load_config(ALGORITHMS / f"{name}.yaml", overrides)
    transforms = [instantiate(node, where=f"transforms.{i}") for i, node in enumerate(cfg.get("transforms", []))]
    return cfg, transforms, instantiate(cfg["normalizer"], "normalizer"), instantiate(cfg["objective"], "objective")


def advantages_of(name: str, rollout: Rollout, overrides: tuple[str, ...] = ()) -> tuple[Rollout, torch.Tensor]:
    _, transforms, normalizer, _ = build(name, overrides)
    for transform in transforms:
        rollout = transform(rollout)
    return rollout, normalizer(rollout).values


# ---------------------------------------------------------------------------------------------- tests


def test_every_preset_has_a_case() -> None:
    assert sorted(p.stem for p in ALGORITHMS.glob("*.yaml")) == sorted(PRESETS) == sorted(CASES)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_reproduces_its_formula(name: str, tmp_path: Path) -> None:
    case = CASES[name](tmp_path)
    _, _, _, objective = build(name, case.overrides)
    rollout, adv = advantages_of(name, case.rollout, case.overrides)
    np.testing.assert_allclose(adv.double().numpy(), case.advantages, rtol=1e-5, atol=1e-5)
    exact_zero = case.advantages == 0
    assert torch.all(adv[torch.tensor(exact_zero)] == 0), "constant groups must give exact zeros"
    kl = torch.tensor(KL, dtype=torch.float32) if case.analytic_kl else None
    out = objective(
        torch.tensor(LP, dtype=torch.float32),
        rollout.old_logprobs,
        adv,
        rollout.mask,
        ref_logprobs=torch.tensor(REF, dtype=torch.float32),
        entropy=torch.tensor(ENTROPY, dtype=torch.float32),
        kl=kl,
    )
    expected = np_loss(case.loss, case.advantages, KL if case.analytic_kl else None)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert math.isfinite(out.loss.item())


def one_group(scores: list[float], t: int = 2) -> Rollout:
    n = len(scores)
    return Rollout(
        group_ids=torch.zeros(n, dtype=torch.long),
        old_logprobs=torch.zeros(n, t),
        mask=torch.ones(n, t, dtype=torch.bool),
        scores=torch.tensor(scores),
        lengths=torch.full((n,), t),
    )


def spec_p3() -> Rollout:
    """docs/methods/ppr.md P3: T = 8, boundaries (2, 5, 7) and (3, 5), judge (4/6, 3/5) and (1/4), r_o = (1, 0)."""
    turn_ends = torch.zeros(2, 8, dtype=torch.bool)
    turn_ends[0, [2, 5, 7]] = True
    turn_ends[1, [3, 5]] = True
    mask = torch.arange(8)[None, :] < torch.tensor([[8], [6]])
    rollout = Rollout(
        group_ids=torch.tensor([0, 1]),
        old_logprobs=torch.zeros(2, 8),
        mask=mask,
        scores=torch.tensor([1.0, 0.0]),
        turn_ends=turn_ends,
        values=torch.where(mask, torch.tensor([[0.2], [0.1]]), 0.0),
    )
    rollout.data["process_rewards"] = [[4 / 6, 3 / 5], [1 / 4]]
    return rollout


def spec_p6() -> Rollout:
    pairs = np.full((1, G, G), np.nan)
    for (i, j), v in P1_PAIRS.items():
        pairs[0, i, j] = v
    rollout = one_group([0.0] * 4)
    rollout.rewards = {"clip": torch.tensor(CLIP_SCORES[:4])}
    rollout.data["pairwise"] = torch.tensor(pairs, dtype=torch.float32)
    return rollout


def two_groups(scores: list[float]) -> Rollout:
    rollout = one_group(scores)
    rollout.group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    return rollout


SPEC_ORACLES: list[tuple[str, Callable[[], Rollout], list[float]]] = [
    ("bnpo", lambda: make_rollout(R_E1), [0.680175, -0.226725, -0.226725, -0.226725, 0.392699, 0.392699,
                                           -0.392699, -0.392699, 0.226725, 0.226725, 0.226725, -0.680175]),
    ("didi", lambda: make_rollout(R_DIDI), [0.115385, -0.961538, 1.346154, -0.5, 1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]),
    ("dler", lambda: two_groups([1, 0, 0, 0, 1, 1, 1, 0]), [1.620185] + [-0.540062] * 3 + [0.540062] * 3 + [-1.620185]),
    ("grpo", lambda: two_groups([1, 0, 0, 0, 1, 1, 1, 0]), [1.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, -1.5]),
    ("flow_grpo", lambda: one_group([0.5, -0.2, 1.3, 0.1]), [0.133211, -1.110092, 1.554128, -0.577248]),
    ("pref_grpo", spec_p6, [0.490951, -1.186412, 2.701629, -2.006168]),
    ("ppr", spec_p3, [1.251887] * 3 + [0.682847] * 3 + [0.170712] * 2 + [-1.237661] * 4 + [-0.597492] * 2),
]  # fmt: skip


@pytest.mark.parametrize(("name", "make", "expected"), SPEC_ORACLES, ids=[s[0] for s in SPEC_ORACLES])
def test_preset_matches_spec_worked_example(name: str, make: Callable[[], Rollout], expected: list[float]) -> None:
    """docs/methods/bnpo.md E1, docs/methods/didi_instruct.md E5, docs/methods/dler.md D2 (sequence, unbiased) and its
    GRPO line, docs/methods/pref_grpo.md P6
    (v1 weights; the tracker line for Flow-GRPO), docs/methods/ppr.md P3 (whitened, over the valid tokens)."""
    rollout = make()
    if name == "flow_grpo":
        rollout.prompt_keys = ["p"] * len(rollout)
    _, adv = advantages_of(name, rollout)
    values = adv[rollout.mask] if adv.dim() == 2 else adv
    np.testing.assert_allclose(values.double().numpy(), expected, atol=1e-5)


def test_medgrpo_logistic_norm_matches_spec_m7(tmp_path: Path) -> None:
    rollout = one_group([0.5, 0.6, 0.3, 0.5])
    rollout.dataset_ids, rollout.task_ids = ["cholec80"] * 4, ["tal"] * 4
    rollout, _ = advantages_of("medgrpo", rollout, (f"transforms.0.table={write_med_table(tmp_path)}",))
    assert rollout.scores is not None
    np.testing.assert_allclose(rollout.scores.numpy(), [0.5, 0.817574, 0.047426, 0.5], atol=1e-5)
    assert rollout.rewards["raw_metric"].tolist() == pytest.approx([0.5, 0.6, 0.3, 0.5])


def test_medgrpo_table_is_a_required_override() -> None:
    cfg = load_config(ALGORITHMS / "medgrpo.yaml")
    table = Path(cfg["transforms"][0]["table"])
    if table.exists():  # someone shipped a table at the placeholder path: it must load then
        instantiate(cfg["transforms"][0])
        return
    with pytest.raises(FileNotFoundError, match="fit_percentile_table"):
        instantiate(cfg["transforms"][0])


def _load(name: str) -> dict[str, Any]:
    return load_config(ALGORITHMS / f"{name}.yaml")


def test_presets_differ_where_the_papers_do() -> None:
    cfg = {name: _load(name) for name in PRESETS}
    obj = {name: c["objective"] for name, c in cfg.items()}
    term = {name: o["term"] for name, o in obj.items()}
    for name in ("dapo", "dler", "bnpo", "medgrpo", "gspo"):
        assert term[name]["clip_high"] > term[name]["clip_low"], name  # clip-higher
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp", "ppr", "didi"):
        assert term[name]["clip_high"] == term[name]["clip_low"], name
    assert cfg["dr_grpo"]["normalizer"]["scale_by_std"] is False
    assert cfg["grpo"]["normalizer"]["scale_by_std"] is True
    assert {n for n in PRESETS if obj[n]["ratio_level"] == "sequence"} == {"gspo"}
    assert {n for n in PRESETS if term[n]["_component_"] == "toolkit.objective.CISPOTerm"} == {"cispo"}
    assert {term[n]["_component_"] for n in PRESETS} == {"toolkit.objective.ClipTerm", "toolkit.objective.CISPOTerm"}
    assert {n for n in PRESETS if obj[n]["kl_coef"] > 0} == {"grpo", "dler", "flow_grpo", "didi"}
    assert obj["dler"]["kl_estimator"] == "k2" and obj["grpo"]["kl_estimator"] == "k3"
    assert {n for n in PRESETS if term[n].get("dual_clip") is not None} == {"bnpo", "dler"}
    dynamic = {n for n in PRESETS if cfg[n].get("trainer", {}).get("drop_zero_variance_groups")}
    assert dynamic == {"dapo", "dler"}
    assert cfg["dler"]["trainer"]["dynamic_sampling_on"] == "raw_score"
    aggregation = {n: obj[n]["aggregation"] for n in PRESETS}
    assert aggregation["grpo"] == "seq_mean_token_mean" and aggregation["dapo"] == "token_mean"
    assert aggregation["dr_grpo"] == "seq_mean_token_sum_norm" and aggregation["bnpo"] == "seq_mean_token_sum"
    eps = {n: cfg[n]["normalizer"].get("eps") for n in PRESETS}
    assert (eps["grpo"], eps["didi"], eps["pref_grpo"], eps["flow_grpo"], eps["dler"]) == (1e-6, 1e-8, 1e-8, 1e-4, 1e-8)
    assert cfg["dr_grpo"]["objective"]["norm_length"] == 3000  # recipes override with their max response length
    assert cfg["dler"]["transforms"][0]["max_length"] == 4000  # recipes override with their L


def test_grpo_and_dr_grpo_advantages_differ_by_the_group_std() -> None:
    _, grpo = advantages_of("grpo", make_rollout(R_CONT))
    _, dr = advantages_of("dr_grpo", make_rollout(R_CONT))
    r = _f32(R_CONT)
    for g in range(B):
        x, rows = r[np.equal(GROUPS, g)], torch.tensor(np.equal(GROUPS, g))
        np.testing.assert_allclose(dr[rows].numpy(), x - x.mean(), atol=1e-6)
        if x.max() > x.min():
            np.testing.assert_allclose((grpo[rows] * (x.std(ddof=1) + 1e-6)).numpy(), x - x.mean(), atol=1e-5)
            assert not torch.allclose(grpo[rows], dr[rows])


# Constructor arguments every preset must set explicitly (statistic conventions are never implicit).
OBJECTIVE_KEYS = {"term", "ratio_level", "aggregation", "kl_estimator", "kl_coef", "entropy_coef", "log_ratio_clamp"}


def _init_keys(node: dict[str, Any]) -> set[str]:
    params = inspect.signature(import_object(node["_component_"])).parameters
    return {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_sets_every_convention_explicitly(name: str) -> None:
    cfg = _load(name)
    assert set(cfg) <= {"normalizer", "objective", "transforms", "trainer"}, "a preset holds no model or data"
    for node in [cfg["normalizer"], cfg["objective"]["term"], *cfg.get("transforms", [])]:
        missing = _init_keys(node) - set(node)
        assert not missing, f"{node['_component_']} leaves {sorted(missing)} implicit"
    objective = cfg["objective"]
    required = set(OBJECTIVE_KEYS)
    if objective["aggregation"] == "seq_mean_token_sum_norm":
        required.add("norm_length")
    assert not required - set(objective), f"objective leaves {sorted(required - set(objective))} implicit"
    first = (ALGORITHMS / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# ") and "arXiv:" in first, "first line: what it reproduces + the arXiv id"
