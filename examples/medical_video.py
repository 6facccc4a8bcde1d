"""MedGRPO in miniature on CPU: synthetic MedVidBench set → percentile table from the starting policy's answers →
a few GRPO steps with cross-dataset logistic normalization → the MedVidBench results table.

Run: `python examples/medical_video.py` (about a minute on 2 cores; no downloads). The tiny random Qwen2.5-VL does not
learn the tasks in a few steps: this shows the whole pipeline, video frames in and results table out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from modalities.medical_video.data import MedVidBenchDataset
from modalities.medical_video.evaluation import evaluate_predictions
from modalities.medical_video.percentiles import fit_from_predictions, normalize_record
from modalities.medical_video.policy import VideoVLMPolicy
from modalities.medical_video.sampler import VideoSampler
from modalities.medical_video.synthetic import make_synthetic_medvidbench
from rewards.video.rl import MedVidReward
from toolkit.config import load_config
from toolkit.train.runner import build_trainer, fit

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "medical_video_example"
RL_TASKS = ["tal", "stg", "rc", "vs"]
VIDEO = {"fps": 1.0, "min_pixels": 3136, "max_pixels": 3136}


def predictions(policy: VideoVLMPolicy, rows: list[dict[str, Any]], batch: int = 8) -> list[dict[str, Any]]:
    """Greedy answers of `policy` for `rows`, as normalized prediction records."""
    sampler = VideoSampler(video=VIDEO, max_new_tokens=32, do_sample=False, compute_old_logprobs=False)
    records = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        rollout = sampler.sample(policy, chunk, 1, torch.Generator().manual_seed(0))
        for row, answer in zip(rollout.prompts or [], rollout.completions or [], strict=True):
            record = {k: row[k] for k in ("dataset", "task", "answer", "struc_info", "fps", "id", "prompt")}
            records.append(normalize_record({**record, "prediction": answer}, str(row["id"])))
    return records


def main() -> None:
    torch.set_num_threads(1)
    records_file = make_synthetic_medvidbench(RUN / "data", seed=0)
    rows = MedVidBenchDataset(paths=str(records_file), shuffle=False).rows
    config = load_config(
        ROOT / "configs" / "medical_video" / "tiny.yaml",
        [f"trainer.run_dir={RUN / 'train'}", f"data.out_dir={RUN / 'data'}", "trainer.num_steps=4",
         "trainer.save_every=0", "trainer.resume=never"],
    )  # fmt: skip

    # 1. The (dataset, task) percentile table from the starting policy's answers (MedGRPO fits it on SFT outputs).
    start = build_trainer(config).policy
    assert isinstance(start, VideoVLMPolicy)
    rl_rows = [r for r in rows if r["task"] in RL_TASKS]
    table = fit_from_predictions(predictions(start, rl_rows), MedVidReward(tasks=RL_TASKS, similarity="hashing"))
    table_path = RUN / "percentile_table.json"
    table_path.write_text(json.dumps(table.to_dict(), indent=2))
    print(f"percentile table ({len(table.pairs)} pairs) -> {table_path}")

    # 2. A few MedGRPO steps with that table.
    config["transforms"][0]["table"] = str(table_path)
    trainer = build_trainer(config)
    fit(trainer)
    print(f"trained {trainer.global_step} steps -> {trainer.run_dir}")

    # 3. The results table (caption columns use the similarity fallback: no judge endpoint here).
    policy = trainer.policy
    assert isinstance(policy, VideoVLMPolicy)
    results = evaluate_predictions(predictions(policy, rows), similarity="hashing")
    (RUN / "results.json").write_text(json.dumps(results.to_json(), indent=2))
    print(results.table())


if __name__ == "__main__":
    main()
