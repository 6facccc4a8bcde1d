"""DiDi-Instruct in miniature: train a tiny masked-diffusion teacher on the shipped corpus, distil an 8-step
student through the generic Trainer, print the NFE table (gen-PPL under a tiny GPT-2 trained on the corpus).

    .venv/bin/python examples/diffusion_lm.py      # a few minutes on 2 CPU cores
"""

from __future__ import annotations

from pathlib import Path

import torch

from modalities.diffusion_lm.evaluation import CausalLMEvaluator, build_tiny_gpt2, train_tiny_causal_lm
from modalities.diffusion_lm.nfe_table import nfe_table, print_nfe_table
from modalities.diffusion_lm.teacher import load_teacher, train_teacher
from modalities.diffusion_lm.text_data import TokenDataset, build_text_tokenizer, collate_input_ids
from modalities.diffusion_lm.tiny import build_tiny_text_teacher
from toolkit.config import load_config
from toolkit.train.runner import build_trainer, fit

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "example_diffusion_lm"
LENGTH = 32


def main() -> None:
    torch.set_num_threads(1)
    # 1. Teacher: MDLM NELBO on the shipped corpus.
    teacher = build_tiny_text_teacher(seed=0, max_length=LENGTH)
    data = TokenDataset(seq_len=LENGTH, split="train")
    result = train_teacher(teacher, data, num_steps=200, lr=2e-3, batch_size=32, run_dir=RUN / "teacher")
    checkpoint = str(result.checkpoint or RUN / "teacher")  # None when a finished run was resumed
    # 2. DiDi-Instruct: the tiny recipe pointed at the trained teacher (student, teacher and discriminator trunk).
    overrides = [f"trainer.run_dir={RUN / 'distil'}", "trainer.num_steps=60", "policy.ema_decay=0.95"]
    for node in ("policy.student", "policy.teacher", "rewards.discriminator.discriminator.teacher"):
        overrides.append(f"{node}.checkpoint={checkpoint}")
    trainer = build_trainer(load_config(ROOT / "configs" / "diffusion_lm" / "tiny.yaml", overrides))
    fit(trainer)
    # 3. Evaluator: a tiny GPT-2 on the same corpus stands in for GPT-2-large.
    tokenizer = build_text_tokenizer()
    gpt2 = build_tiny_gpt2(len(tokenizer), max_length=LENGTH)
    evaluator_data = TokenDataset(seq_len=LENGTH, split="train", seed=1)
    train_tiny_causal_lm(gpt2, (collate_input_ids(rows) for rows in evaluator_data.batches(32)), num_steps=200)
    evaluator = CausalLMEvaluator(gpt2, tokenizer, max_length=LENGTH)
    # 4. The NFE table: teacher at 8..64 steps against the student (EMA) at 8 and 16.
    models = {"teacher": load_teacher(checkpoint), "student": trainer.policy.ema_model()}  # type: ignore[attr-defined]
    steps = {"teacher": [8, 16, 32, 64], "student": [8, 16]}
    print_nfe_table(nfe_table(models, steps, evaluator, num_samples=64, length=LENGTH))
    sample = models["student"].sample(2, LENGTH, 8, torch.Generator().manual_seed(0))
    for text in tokenizer.batch_decode(sample.tolist()):
        print("student@8:", text)


if __name__ == "__main__":
    main()
