"""UniGenBench: CSV parsing, the testpoint judge, P7 scoring, the generation/judging loop, resume, CLI, eval hook."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from modalities.text_to_image.cli import register
from modalities.text_to_image.unigenbench import (
    UniGenBenchEvaluator,
    aggregate_scores,
    load_unigenbench_csv,
    policy_generate,
    primary_dimension,
    run_unigenbench,
)
from rewards.judges.client import FakeJudgeClient
from rewards.judges.unigenbench import TestpointItem, TestpointJudge, build_testpoint_messages, parse_testpoint_scores
from tests.rewards.judges.test_judge_client import FakeServer, chat_reply, server  # noqa: F401

CSV = Path(__file__).resolve().parents[2] / "data" / "unigenbench_tiny.csv"


def test_csv_layout_is_parsed() -> None:
    prompts = load_unigenbench_csv(CSV)
    assert [p.index for p in prompts] == [0, 1, 2]
    assert prompts[0].testpoints == ["Style", "Attribute - Color", "Action - Hand (Character/Anthropomorphic)"]
    assert prompts[0].descriptions[2] == "holding a lantern in its paw"
    assert prompts[1].categories["Primary Categories"] == "Design" and "Testpoints" not in prompts[1].categories
    assert '"QUIET"' in prompts[2].prompt


def test_bad_csv_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        'index,prompt_en,sub_dims_en\n0,"a cat","{""Testpoints"": [""Style""], ""Testpoint Description"": []}"\n'
    )
    with pytest.raises(ValueError, match="equal length"):
        load_unigenbench_csv(path)
    with pytest.raises(ValueError, match="prompt_zh"):
        load_unigenbench_csv(CSV, language="zh")


def test_p7_scoring_by_primary_and_sub_dimension() -> None:
    records = [
        {
            "testpoints": ["Style", "Attribute - Color", "Action - Hand (Character/Anthropomorphic)"],
            "scores": [1, 0, 1],
        },
        {"testpoints": ["Style", "Attribute - Quantity"], "scores": [1, 1]},
        {"testpoints": ["Style"], "scores": None},  # invalid judge reply: left out, counted
    ]
    scores = aggregate_scores(records)
    assert scores.rates("primary") == {"Action": 1.0, "Attribute": 0.5, "Style": 1.0}
    assert scores.sub["Attribute - Color"] == (0, 1) and scores.sub["Attribute - Quantity"] == (1, 1)
    assert scores.primary["Style"] == (2, 2) and scores.invalid_images == 1
    assert scores.overall == pytest.approx(2.5 / 3)
    assert (
        primary_dimension("Attribute - Color") == "Attribute"
        and primary_dimension("World Knowledge") == "World Knowledge"
    )


@pytest.mark.parametrize(
    ("text", "count", "expected"),
    [
        ("<analysis>['a', 'b']</analysis><score>[1, 0]</score>", 2, [1, 0]),
        ("<score>[1, 0]</score> then <score>[0, 0, 1]</score>", 3, [0, 0, 1]),
        ("<score>[1, 0]</score>", 3, None),
        ("<score>[1, 2]</score>", 2, None),
        ("<score>[True, False]</score>", 2, None),
        ("<score>not a list</score>", 1, None),
        ("no tag [1]", 1, None),
        (None, 1, None),
    ],
)
def test_parse_testpoint_scores(text: str | None, count: int, expected: list[int] | None) -> None:
    assert parse_testpoint_scores(text, count) == expected


def scoring_judge(messages: list[dict[str, Any]]) -> str:
    """Fake VLM: 1 for every checkpoint whose image is bright, 0 otherwise (list length from the prompt)."""
    parts = messages[0]["content"]
    image, text = parts[0]["image"], parts[1]["text"]
    count = int(re.search(r"exactly (\d+) elements", text).group(1))  # type: ignore[union-attr]
    bright = image.getpixel((0, 0))[0] > 127
    return f"<analysis>{['seen'] * count}</analysis><score>{[int(bright)] * count}</score>"


def test_judge_reasks_invalid_replies_then_gives_up() -> None:
    replies = iter(["garbage", "<score>[1]</score>", "bad", "still bad"])
    judge = TestpointJudge(FakeJudgeClient(lambda m: next(replies)), max_retries_invalid=2, parsing="lenient")
    item = TestpointItem("p", ["Style"], ["oil"], Image.new("RGB", (4, 4)))
    scores, _ = judge.judge([item, item])
    assert scores == [None, [1]]  # the first reply stays invalid after two re-asks; the second parses at once
    assert judge.last_metrics["judge/invalid"] == 1.0 and judge.last_metrics["judge/reasks"] == 2.0
    messages = build_testpoint_messages("p", ["Style"], ["oil"], item.image)
    assert messages[0]["content"][0]["type"] == "image" and "Style: oil" in messages[0]["content"][1]["text"]


class FakeRollout:
    def __init__(self, completions: list[Image.Image]) -> None:
        self.completions = completions


class FakePolicy:
    """Stands in for FlowMatchingPolicy: the adapter only passes it to the sampler."""

    def __init__(self, brightness: int = 200) -> None:
        self.brightness = brightness


class FakeSampler:
    """Stands in for FlowSDESampler: k solid images per prompt, group-major, brightness from the policy."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def sample(
        self, policy: FakePolicy, prompts: list[dict[str, str]], group_size: int, generator: torch.Generator
    ) -> FakeRollout:
        self.calls.append([p["prompt"] for p in prompts])
        shade = int(torch.randint(0, 40, (1,), generator=generator))
        images = [
            Image.new("RGB", (16, 16), (policy.brightness, shade, j * 50)) for _ in prompts for j in range(group_size)
        ]
        return FakeRollout(images)


def test_run_writes_results_sheets_and_resumes(tmp_path: Path) -> None:
    prompts = load_unigenbench_csv(CSV)
    sampler = FakeSampler()
    generate = policy_generate(FakePolicy(), sampler)
    client = FakeJudgeClient(scoring_judge)
    report = run_unigenbench(
        prompts[:2], generate, TestpointJudge(client), tmp_path, num_images=3, batch_size=1, show_progress=False
    )
    assert report.num_prompts == 2 and len(client.conversations) == 6
    assert (tmp_path / "images" / "1_2.png").exists()
    sheet = Image.open(tmp_path / "sheets" / "0.png")
    assert sheet.size == (3 * 256, 256)
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["overall"] == 1.0 and saved["primary"]["Attribute"] == 1.0 and saved["num_prompts"] == 2
    # Resume: only prompt 2 is generated and judged; the scores cover all three.
    sampler.calls.clear()
    resumed = run_unigenbench(
        prompts, generate, TestpointJudge(client), tmp_path, num_images=3, batch_size=2, show_progress=False
    )
    assert sampler.calls == [[prompts[2].prompt]] and len(client.conversations) == 9
    assert resumed.num_prompts == 3 and resumed.scores.primary["Grammar"] == (3, 3)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    table = resumed.table()
    assert "overall" in table and "Attribute - Quantity" in table and "1.0000" in table


def test_same_seed_gives_same_images_after_resume(tmp_path: Path) -> None:
    prompts = load_unigenbench_csv(CSV)
    judge = TestpointJudge(FakeJudgeClient(scoring_judge))
    generate = policy_generate(FakePolicy(), FakeSampler())
    run_unigenbench(prompts, generate, judge, tmp_path / "full", num_images=1, batch_size=1, show_progress=False)
    run_unigenbench(prompts[:1], generate, judge, tmp_path / "part", num_images=1, batch_size=1, show_progress=False)
    run_unigenbench(prompts, generate, judge, tmp_path / "part", num_images=1, batch_size=1, show_progress=False)
    for k in range(3):
        a = Image.open(tmp_path / "full" / "images" / f"{k}_0.png").getpixel((0, 0))
        assert a == Image.open(tmp_path / "part" / "images" / f"{k}_0.png").getpixel((0, 0))


def test_dark_images_score_zero_and_generate_is_checked(tmp_path: Path) -> None:
    prompts = load_unigenbench_csv(CSV)[:1]
    judge = TestpointJudge(FakeJudgeClient(scoring_judge))
    report = run_unigenbench(
        prompts, policy_generate(FakePolicy(10), FakeSampler()), judge, tmp_path, 2, show_progress=False
    )
    assert report.scores.overall == 0.0 and report.scores.primary["Style"] == (0, 2)

    def short(captions: list[str], k: int, generator: torch.Generator) -> list[list[Image.Image]]:
        return [[Image.new("RGB", (4, 4))] for _ in captions]

    with pytest.raises(ValueError, match="generate returned"):
        run_unigenbench(load_unigenbench_csv(CSV)[1:2], short, judge, tmp_path, 2, show_progress=False)


def test_eval_hook(tmp_path: Path) -> None:
    evaluator = UniGenBenchEvaluator(str(CSV), FakeJudgeClient(scoring_judge), max_prompts=2, num_images=2)
    report = evaluator(
        policy=FakePolicy(),
        sampler=FakeSampler(),
        rewards={},
        data=None,
        checkpoint=None,
        output=str(tmp_path / "r.json"),
    )
    assert report.num_prompts == 2 and (tmp_path / "r" / "scores.json").exists()
    assert evaluator.judge.parsing == "official" and evaluator.judge.max_retries_invalid == 10


def test_cli_runs_against_a_loopback_judge(tmp_path: Path, server: FakeServer) -> None:  # noqa: F811
    def reply(index: int, body: dict[str, Any]) -> tuple[int, Any, float]:
        parts = body["messages"][0]["content"]
        assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
        count = int(re.search(r"exactly (\d+) elements", parts[1]["text"]).group(1))  # type: ignore[union-attr]
        return 200, chat_reply(f"<analysis>{['ok'] * count}</analysis><score>{[1] * count}</score>"), 0.0

    server.behaviour = reply
    config = tmp_path / "run.yaml"
    config.write_text(
        "policy:\n  _component_: tests.modalities.text_to_image.test_unigenbench.FakePolicy\n"
        "sampler:\n  _component_: tests.modalities.text_to_image.test_unigenbench.FakeSampler\n"
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "unigenbench",
            str(config),
            "policy.brightness=255",
            "--csv",
            str(CSV),
            "--out",
            str(out),
            "--num-images",
            "2",
            "--judge-url",
            server.url,
            "--judge-model",
            "evalmodel",
        ]
    )
    assert args.parsing == "official" and args.max_retries_invalid is None  # `renorm unigenbench` reads officially
    assert args.func(args) == 0
    assert json.loads((out / "scores.json").read_text())["overall"] == 1.0
    assert len(server.bodies) == 6 and server.bodies[0]["model"] == "evalmodel"
    args = parser.parse_args(["unigenbench", str(config), "--csv", str(CSV), "--out", str(out)])
    with pytest.raises(ValueError, match="no judge"):
        args.func(args)


def test_adapter_drives_the_real_tiny_sd3_policy_and_sampler(tmp_path: Path, server: FakeServer) -> None:  # noqa: F811
    """`renorm unigenbench configs/text_to_image/tiny.yaml`: tiny SD3 + VAE images, judged over loopback HTTP."""
    reply = "<analysis>['a', 'b']</analysis><score>[0, 1]</score>"
    server.behaviour = lambda i, body: (200, chat_reply(reply), 0.0)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    csv_path = tmp_path / "two.csv"
    csv_path.write_text("\n".join(CSV.read_text().splitlines()[:1] + CSV.read_text().splitlines()[2:3]) + "\n")
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[3]
    args = parser.parse_args(
        [
            "unigenbench",
            str(root / "configs" / "text_to_image" / "tiny.yaml"),
            "sampler.num_steps=3",
            *("--csv", str(csv_path), "--out", str(out), "--num-images", "2", "--batch-size", "1"),
            *("--judge-url", server.url, "--judge-model", "evalmodel"),
        ]
    )
    assert args.func(args) == 0
    image = Image.open(out / "images" / "1_1.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["sub"] == {"Style": 0.0, "Attribute - Quantity": 1.0} and scores["num_prompts"] == 1
