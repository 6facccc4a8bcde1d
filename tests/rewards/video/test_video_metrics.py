"""MedVidBench parsers, leaderboard metrics and RL rewards against spec docs/methods/medgrpo.md §10 oracles M2–M6."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.judges.client import FakeJudgeClient
from rewards.judges.medical import MedicalCaptionJudge
from rewards.video import metrics as M
from rewards.video import parsers as P
from rewards.video.rl import CaptionReward, LocalizationReward, MedVidReward, caption_reward
from rewards.video.similarity import HashingSimilarity, MiniLMSimilarity
from rewards.video.tasks import TASKS, normalize_task

TOL = 1e-5
SA_ANSWER = (
    "Respect for tissue: 2/5, Suture/needle handling: 1/5, Time and motion: 1/5, Flow of operation: 2/5, "
    "Overall performance: 1/5, Quality of final product: 3/5"
)
RUBRIC = "R2: 4\nR3: 3\nR8: 5\nR5: 4\nR4: 5"


def test_task_names() -> None:
    assert TASKS == ("tal", "stg", "dvc", "vs", "rc", "nap", "sa", "cvs")
    cases = {
        "tal": "tal",
        "TAG": "tal",
        "stg": "stg",
        "dense_captioning_gpt": "dvc",
        "video_summary_gemini": "vs",
        "Region Caption GPT": "rc",
        "next_action": "nap",
        "skill_assessment": "sa",
        "cvs_assessment": "cvs",
    }
    assert {q: normalize_task(q) for q in cases} == cases
    with pytest.raises(ValueError, match="allowed"):
        normalize_task("surgery_poem")


def test_m2_tal_greedy_matching() -> None:
    s = M.tal_scores([(12, 22), (50, 60)], [(10, 20), (30, 40)], thresholds=(0.3, 0.5, 0.7))
    assert s["recall@0.3"] == pytest.approx(0.5, abs=TOL) and s["miou@0.3"] == pytest.approx(0.666667, abs=TOL)
    assert s["recall@0.5"] == pytest.approx(0.5, abs=TOL) and s["miou@0.5"] == pytest.approx(0.666667, abs=TOL)
    assert s["recall@0.7"] == 0.0 and s["miou@0.7"] == 0.0
    s = M.tal_scores([(15, 25)], [(10, 20)], thresholds=(0.3, 0.5))
    assert s["recall@0.3"] == pytest.approx(1.0) and s["miou@0.3"] == pytest.approx(0.333333, abs=TOL)
    assert s["recall@0.5"] == 0.0 and s["miou@0.5"] == 0.0
    assert M.tal_scores(None, [(0, 1)], thresholds=(0.3,)) == {"miou@0.3": 0.0, "recall@0.3": 0.0}


def test_greedy_matching_uses_each_prediction_once() -> None:
    # Both GT spans prefer pred 0; the second GT must take pred 1.
    assert M.greedy_match([(0, 10), (9, 19)], [(0, 10), (1, 11)], 0.0) == pytest.approx([1.0, 2 / 18])


def test_m3_stg_box_iou_and_carry_forward() -> None:
    assert M.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(0.142857, abs=TOL)
    assert M.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    gt = {"1.0": [0, 0, 10, 10], "5.0": [5, 5, 15, 15]}
    pred = P.parse_stg("1.0 seconds: [0, 0, 10, 10]")
    # The 1.0 box is reused for 5.0: (1 + 25/175) / 2.
    assert M.stg_mean_iou(pred, gt) == pytest.approx((1 + 1 / 7) / 2, abs=TOL)
    # No box at the first timestamp: [0, 0, 0, 0] is invalid and dropped.
    assert M.stg_mean_iou({"5.0": [5, 5, 15, 15]}, gt) == pytest.approx(1.0)
    assert M.stg_mean_iou({}, gt) is None
    assert M.stg_mean_iou([[0, 0, 10, 10], [5, 5, 15, 15]], gt) == pytest.approx(1.0)


def test_stg_parser_repairs_brackets() -> None:
    text = "1.0 seconds: [1365, 55, 1630, 357) 5.0 seconds: 1376, 0, 1919, 305]"
    assert P.parse_stg(text) == {"1.0": [1365, 55, 1630, 357], "5.0": [1376, 0, 1919, 305]}


def test_m4_dvc_temporal_f1() -> None:
    pred, gt = [(0, 10), (10, 20), (40, 50)], [(0, 12), (30, 45)]
    assert M.dvc_iou(pred[0], gt[0]) == pytest.approx(0.833333, abs=TOL)
    assert M.dvc_iou(pred[1], gt[0]) == pytest.approx(0.1, abs=TOL)
    assert M.dvc_iou(pred[2], gt[1]) == pytest.approx(0.25, abs=TOL)
    out = M.dvc_f1(pred, gt, thresholds=(0.3, 0.5, 0.7))
    assert out["precision"] == pytest.approx(1 / 3, abs=TOL) and out["recall"] == pytest.approx(0.5, abs=TOL)
    assert out["f1"] == pytest.approx(0.4, abs=TOL)
    assert M.dvc_f1([], gt)["f1"] == 0.0 and M.dvc_f1(None, gt)["f1"] == 0.0


def test_dvc_parse_and_flatten() -> None:
    text = "0.0-10.0 seconds: Cut: short\n5.0-12.0 seconds: Cut: a longer caption\n20-30 seconds: Tie: knot\nnoise"
    events = P.parse_dvc(text)
    assert events is not None and len(events) == 3
    assert M.flatten_events(events) == [(0.0, 12.0, "Cut: a longer caption"), (20.0, 30.0, "Tie: knot")]
    assert M.dvc_caption_pairs([(0, 10, "a")], [(0, 12, "A"), (30, 40, "B")], 0.5) == [("a", "A")]


def test_m5_hybrid_caption_reward() -> None:
    assert caption_reward(0.82, 2.0, 0.5, 0.5) == pytest.approx(0.535, abs=TOL)
    assert caption_reward(1.3, 5.0, 0.5, 0.5) == pytest.approx(1.0, abs=TOL)  # similarity clipped to [0, 1]


def test_m6_cvs_and_sa() -> None:
    parts = P.parse_cvs("Two structures: 2, Cystic plate: 1, Hepatocystic triangle: 0")
    assert parts == (2, 1, 0) and P.cvs_bucket(sum(parts)) == "fair"
    assert [P.cvs_bucket(t) for t in range(7)] == ["poor", "poor", "fair", "fair", "good", "good", "excellent"]
    scores = P.parse_skill_scores(SA_ANSWER)
    assert scores == [2, 1, 1, 2, 1, 3] and sum(scores) / 6 == pytest.approx(1.6667, abs=1e-4)
    assert P.parse_skill_level(SA_ANSWER) == "novice"
    levels = [P.skill_level_from_average(a) for a in (2.0, 2.01, 3.5, 3.6)]
    assert levels == ["novice", "intermediate", "intermediate", "expert"]
    assert M.sa_correct(SA_ANSWER, "whatever", gt_level="N") is True
    assert M.sa_correct("Respect for tissue: 5/5", None, gt_level="N") is False
    assert M.sa_correct("garbage", "no level here") is None
    assert M.cvs_correct("Two structures: 1, Cystic plate: 1, Hepatocystic triangle: 1", "2, 1, 0") is True
    assert M.cvs_correct("garbage", "2, 1, 0") is False


@pytest.mark.parametrize("text", ["", "   ", "banana", "I cannot tell.", "[1, 2]", "R2: 4", "///", "1-"])
def test_parsers_return_none_on_garbage(text: str) -> None:
    assert P.parse_segments(text) is None
    assert P.parse_stg(text) is None
    assert P.parse_dvc(text) is None
    assert P.parse_skill_scores(text) is None
    assert P.parse_cvs(text) is None
    assert P.parse_skill_level(text) is None


def test_segment_parser_fallbacks() -> None:
    assert P.parse_segments("1.1-3.0 seconds, 5.0 - 7.5 seconds.") == [(1.1, 3.0), (5.0, 7.5)]
    assert P.parse_segments("The action happens from 3 to 5 seconds") == [(3.0, 5.0)]
    assert P.parse_segments("00:01:02 to 00:01:10") == [(62.0, 70.0)]
    assert P.parse_segments("8.0-2.0 seconds") is None  # end < start dropped


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_parsers_never_raise(text: str) -> None:
    for parse in (P.parse_segments, P.parse_stg, P.parse_dvc, P.parse_cvs, P.parse_skill_level):
        parse(text)


spans = st.tuples(st.floats(0, 100), st.floats(0, 50)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=80, deadline=None)
@given(spans, spans)
def test_iou_properties(a: tuple[float, float], b: tuple[float, float]) -> None:
    iou = M.temporal_iou(a, b)
    assert 0.0 <= iou <= 1.0 + 1e-12 and iou == pytest.approx(M.temporal_iou(b, a))
    # union = min(hull, sum) equals the standard union for spans, so the two IoUs agree.
    assert M.dvc_iou(a, b) == pytest.approx(iou, abs=1e-9)


def test_macro_average_over_dataset_fps_buckets() -> None:
    rows = [("A", 0.5, 1.0), ("A", 0.5, 0.0), ("A", 1.0, 1.0), ("B", 0.5, 0.0), ("B", 0.5, math.nan)]
    macro, buckets = M.macro_average(rows)
    assert buckets == {"A@0.5": 0.5, "A@1": 1.0, "B@0.5": 0.0}
    assert macro == pytest.approx(0.5)  # unweighted over buckets, not the 0.5 sample mean by accident:
    assert M.macro_average([("A", 1, 1.0), ("A", 1, 1.0), ("A", 1, 1.0), ("B", 1, 0.0)])[0] == pytest.approx(0.5)
    assert math.isnan(M.macro_average([])[0])


def test_nearest_class() -> None:
    sim = HashingSimilarity()
    classes = ["Clip the cystic duct", "Cut the cystic artery", "Retract the gallbladder"]
    assert M.nearest_class("clip the cystic duct.", classes, sim.matrix) == "Clip the cystic duct"
    assert M.nearest_class("the gallbladder is retracted", classes, sim.matrix) == "Retract the gallbladder"
    assert M.nearest_class("", classes, sim.matrix) is None


def test_localization_reward_is_format_times_iou() -> None:
    reward = LocalizationReward(emit_components=True)
    out = reward(
        ["q"] * 4,
        ["12-22 seconds, 50-60 seconds.", "no idea", "1.0 seconds: [5, 5, 15, 15]", "anything"],
        task=["tal", "tal", "stg", "vs"],
        answer=["10-20 seconds, 30-40 seconds.", "10-20 seconds.", "1.0 seconds: [0, 0, 10, 10]", "x"],
    )
    expected = [(8 / 12 + 0.0) / 2, 0.0, 1 / 7, math.nan]
    assert torch.allclose(out.scores, torch.tensor(expected), atol=TOL, equal_nan=True)
    assert out.components["format"].tolist()[:3] == [1.0, 0.0, 1.0]


def test_medvid_reward_dispatch_and_metrics() -> None:
    judge = MedicalCaptionJudge(FakeJudgeClient(lambda m: RUBRIC), backoff_s=0.0)
    reward = MedVidReward(similarity="hashing", judge=judge, emit_components=True)
    out = reward(
        ["q"] * 5,
        ["the grasper dissects", "2, 1, 0", SA_ANSWER, "Clip the duct", "junk"],
        task=["video_summary_gpt", "cvs_assessment", "skill_assessment", "next_action", "poem"],
        answer=[
            "the grasper dissects",
            "Two structures: 2, Cystic plate: 0, Hepatocystic triangle: 0",
            "",
            "clip the duct",
            "y",
        ],
        struc_info=[None, None, [{"skill_level": "N"}], None, None],
        dataset=["Cholec", "CVS", "JIGSAWS", "Cholec", "X"],
    )
    assert torch.allclose(
        out.scores, torch.tensor([0.5 + 0.5 * 3.2 / 4, 1.0, 1.0, 1.0, math.nan]), atol=TOL, equal_nan=True
    )
    assert out.components["judge"][0] == pytest.approx(4.2)
    assert out.metrics["not_applicable"] == 1.0 and out.metrics["Cholec:vs/raw"] == pytest.approx(0.9, abs=TOL)
    assert "judge/failure_rate" in out.metrics
    plain = MedVidReward(similarity="hashing")(["q"], ["a"], task=["nap"], answer=["a"])
    assert plain.components == {} and plain.scores.tolist() == [1.0]  # one score: safe for the reward-stage sum


def test_caption_reward_judge_failure_policies() -> None:
    prompts, answers = ["p1", "p1", "p2"], ["the tool cuts", "the tool cuts", "x y"]
    samples = ["the tool cuts", "the tool", "x y"]

    def run(policy: str) -> list[float]:
        client = FakeJudgeClient(lambda m: RUBRIC if "PREDICTION:\nthe tool cuts" in m[1]["content"] else None)
        reward = CaptionReward(similarity="hashing", judge=MedicalCaptionJudge(client, backoff_s=0.0, max_attempts=2),
                               judge_failure=policy)  # type: ignore[arg-type]  # fmt: skip
        return reward(prompts, samples, task=["vs"] * 3, answer=answers).scores.tolist()

    excluded = run("exclude")
    assert excluded[0] == pytest.approx(0.9, abs=TOL) and math.isnan(excluded[1]) and math.isnan(excluded[2])
    grouped = run("group_mean")  # row 1 shares row 0's prompt and answer; row 2's group has no judged row
    assert grouped[1] == pytest.approx(grouped[0]) and math.isnan(grouped[2])
    sim_only = run("similarity_only")
    assert sim_only[2] == pytest.approx(1.0, abs=TOL)
    with pytest.raises(ValueError, match="judge_failure"):
        CaptionReward(judge_failure="mean")  # type: ignore[arg-type]


def test_hashing_similarity_bounds() -> None:
    sim = HashingSimilarity(dim=64)
    same, empty = sim.pairwise(["a b c", ""], ["c b a", "a"])
    assert same == pytest.approx(1.0, abs=TOL) and empty == 0.0
    assert 0.0 <= sim.pairwise(["clip the duct"], ["clip the artery"])[0] < 1.0


@pytest.mark.slow
def test_minilm_loads_offline_from_the_package() -> None:
    sim = MiniLMSimilarity()
    same, different = sim.pairwise(
        ["The grasper dissects the cystic duct"] * 2, ["The grasper dissects the cystic duct", "a red car"]
    )
    assert same == pytest.approx(1.0, abs=1e-4) and different < 0.5
