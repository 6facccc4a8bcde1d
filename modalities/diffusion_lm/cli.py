"""`renorm dlm ...`: masked diffusion LM commands (train-teacher, sample).

Registered through the `renorm.commands` entry-point group; `toolkit.cli` calls `register(subparsers)`.
Each subcommand has its own `_add_<name>(sub)` so other commands can be added next to them.
"""

from __future__ import annotations

import argparse
import difflib
import math
from pathlib import Path
from typing import Any

from toolkit.config.types import read_text_file

DEFAULT_TEACHER_CONFIG = Path(__file__).parent / "data" / "teacher_tiny.yaml"
_TEACHER_DEFAULTS: dict[str, Any] = {
    "preset": "tiny",
    "hidden_size": None,
    "num_blocks": None,
    "num_heads": None,
    "cond_dim": None,
    "dropout": 0.0,
    "corpus": None,
    "seq_len": 32,
    "stride": None,
    "num_steps": 600,
    "lr": 1e-3,
    "batch_size": 32,
    "warmup_steps": 50,
    "lr_schedule": "constant",
    "min_lr_ratio": 0.1,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "save_every": 0,
    "seed": 0,
    "device": "cpu",
    "mixed_precision": "no",
    "time_conditioning": False,
    "resume": "auto",
}


def register(subparsers: Any) -> None:
    """Add the `dlm` command and its subcommands to the `renorm` parser."""
    text = "Masked diffusion LMs: train a teacher, sample, and print the NFE table (teacher vs DiDi student)."
    parser = subparsers.add_parser("dlm", help=text, description=text)
    sub = parser.add_subparsers(dest="dlm_command", required=True)
    _add_train_teacher(sub)
    _add_sample(sub)
    from modalities.diffusion_lm.nfe_table import add_nfe_table_parser

    add_nfe_table_parser(sub)  # DiDi-Instruct evaluation (nfe_table.py)


def _add_train_teacher(sub: Any) -> None:
    p = sub.add_parser(
        "train-teacher",
        help="Train a DiT masked-diffusion teacher with the MDLM NELBO on a text corpus (resumable).",
        description="Train a DiT teacher with the MDLM NELBO. Settings come from CONFIG (flat YAML whose keys are "
        f"these flags; default {DEFAULT_TEACHER_CONFIG.name}) and are overridden by flags.",
    )
    p.set_defaults(func=cmd_train_teacher)
    p.add_argument("run_dir", help="checkpoints, metrics.jsonl and summary.json go here")
    p.add_argument("--config", default=str(DEFAULT_TEACHER_CONFIG), help="flat YAML of flag values")
    p.add_argument("--preset", choices=["tiny", "small", "medium", "large"], default=None, help="DiT size preset")
    for name in ("hidden_size", "num_blocks", "num_heads", "cond_dim", "seq_len", "stride", "num_steps"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None)
    for name in ("batch_size", "warmup_steps", "save_every", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None)
    p.add_argument("--lr-schedule", dest="lr_schedule", choices=["constant", "linear", "cosine"], default=None)
    for name in ("lr", "min_lr_ratio", "dropout", "weight_decay", "grad_clip"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=None)
    p.add_argument("--corpus", default=None, help="text file, one document per line (default: the shipped corpus)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    p.add_argument("--mixed-precision", dest="mixed_precision", choices=["no", "bf16"], default=None)
    p.add_argument("--time-conditioning", dest="time_conditioning", action="store_true", default=None)
    p.add_argument("--resume", default=None, help="auto (default), never, or a checkpoint path")
    p.add_argument(
        "--overwrite", action="store_true", help="with --resume never on a run dir holding a run: move it aside first"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _add_sample(sub: Any) -> None:
    from modalities.diffusion_lm.sampling import TIME_GRIDS

    p = sub.add_parser("sample", help="Sample text from a teacher trained with train-teacher or an exported student.")
    p.set_defaults(func=cmd_sample)
    p.add_argument(
        "teacher",
        help="train-teacher run directory or checkpoint directory, or a `renorm export` folder (DiDi student)",
    )
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--length", type=int, default=None, help="default: the teacher's max_length")
    p.add_argument("--num-steps", type=int, default=64)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--time-grid", default="uniform", choices=TIME_GRIDS, help="sampling time grid (spec: uniform)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax(log x_θ / T) (spec: 1)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--corpus",
        default=None,
        help="corpus whose vocabulary the teacher was trained with (default: an exported folder's tokenizer, else "
        "the shipped corpus)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--output", default=None, help='write {"text", "input_ids"} JSONL here (atomically) instead of printing'
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def resolve_teacher_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < CONFIG file < command-line flags; unknown config keys fail with the closest valid name."""
    import yaml

    settings = dict(_TEACHER_DEFAULTS)
    if args.config:
        loaded = yaml.safe_load(read_text_file(args.config)) or {}
        for key, value in loaded.items():
            if key not in settings:
                hint = difflib.get_close_matches(key, list(settings), n=1)
                raise ValueError(
                    f"{args.config}: unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                )
            settings[key] = value
    for key in settings:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return settings


def cmd_train_teacher(args: argparse.Namespace) -> int:
    """Build the DiT teacher and the corpus dataset, train with the NELBO, report held-out NELBO before/after."""
    import torch

    from modalities.diffusion_lm.dit import DiT, DiTConfig
    from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM
    from modalities.diffusion_lm.teacher import evaluate_nelbo, train_teacher
    from modalities.diffusion_lm.text_data import TokenDataset, build_text_tokenizer
    from toolkit.io.resume import resolve_resume

    s = resolve_teacher_settings(args)
    tokenizer = build_text_tokenizer(s["corpus"])
    sizes = {k: s[k] for k in ("hidden_size", "num_blocks", "num_heads", "cond_dim") if s[k] is not None}
    config = DiTConfig.preset(
        s["preset"], vocab_size=len(tokenizer), max_length=s["seq_len"], dropout=s["dropout"], **sizes
    )
    torch.manual_seed(s["seed"])
    model = MaskedDiffusionLM(
        DiT(config), time_conditioning=s["time_conditioning"], mixed_precision=s["mixed_precision"]
    ).to(s["device"])
    data_args = {"path": s["corpus"], "tokenizer": tokenizer, "seq_len": s["seq_len"], "seed": s["seed"]}
    train = TokenDataset(stride=s["stride"], split="train", **data_args)
    valid = TokenDataset(split="valid", shuffle=False, **data_args)
    fresh = resolve_resume(s["resume"], args.run_dir) is None
    before = evaluate_nelbo(model, valid.chunks) if fresh else math.nan
    result = train_teacher(
        model,
        train,
        s["num_steps"],
        lr=s["lr"],
        batch_size=s["batch_size"],
        run_dir=args.run_dir,
        warmup_steps=s["warmup_steps"],
        lr_schedule=s["lr_schedule"],
        min_lr_ratio=s["min_lr_ratio"],
        weight_decay=s["weight_decay"],
        grad_clip=s["grad_clip"],
        seed=s["seed"],
        save_every=s["save_every"],
        resume=s["resume"],
        progress=args.progress,
        overwrite=args.overwrite,
    )
    after = evaluate_nelbo(model, valid.chunks)
    print(
        f"step {result.step}: held-out NELBO {before:.3f} -> {after:.3f} nats/token "
        f"(PPL bound {math.exp(before):.1f} -> {math.exp(after):.2f}; nan = resumed run); "
        f"checkpoint {result.checkpoint}"
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample from a trained teacher or an exported student; print the decoded texts or write them as JSONL."""
    import json
    import os

    from modalities.diffusion_lm.checkpoint_io import check_tokenizer_fits, load_dlm, load_dlm_tokenizer
    from modalities.diffusion_lm.masked_diffusion import sample_in_batches
    from modalities.diffusion_lm.text_data import build_text_tokenizer

    saved = load_dlm_tokenizer(args.teacher) if args.corpus is None else None
    tokenizer = saved if saved is not None else build_text_tokenizer(args.corpus)
    model = load_dlm(args.teacher, device=args.device)
    check_tokenizer_fits(tokenizer, model.vocab_size)
    length = args.length or getattr(getattr(model.backbone, "config", None), "max_length", 32)
    ids = sample_in_batches(
        model,
        args.num_samples,
        length,
        args.num_steps,
        args.batch_size,
        args.seed,
        progress=args.progress and args.output is not None,
        block_size=args.block_size,
        time_grid=args.time_grid,
        temperature=args.temperature,
    ).tolist()
    texts = [str(tokenizer.decode(row)) for row in ids]
    if args.output is None:
        print("\n".join(texts))
        return 0
    output = Path(args.output)
    temp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    temp.write_text("".join(json.dumps({"text": t, "input_ids": r}) + "\n" for t, r in zip(texts, ids, strict=True)))
    os.replace(temp, output)
    print(f"wrote {len(texts)} samples to {output}")
    return 0
