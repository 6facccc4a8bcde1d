"""Parity of `renorm medgrpo eval` (parsing/aggregation "official") with the MedVidBench leaderboard evaluator.

Official code read (not copied): the leaderboard Space UII-AI/MedVidBench-Leaderboard as copied in
github.com/ChaoSFu/MedVid_understanding @ 6a68818e69ef502a0c9d651449511c5801d1e500 (eval_tal.py identical at
a0915760e2c793c99f9c9910f57da66550ebda9d), `MedVidBench-Leaderboard/evaluation/eval_{tal,stg,dvc,cvs_assessment,
skill_assessment}.py`, `evaluate_all_pai.py` and `evaluate_predictions.py`, and `app.py`, which runs
`evaluate_predictions.py --grouping overall --skip-llm-judge` and reads CVS_acc = component_balanced_accuracy,
SA_acc = aspect_balanced_accuracy. The pooled CVS/SA accuracies beside the table follow UII-AI/MedGRPO-Code @ f098b64
`evaluation/evaluate_all_final.py`. Every expected value below is our own case, worked out by hand from that code.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from modalities.medical_video.evaluation import evaluate_predictions
from rewards.judges.client import FakeJudgeClient
from rewards.judges.medical import MedicalCaptionJudge
from rewards.video import leaderboard as L
from rewards.video import official as O
from rewards.video import parsers as P

B = [0, 0, 10, 10]
B2 = [5, 5, 15, 15]
SEVENTH = 25 / 175  # IoU of B and B2
SA_ANSWER = (
    "Respect for tissue: 2/5, Suture/needle handling: 1/5, Time and motion: 1/5, Flow of operation: 2/5, "
    "Overall performance: 1/5, Quality of final product: 3/5"
)
SA_SCORES = {"Respect for tissue": 2, "Suture/needle handling": 1, "Time and motion": 1, "Flow of operation": 2,
             "Overall performance": 1, "Quality of final product": 3}  # fmt: skip
CVS_GT = "Two structures: 2, Cystic plate: 1, Hepatocystic triangle: 0"
TS, CP, HT = "two_structures", "cystic_plate", "hepatocystic_triangle"

# --- TAL -----------------------------------------------------------------------------------------------------------

TAL_PARSE = [
    ("one_span", "1.1-3.0 seconds.", [(1.1, 3.0)]),
    ("two_spans", "1.0-3.0 seconds, 5.0-7.5 seconds.", [(1.0, 3.0), (5.0, 7.5)]),
    ("units_on_both_sides_rejected", "1.0s-3.0s", []),
    ("en_dash_rejected", "1.0 – 3.0 seconds", []),
    ("clock_with_dash_reads_minutes_digits", "0:01-0:03", [(1.0, 0.0)]),
    ("from_to", "from 12.1 to 17.0", [(12.1, 17.0)]),
    ("from_to_with_s", "from 113.2s to 163.4s", [(113.2, 163.4)]),
    ("from_to_with_seconds", "from 10.0 seconds to 15.0 seconds", [(10.0, 15.0)]),
    ("clock_to_adds_both_patterns", "00:00:05 to 00:00:08", [(5.0, 0.0), (5.0, 8.0)]),
    ("bare_to", "The action occurs 3 to 7 seconds in.", [(3.0, 7.0)]),
    ("nothing", "no action here", []),
    ("dash_not_rounded", "12.345-15.5", [(12.345, 15.5)]),
    ("to_rounded_to_2_decimals", "from 1.239 to 2.005", [(1.24, 2.0)]),
    ("spaced_dash", "5 - 10 seconds", [(5.0, 10.0)]),
    ("dash_wins_over_to", "1.5-2.5 seconds and from 4 to 6", [(1.5, 2.5)]),
    ("between_and_rejected", "Between 1.0 and 3.0 seconds", []),
    ("date_reads_as_span", "2023-10-05", [(2023.0, 10.0)]),
    ("chained_dashes", "1-2-3", [(1.0, 2.0)]),
    ("to_without_space", "10 to20", [(10.0, 20.0)]),
    ("to_case_insensitive", "FROM 1 TO 2", [(1.0, 2.0)]),
    ("sec_unit_rejected", "1.0 sec to 3.0 sec", []),
    ("none_input", None, []),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in TAL_PARSE], ids=[c[0] for c in TAL_PARSE])
def test_tal_parser(text: str | None, expected: list[tuple[float, float]]) -> None:
    assert O.parse_tal(text) == expected  # floats parsed from the same literals: exact


# (prediction, GT spans, fps) -> (miou@0.3, miou@0.5, recall@0.3, recall@0.5)
TAL_SCORE = [
    ("exact", "10-20", [(10, 20)], 1.0, (1, 1, 1, 1)),
    ("m2_two_gt", "12-22 seconds, 50-60", [(10, 20), (30, 40)], 1.0, (2 / 3, 2 / 3, 0.5, 0.5)),
    ("m2_third", "15-25", [(10, 20)], 1.0, (1 / 3, 0, 1, 0)),
    ("unparsable_scores_0", "nothing", [(10, 20)], 1.0, (0, 0, 0, 0)),
    ("units_rejected_scores_0", "1.0s-3.0s", [(1, 3)], 1.0, (0, 0, 0, 0)),
    ("clock_dash_reversed_scores_0", "0:01-0:03", [(1, 3)], 1.0, (0, 0, 0, 0)),
    ("two_equal_preds_two_gt", "0-10, 0-10", [(0, 10), (0, 10)], 1.0, (1, 1, 1, 1)),
    ("prediction_used_once", "0-10", [(0, 10), (0, 10)], 1.0, (1, 1, 0.5, 0.5)),
    ("no_gt_scores_0", "0-10", [], 1.0, (0, 0, 0, 0)),
    ("best_pred_per_gt", "0-10, 5-15", [(5, 15), (0, 10)], 1.0, (1, 1, 1, 1)),
    ("greedy_not_optimal", "0-10, 9-19", [(0, 10), (1, 11)], 1.0, (1, 1, 0.5, 0.5)),
    ("iou_exactly_half_matches", "0-10", [(0, 5)], 2.0, (0.5, 0.5, 1, 1)),
    ("iou_exactly_0.3_matches", "0-10", [(0, 3)], 1.0, (0.3, 0, 1, 0)),
    ("from_to", "from 0 to 10", [(0, 10)], 1.0, (1, 1, 1, 1)),
    ("clock_to", "00:00:00 to 00:00:10", [(0, 10)], 1.0, (1, 1, 1, 1)),
    ("en_dash_scores_0", "1.0 – 3.0 seconds", [(1, 3)], 1.0, (0, 0, 0, 0)),
    ("tie_first_pred", "0-10, 0-10", [(0, 10), (0, 4)], 1.0, (0.7, 1, 1, 0.5)),
    ("fps_half", "2-4", [(2, 4)], 0.5, (1, 1, 1, 1)),
]


@pytest.mark.parametrize(("text", "gt", "fps", "expected"), [c[1:] for c in TAL_SCORE], ids=[c[0] for c in TAL_SCORE])
def test_tal_sample_scores(text: str, gt: list[tuple[float, float]], fps: float, expected: tuple[float, ...]) -> None:
    s = O.tal_scores(O.parse_tal(text), gt, fps, (0.3, 0.5))
    assert (s["miou@0.3"], s["miou@0.5"], s["recall@0.3"], s["recall@0.5"]) == pytest.approx(expected)


def test_lenient_tal_parser_keeps_reading_what_the_leaderboard_rejects() -> None:
    assert P.parse_segments("1.0s-3.0s") == [(1.0, 3.0)] and P.parse_segments("1.0 – 3.0 seconds") == [(1.0, 3.0)]
    assert P.parse_segments("0:01-0:03") == [(1.0, 3.0)] and P.parse_segments("1.0 sec to 3.0 sec") == [(1.0, 3.0)]


# --- STG -----------------------------------------------------------------------------------------------------------

STG_PARSE = [
    ("two_entries", "1.0 seconds: [10, 20, 30, 40] 5.0 seconds: [1, 2, 3, 4]",
     {"1.0": [10, 20, 30, 40], "5.0": [1, 2, 3, 4]}),
    ("integer_time", "1 seconds: [1, 2, 3, 4]", {"1.0": [1, 2, 3, 4]}),
    ("time_key_is_str_float", "1.50 seconds: [1,2,3,4]", {"1.5": [1, 2, 3, 4]}),
    ("singular_second_rejected", "1.0 second: [1, 2, 3, 4]", []),
    ("s_unit_rejected", "1.0s: [1, 2, 3, 4]", []),
    ("no_space_rejected", "1.0seconds: [1,2,3,4]", []),
    ("capital_rejected", "1.0 Seconds: [1,2,3,4]", []),
    ("round_brackets_rejected", "1.0 seconds: (1, 2, 3, 4)", []),
    ("bad_first_box_dropped", "1.0 seconds: [1, 2, 3] 2.0 seconds: [5, 6, 7, 8]", {"2.0": [5, 6, 7, 8]}),
    ("bad_box_copies_last", "1.0 seconds: [1, 2, 3, 4] 2.0 seconds: [a, b, c, d]",
     {"1.0": [1, 2, 3, 4], "2.0": [1, 2, 3, 4]}),
    ("repeated_time_last_wins", "1.0 seconds: [1, 2, 3, 4] 1.0 seconds: [5, 6, 7, 8]", {"1.0": [5, 6, 7, 8]}),
    ("double_bracket_after_time", "1.0 seconds: [[1, 2, 3, 4]]", {"1.0": [1, 2, 3, 4]}),
    ("double_bracket_list", "[[1, 2, 3, 4]] [[5, 6, 7, 8]]", [[1, 2, 3, 4], [5, 6, 7, 8]]),
    ("double_bracket_decimals_rejected", "[[1.5, 2, 3, 4]]", []),
    ("single_bracket_without_time_rejected", "[1, 2, 3, 4]", []),
    ("unclosed_bracket_rejected", "1.0 seconds: [1, 2, 3, 4", []),
    ("negative_coordinate", "1.0 seconds: [-5, 2, 30, 40]", {"1.0": [-5, 2, 30, 40]}),
    ("no_space_after_colon", "1.0 seconds:[1,2,3,4]", {"1.0": [1, 2, 3, 4]}),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in STG_PARSE], ids=[c[0] for c in STG_PARSE])
def test_stg_parser(text: str, expected: Any) -> None:
    assert O.parse_stg(text) == expected


# (prediction, GT {time: box}) -> sample mean IoU (None = skipped)
STG_SCORE = [
    ("exact", "1.0 seconds: [0, 0, 10, 10]", {"1.0": B}, 1.0),
    ("m3_partial", "1.0 seconds: [5, 5, 15, 15]", {"1.0": B}, SEVENTH),
    ("unparsable_scores_0", "I cannot see it", {"1.0": B}, 0.0),
    ("missing_first_time_scores_0", "5.0 seconds: [0, 0, 10, 10]", {"1.0": B, "5.0": B}, 0.5),
    ("carry_forward", "1.0 seconds: [0, 0, 10, 10]", {"1.0": B, "5.0": B}, 1.0),
    ("carry_forward_other_gt", "1.0 seconds: [0, 0, 10, 10]", {"1.0": B, "5.0": B2}, (1 + SEVENTH) / 2),
    ("x2_before_x1_scores_0", "1.0 seconds: [10, 0, 5, 10]", {"1.0": B}, 0.0),
    ("y2_before_y1_scores_0", "1.0 seconds: [0, 10, 10, 0]", {"1.0": B}, 0.0),
    ("zero_box_after_first_carries", "1.0 seconds: [0, 0, 10, 10] 2.0 seconds: [0, 0, 0, 0]", {"1.0": B, "2.0": B},
     1.0),
    ("zero_box_first_scores_0", "1.0 seconds: [0, 0, 0, 0]", {"1.0": B}, 0.0),
    ("integer_gt_key", "2.0 seconds: [0, 0, 10, 10]", {"2": B}, 1.0),
    ("two_decimal_time_misses_key", "2.25 seconds: [0, 0, 10, 10]", {"2.25": B}, 0.0),
    ("box_list_on_decimal_keys", "[[0, 0, 10, 10]] [[5, 5, 15, 15]]", {"1.0": B, "2.0": B2}, 1.0),
    ("box_list_on_integer_keys_misses", "[[0, 0, 10, 10]]", {"1": B}, 0.0),
    ("invalid_gt_box_dropped", "2.0 seconds: [0, 0, 10, 10]", {"1.0": [0, 0, 10], "2.0": B}, 1.0),
    ("no_valid_gt_box_skipped", "1.0 seconds: [0, 0, 10, 10]", {"1.0": "bad"}, None),
    ("empty_gt_skipped", "1.0 seconds: [0, 0, 10, 10]", {}, None),
    ("float_box", "1.0 seconds: [0.5, 0.5, 10.5, 10.5]", {"1.0": B}, 90.25 / 109.75),
    ("extra_pred_times_ignored", "1.0 seconds: [0, 0, 10, 10] 9.0 seconds: [5, 5, 15, 15]", {"1.0": B}, 1.0),
    ("repeated_time_last_wins", "1.0 seconds: [5, 5, 15, 15] 1.0 seconds: [0, 0, 10, 10]", {"1.0": B}, 1.0),
    ("bad_box_copies_last", "1.0 seconds: [0, 0, 10, 10] 2.0 seconds: [x, y, z, w]", {"1.0": B, "2.0": B2},
     (1 + SEVENTH) / 2),
    ("carry_forward_chain", "1.0 seconds: [0, 0, 10, 10]", {"1.0": B, "2.0": B, "3.0": B}, 1.0),
    ("carry_forward_middle", "1.0 seconds: [0, 0, 10, 10] 3.0 seconds: [5, 5, 15, 15]",
     {"1.0": B, "2.0": B2, "3.0": B2}, (2 + SEVENTH) / 3),
]  # fmt: skip


@pytest.mark.parametrize(("text", "gt", "expected"), [c[1:] for c in STG_SCORE], ids=[c[0] for c in STG_SCORE])
def test_stg_sample_iou(text: str, gt: dict[str, Any], expected: float | None) -> None:
    iou = O.stg_iou(O.parse_stg(text), gt)
    assert iou == (None if expected is None else pytest.approx(expected))


def test_lenient_stg_skips_what_the_leaderboard_scores_zero() -> None:
    assert lenient_stg_iou("I cannot see it", {"1.0": B}) is None
    assert lenient_stg_iou("1.0 seconds: [10, 0, 5, 10]", {"1.0": B}) is None
    assert lenient_stg_iou("5.0 seconds: [0, 0, 10, 10]", {"1.0": B, "5.0": B}) == 1.0  # missing first time dropped


def lenient_stg_iou(text: str, gt: dict[str, Any]) -> float | None:
    from rewards.video import metrics as M

    parsed = P.parse_stg(text)
    return M.stg_mean_iou(parsed, gt) if parsed is not None else None


# --- DVC -----------------------------------------------------------------------------------------------------------

DVC_PARSE = [
    ("two_lines", "0-10 seconds: a\n10-20 seconds: b", [(0, 10, "a"), (10, 20, "b")]),
    ("label_and_caption", "36.0-49.0 seconds: Dissection: the grasper retracts",
     [(36, 49, "Dissection: the grasper retracts")]),
    ("duplicate_span_first_kept", "0-10 seconds: a\n0-10 seconds: b", [(0, 10, "a")]),
    ("caption_runs_to_next_event", "0-10 seconds: a\ncontinued\n10-20 seconds: b",
     [(0, 10, "a continued"), (10, 20, "b")]),
    ("spaced_dash_with_colon_rejected", "0 - 10 seconds: a", []),
    ("spaced_dash_fallback", "0 - 10 seconds - a", [(0, 10, "a")]),
    ("en_dash_fallback", "0 – 10 seconds - cut tissue.", [(0, 10, "cut tissue")]),
    ("sec_unit_rejected", "0-10 sec: a", []),
    ("no_space_after_colon_rejected", "0-10 seconds:a", []),
    ("bullet_first_line", "- 0-10 seconds: a", [(0, 10, "a")]),
    ("bullets_swallow_next_event", "- 0-10 seconds: a\n- 10-20 seconds: b", [(0, 10, "a - 10-20 seconds: b")]),
    ("bold_fallback", "**Start Time:** 0 - 10 seconds **Description:** a", [(0, 10, "a")]),
    ("nothing", "no events", []),
    ("reversed_kept", "10-5 seconds: backwards", [(10, 5, "backwards")]),
    ("empty_caption_takes_next_line", "0-10 seconds: \n10-20 seconds: b", [(0, 10, "10-20 seconds: b")]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in DVC_PARSE], ids=[c[0] for c in DVC_PARSE])
def test_dvc_parser(text: str, expected: list[tuple[float, float, str]]) -> None:
    assert O.parse_dvc(text) == expected


DVC_SPLIT = [
    ("no_overlap", [(0, 10, "a"), (10, 20, "b")], [(0, 10, "a"), (10, 20, "b")]),
    ("overlap_split_longest_first", [(0, 10, "a"), (5, 15, "bb")], [(0, 5, "a"), (5, 10, "a"), (10, 15, "bb")]),
    ("nested", [(0, 20, "long"), (5, 10, "short")], [(0, 5, "long"), (5, 10, "long"), (10, 20, "long")]),
    ("unsorted_without_overlap_unchanged", [(10, 20, "b"), (0, 10, "a")], [(10, 20, "b"), (0, 10, "a")]),
    ("gap_dropped", [(0, 10, "a"), (5, 8, "b"), (20, 30, "c")],
     [(0, 5, "a"), (5, 8, "a"), (8, 10, "a"), (20, 30, "c")]),
    ("zero_length_vanishes", [(0, 10, "a"), (5, 5, "z"), (8, 12, "b")],
     [(0, 5, "a"), (5, 8, "a"), (8, 10, "a"), (10, 12, "b")]),
    ("zero_length_alone_kept", [(5, 5, "z")], [(5, 5, "z")]),
]  # fmt: skip


@pytest.mark.parametrize(("events", "expected"), [c[1:] for c in DVC_SPLIT], ids=[c[0] for c in DVC_SPLIT])
def test_dvc_overlap_split(events: list[O.Event], expected: list[O.Event]) -> None:
    assert O.split_overlaps(events) == expected


# (prediction, GT spans, fps) -> temporal F1 (None = sample skipped)
DVC_F1 = [
    ("m4", "0-10 seconds: a\n10-20 seconds: b\n40-50 seconds: c", [(0, 12), (30, 45)], 1.0, 0.4),
    ("overlap_split_not_merged", "0-10 seconds: a\n5-15 seconds: b", [(0, 15)], 1.0, 1 / 3),
    ("empty_prediction_skipped", "no events", [(0, 10)], 1.0, None),
    ("frame_truncation", "0.5-1.5 seconds: a", [(0, 1)], 1.0, 1.0),
    ("frame_truncation_half_fps", "1-3 seconds: a", [(0, 3)], 0.5, 1.0),
    ("zero_length_frames", "0.2-0.8 seconds: a", [(0, 10)], 1.0, 0.0),
    ("reversed_span_reordered", "10-0 seconds: a", [(0, 10)], 1.0, 1.0),
    ("no_gt_skipped", "0-10 seconds: a", [], 1.0, None),
    ("duplicate_removed", "0-10 seconds: a\n0-10 seconds: b", [(0, 10)], 1.0, 1.0),
    ("recall_two_thirds", "0-10 seconds: a\n20-30 seconds: b", [(0, 10), (20, 30), (40, 50)], 1.0, 0.8),
    ("iou_half_not_above_half", "0-10 seconds: a", [(0, 5)], 1.0, 1 / 3),
    ("fps_two", "0-10 seconds: a", [(0, 10)], 2.0, 1.0),
    ("fallback_parse", "0 - 10 seconds - a", [(0, 10)], 1.0, 1.0),
    ("en_dash_with_colon_skipped", "0–10 seconds: a", [(0, 10)], 1.0, None),
]


@pytest.mark.parametrize(("text", "gt", "fps", "expected"), [c[1:] for c in DVC_F1], ids=[c[0] for c in DVC_F1])
def test_dvc_sample_f1(text: str, gt: list[tuple[float, float]], fps: float, expected: float | None) -> None:
    f1 = O.dvc_f1(O.parse_dvc(text), gt, fps, (0.3, 0.5, 0.7))
    assert f1 == (None if expected is None else pytest.approx(expected, abs=1e-6))


DVC_PAIRS = [
    ("exact", [(0, 10, "a")], [(0, 10, "x")], 0.7, [("a", "x")]),
    ("best_gt", [(0, 10, "a")], [(0, 4, "x"), (0, 10, "y")], 0.3, [("a", "y")]),
    ("third_iou_at_half", [(0, 10, "a")], [(5, 15, "x")], 0.5, []),
    ("third_iou_at_0.3", [(0, 10, "a")], [(5, 15, "x")], 0.3, [("a", "x")]),
    ("tie_first_gt", [(0, 10, "a")], [(0, 10, "x"), (0, 10, "y")], 0.5, [("a", "x")]),
    ("iou_half_at_half", [(0, 10, "a")], [(0, 5, "x")], 0.5, [("a", "x")]),
]


@pytest.mark.parametrize(("pred", "gt", "theta", "expected"), [c[1:] for c in DVC_PAIRS], ids=[c[0] for c in DVC_PAIRS])
def test_dvc_caption_pairs(pred: list[O.Event], gt: list[O.Event], theta: float, expected: list[Any]) -> None:
    assert O.caption_pairs(pred, gt, theta) == expected


# --- CVS -----------------------------------------------------------------------------------------------------------

CVS_PARSE = [
    ("canonical", CVS_GT, {TS: 2, CP: 1, HT: 0}),
    ("lower_case", "two structures: 1, cystic plate: 1, hepatocystic triangle: 1", {TS: 1, CP: 1, HT: 1}),
    ("semicolons_one_part", "Two structures: 2; Cystic plate: 1; Hepatocystic triangle: 0", {TS: 2}),
    ("bare_digits", "2, 1, 0", {}),
    ("dash_instead_of_colon", "Two structures - 2, Cystic plate: 1, Hepatocystic triangle: 0", {CP: 1, HT: 0}),
    ("out_of_range_kept", "Two structures: 5, Cystic plate: 1, Hepatocystic triangle: 0", {TS: 5, CP: 1, HT: 0}),
    ("repeat_last_wins", "Two structures: 2, Two structures: 0", {TS: 0}),
    ("singular_structure", "Two structure: 2, Cystic plate: 1", {CP: 1}),
    ("no_space", "Two structures:2, Cystic plate:1, Hepatocystic triangle:1", {TS: 2, CP: 1, HT: 1}),
    ("word_value", "Two structures: two, Cystic plate: 1", {CP: 1}),
    ("any_order", "Cystic plate: 1, Two structures: 2", {CP: 1, TS: 2}),
    ("empty", "", {}),
    ("two_names_in_one_part", "Two structures: 2 and cystic plate: 1, Hepatocystic triangle: 0", {TS: 2, HT: 0}),
    ("sentence", "The two structures: 1", {TS: 1}),
    ("upper_case", "TWO STRUCTURES: 2", {TS: 2}),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CVS_PARSE], ids=[c[0] for c in CVS_PARSE])
def test_cvs_parser(text: str, expected: dict[str, int]) -> None:
    assert O.parse_cvs(text) == expected


# (prediction text, GT components) -> (component pairs, bucket correct)
CVS_SCORE = [
    ("exact", CVS_GT, {TS: 2, CP: 1, HT: 0}, [(TS, True), (CP, True), (HT, True)], True),
    ("bare_digits_poor_vs_fair", "2, 1, 0", {TS: 2, CP: 1, HT: 0}, [], False),
    ("unparsable_is_poor", "I am not sure", {TS: 0, CP: 1, HT: 0}, [], True),
    ("partial_prediction", "Two structures: 2", {TS: 2, CP: 1, HT: 0}, [(TS, True)], True),
    ("same_bucket_wrong_parts", "Two structures: 1, Cystic plate: 1, Hepatocystic triangle: 1",
     {TS: 2, CP: 1, HT: 0}, [(TS, False), (CP, True), (HT, False)], True),
    ("out_of_range_total", "Two structures: 5, Cystic plate: 0, Hepatocystic triangle: 0",
     {TS: 2, CP: 2, HT: 1}, [(TS, False), (CP, False), (HT, False)], True),
    ("gt_with_two_parts", "Two structures: 2, Cystic plate: 2, Hepatocystic triangle: 2", {TS: 2, CP: 2},
     [(TS, True), (CP, True)], False),
    ("excellent", "Two structures: 2, Cystic plate: 2, Hepatocystic triangle: 2", {TS: 2, CP: 2, HT: 2},
     [(TS, True), (CP, True), (HT, True)], True),
    ("good_vs_fair", "Two structures: 2, Cystic plate: 2, Hepatocystic triangle: 0", {TS: 2, CP: 1, HT: 0},
     [(TS, True), (CP, False), (HT, True)], False),
    ("poor_boundary", "Two structures: 1", {TS: 0, CP: 0, HT: 0}, [(TS, False)], True),
    ("no_gt_components_is_poor", CVS_GT, {}, [], False),
    ("both_unparsable", "?", {}, [], True),
    ("semicolons_first_component_only", "Two structures: 2; Cystic plate: 1; Hepatocystic triangle: 0",
     {TS: 2, CP: 1, HT: 0}, [(TS, True)], True),
]  # fmt: skip


@pytest.mark.parametrize(("text", "gt", "pairs", "bucket"), [c[1:] for c in CVS_SCORE], ids=[c[0] for c in CVS_SCORE])
def test_cvs_sample_scores(text: str, gt: dict[str, int], pairs: list[Any], bucket: bool) -> None:
    pred = O.parse_cvs(text)
    assert O.cvs_items(pred, gt) == pairs and O.cvs_bucket_correct(pred, gt) is bucket


CVS_TRUTH = [
    ("struc_scores_filtered", [{"cvs_scores": {TS: 1, CP: 1, HT: 1, "total": 3}}], CVS_GT, {TS: 1, CP: 1, HT: 1}),
    ("empty_struc_reads_answer", [{"cvs_scores": {}}], CVS_GT, {TS: 2, CP: 1, HT: 0}),
    ("no_struc_reads_answer", None, CVS_GT, {TS: 2, CP: 1, HT: 0}),
    ("no_truth", [], "unknown", {}),
]


@pytest.mark.parametrize(("struc", "answer", "expected"), [c[1:] for c in CVS_TRUTH], ids=[c[0] for c in CVS_TRUTH])
def test_cvs_ground_truth(struc: Any, answer: str, expected: dict[str, int]) -> None:
    assert L.official_truth("cvs", answer, struc) == expected


def test_cvs_lenient_reads_bare_digits_and_calls_garbage_wrong() -> None:
    assert P.parse_cvs("2, 1, 0") == (2, 1, 0) and P.parse_cvs("I am not sure") is None


# --- SA ------------------------------------------------------------------------------------------------------------

SA_LEVEL = [
    ("m6_novice", SA_ANSWER, "novice"),
    ("boundary_2_novice", "2/5, 2/5", "novice"),
    ("intermediate", "3/5, 3/5", "intermediate"),
    ("boundary_3.5_intermediate", "3/5 4/5", "intermediate"),
    ("expert", "4/5 4/5 3/5", "expert"),
    ("level_word_rejected", "expert", None),
    ("level_word_capital_rejected", "Novice", None),
    ("any_integer", "10/5", "expert"),
    ("prefix_of_fifty", "3/50", "intermediate"),
    ("spaced_slash_rejected", "2 / 5", None),
    ("empty", "", None),
    ("five", "5/5", "expert"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in SA_LEVEL], ids=[c[0] for c in SA_LEVEL])
def test_sa_level(text: str, expected: str | None) -> None:
    assert O.skill_level(text) == expected


SA_ASPECTS = [
    ("six_aspects", SA_ANSWER, SA_SCORES),
    ("semicolons_first_only", "Respect for tissue: 2/5; Time and motion: 3/5", {"Respect for tissue": 2}),
    ("case_kept", "respect for tissue: 2/5", {"respect for tissue": 2}),
    ("colon_required", "Respect for tissue 2/5", {}),
    ("repeat_last_wins", "Respect for tissue: 2/5, Respect for tissue: 4/5", {"Respect for tissue": 4}),
    ("slash_in_name", "Suture/needle handling: 1/5", {"Suture/needle handling": 1}),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in SA_ASPECTS], ids=[c[0] for c in SA_ASPECTS])
def test_sa_aspects(text: str, expected: dict[str, int]) -> None:
    assert O.skill_aspects(text) == expected


SA_CODES = [("E", "expert"), ("N", "novice"), ("i", "intermediate"), ("Intermediate", "intermediate"),
            ("expert surgeon", "expert"), ("2", "intermediate"), ("unknown", "novice"), ("xyz", "xyz")]  # fmt: skip


@pytest.mark.parametrize(("code", "expected"), SA_CODES, ids=[c for c, _ in SA_CODES])
def test_sa_ground_truth_codes(code: str, expected: str) -> None:
    assert O.skill_code_level(code) == expected


ALL_TRUE = [(name, True) for name in SA_SCORES]
SA_RECORD = [
    ("match", SA_ANSWER, "", [{"skill_level": "N", "skill_scores": SA_SCORES}], (True, ALL_TRUE)),
    ("level_word_skipped", "expert", "", [{"skill_level": "E", "skill_scores": SA_SCORES}], (None, None)),
    ("wrong_level_right_aspects", SA_ANSWER, "", [{"skill_level": "E", "skill_scores": SA_SCORES}],
     (False, ALL_TRUE)),
    ("truth_from_answer", SA_ANSWER, SA_ANSWER, None, (True, ALL_TRUE)),
    ("no_truth_skipped", SA_ANSWER, "", None, (None, None)),
    ("other_case_no_pairs", SA_ANSWER.lower(), SA_ANSWER, None, (True, [])),
    ("one_aspect_wrong", SA_ANSWER.replace("Time and motion: 1/5", "Time and motion: 2/5"), "",
     [{"skill_level": "N", "skill_scores": SA_SCORES}],
     (True, [(n, n != "Time and motion") for n in SA_SCORES])),
    ("empty_scores_read_answer", "Respect for tissue: 2/5", SA_ANSWER, [{"skill_level": "N", "skill_scores": {}}],
     (True, [("Respect for tissue", True)])),
]  # fmt: skip


@pytest.mark.parametrize(
    ("pred", "answer", "struc", "expected"), [c[1:] for c in SA_RECORD], ids=[c[0] for c in SA_RECORD]
)
def test_sa_record(pred: str, answer: str, struc: Any, expected: tuple[Any, Any]) -> None:
    assert L.official_skill(pred, answer, struc) == expected


# --- aggregation ---------------------------------------------------------------------------------------------------

T, F = True, False
# (column, rows (dataset, fps, item), official value, bucket value); NaN = no value
POOL = [
    ("tal_pooled_not_bucketed", "TAG mIoU@0.3", [("A", 0.5, 1.0), ("A", 0.5, 1.0), ("B", 1, 0.0)], 2 / 3, 0.5),
    ("tal_two_fps_one_dataset", "TAG mIoU@0.5", [("A", 0.5, 1.0), ("A", 1, 0.0), ("A", 1, 0.0)], 1 / 3, 0.5),
    ("tal_single_bucket", "TAG mIoU@0.3", [("A", 1, 0.2), ("A", 1, 0.4)], 0.3, 0.3),
    ("stg_skipped_sample", "STG mIoU", [("A", 1, 1.0), ("A", 1, None), ("B", 1, 0.0), ("B", 1, 0.0)], 1 / 3, 0.5),
    ("stg_nothing_scored", "STG mIoU", [("A", 1, None)], math.nan, math.nan),
    ("dvc_weighted_by_all_records", "DVC F1", [("A", 1, 1.0), ("A", 1, None), ("A", 1, None), ("B", 1, 0.0)],
     0.75, 0.5),
    ("dvc_dataset_without_f1_is_zero", "DVC F1", [("A", 1, 1.0), ("B", 1, None), ("B", 1, None)], 1 / 3, 1.0),
    ("dvc_fps_merged_per_dataset", "DVC F1", [("A", 0.5, 1.0), ("A", 1, 0.0), ("A", 1, 0.0)], 1 / 3, 0.5),
    ("cvs_balanced", "CVS acc", [("C", 1, [(TS, T), (CP, T), (HT, F)]), ("C", 1, [(TS, T)])], 2 / 3, 2 / 3),
    ("cvs_macro_over_datasets", "CVS acc",
     [("A", 1, [(TS, T)]), ("B", 1, [(TS, F)]), ("B", 1, [(TS, F)]), ("B", 1, [(TS, F)])], 0.5, 0.5),
    ("cvs_dataset_without_pairs_is_zero", "CVS acc", [("A", 1, [(TS, T)]), ("B", 1, [])], 0.5, 1.0),
    ("cvs_class_balance", "CVS acc", [("C", 1, [(TS, T), (CP, F)])] * 3 + [("C", 1, [(TS, T)])], 0.5, 0.5),
    ("sa_balanced", "SA acc", [("J", 1, [("a", T), ("b", F)]), ("J", 1, None)], 0.5, 0.5),
    ("sa_all_skipped_is_zero", "SA acc", [("J", 1, None), ("J", 1, None)], 0.0, math.nan),
    ("nap_pooled", "NAP acc", [("N", 1, 1.0), ("N", 1, 0.0), ("M", 1, 1.0)], 2 / 3, 0.75),
    ("cvs_bucket_acc_pooled", "CVS bucket acc", [("A", 1, 1.0), ("A", 1, 1.0), ("B", 1, 0.0)], 2 / 3, 0.5),
    ("vs_pooled_failures_excluded", "VS llm", [("A", 1, 4.0), ("A", 1, 4.0), ("A", 1, math.nan), ("B", 1, 1.0)],
     3.0, 2.5),
]  # fmt: skip


@pytest.mark.parametrize(("column", "rows", "official", "bucket"), [c[1:] for c in POOL], ids=[c[0] for c in POOL])
def test_pooling(column: str, rows: list[L.Row], official: float, bucket: float) -> None:
    reduce = L.balanced_accuracy if column in ("CVS acc", "SA acc") else L.mean_item
    for rule, expected in ((L.OFFICIAL_POOLING[column], official), (L.BUCKET_POOLING, bucket)):
        value, _ = L.pool(rows, reduce, rule)
        assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected)


def rec(task: str, prediction: str, answer: Any = "", dataset: str = "A", fps: float = 1.0, **extra: Any) -> dict:
    return {"dataset": dataset, "task": task, "prediction": prediction, "answer": answer, "fps": fps, **extra}


TAL_GT = "10.0-20.0 seconds."
STG_GT = "1.0 seconds: [0, 0, 10, 10]"
DVC_GT = "0-10 seconds: a: cut\n20-30 seconds: b: clip"
SA_STRUC = [{"skill_level": "N", "skill_scores": SA_SCORES}]
CVS_POOR = "Two structures: 0, Cystic plate: 1, Hepatocystic triangle: 0"
# (records, column, official value (parsing and aggregation official), lenient+bucket value)
RECORDS = [
    ("stg_unparsable_counts_zero", [rec("stg", STG_GT, STG_GT), rec("stg", "no box", STG_GT)], "STG mIoU", 0.5, 1.0),
    ("stg_missing_first_time", [rec("stg", "5.0 seconds: [0, 0, 10, 10]", STG_GT + " 5.0 seconds: [0, 0, 10, 10]")],
     "STG mIoU", 0.5, 1.0),
    ("dvc_empty_prediction_skipped", [rec("dvc", DVC_GT, DVC_GT), rec("dvc", "nothing", DVC_GT)], "DVC F1", 1.0, 0.5),
    ("dvc_overlaps_split", [rec("dvc", "0-10 seconds: a\n5-15 seconds: b", "0-15 seconds: x")], "DVC F1", 1 / 3, 1.0),
    ("dvc_frames_truncated", [rec("dvc", "0.5-1.5 seconds: a", "0-1 seconds: x")], "DVC F1", 1.0, 1 / 3),
    ("dvc_struc_info_truth", [rec("dvc", "0-10 seconds: a", "nothing", struc_info=[{"start": 0, "end": 10,
                                                                                     "caption": "x"}])],
     "DVC F1", 1.0, math.nan),
    ("cvs_component_balanced", [rec("cvs", CVS_GT, CVS_GT), rec("cvs", "no idea", CVS_GT)], "CVS acc", 1.0, 0.5),
    ("cvs_bucket_poor_fallback", [rec("cvs", "no idea", CVS_POOR)], "CVS bucket acc", 1.0, math.nan),
    ("cvs_struc_scores_preferred", [rec("cvs", CVS_GT, "Two structures: 0",
                                        struc_info=[{"cvs_scores": {TS: 2, CP: 1, HT: 0}}])], "CVS acc", 1.0, math.nan),
    ("sa_aspect_balanced",
     [rec("sa", SA_ANSWER, "", struc_info=SA_STRUC), rec("sa", "expert", "", struc_info=SA_STRUC)], "SA acc", 1.0, 0.5),
    ("sa_level_words_skipped", [rec("sa", "novice", "", struc_info=SA_STRUC)], "SA level acc", math.nan, math.nan),
    ("tal_en_dash", [rec("tal", "10.0 – 20.0 seconds", TAL_GT)], "TAG mIoU@0.3", 0.0, 1.0),
    ("tal_samples_pooled", [rec("tal", "10-20", TAL_GT, "A", 0.5), rec("tal", "10-20", TAL_GT, "A", 0.5),
                            rec("tal", "none", TAL_GT, "B", 1.0)], "TAG mIoU@0.3", 2 / 3, 0.5),
    ("tal_struc_spans_preferred", [rec("tal", "1-2", TAL_GT, struc_info=[{"spans": [{"start": 1, "end": 2}]}])],
     "TAG mIoU@0.5", 1.0, 1.0),
    ("tal_without_truth_counts_zero", [rec("tal", "1-2", "none"), rec("tal", "1-2", "1-2 seconds")],
     "TAG mIoU@0.3", 0.5, 1.0),
    ("stg_without_valid_truth_skipped", [rec("stg", STG_GT, "none"), rec("stg", STG_GT, STG_GT)], "STG mIoU", 1.0, 1.0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("records", "column", "official", "lenient"), [c[1:] for c in RECORDS], ids=[c[0] for c in RECORDS]
)
def test_results_table_modes(records: list[dict], column: str, official: float, lenient: float) -> None:
    strict = evaluate_predictions(records, similarity="hashing")
    loose = evaluate_predictions(records, similarity="hashing", parsing="lenient", aggregation="bucket")
    got = {**strict.columns, **strict.extras}[column], loose.columns.get(column, math.nan)
    for value, expected in zip(got, (official, lenient), strict=True):
        assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected)


def test_dvc_caption_score_is_weighted_by_dataset_records() -> None:
    judge = MedicalCaptionJudge(FakeJudgeClient(lambda m: "R2: 4\nR3: 3\nR8: 5\nR5: 4\nR4: 5"), backoff_s=0.0)
    records = [rec("dvc", DVC_GT, DVC_GT), rec("dvc", DVC_GT, DVC_GT), rec("dvc", "nothing", DVC_GT, dataset="B")]
    official = evaluate_predictions(records, judge=judge)
    assert official.columns["DVC llm"] == pytest.approx(4.2 * 2 / 3) and official.buckets["DVC llm"]["B"] == 0.0
    bucket = evaluate_predictions(records, judge=judge, parsing="lenient", aggregation="bucket")
    assert bucket.columns["DVC llm"] == pytest.approx(4.2)


def test_case_counts() -> None:
    families = {
        "TAL": len(TAL_PARSE) + len(TAL_SCORE),
        "STG": len(STG_PARSE) + len(STG_SCORE),
        "DVC": len(DVC_PARSE) + len(DVC_SPLIT) + len(DVC_F1) + len(DVC_PAIRS),
        "CVS": len(CVS_PARSE) + len(CVS_SCORE) + len(CVS_TRUTH),
        "SA": len(SA_LEVEL) + len(SA_ASPECTS) + len(SA_CODES) + len(SA_RECORD),
        "aggregation": len(POOL) + len(RECORDS),
    }
    assert min(families.values()) >= 30, families
