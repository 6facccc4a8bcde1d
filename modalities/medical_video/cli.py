"""`renorm medgrpo fit-percentiles | eval`: MedGRPO percentile table and MedVidBench results table.

Registered through the `renorm.commands` entry-point group; `toolkit.cli` calls `register(subparsers)`.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `medgrpo` command (sub-commands fit-percentiles and eval) to the `renorm` parser."""
    p = subparsers.add_parser(
        "medgrpo",
        help="MedGRPO / MedVidBench tools: fit the percentile table, print the results table.",
        description="MedGRPO (arXiv:2512.06581) tools for medical video VLMs.",
    )
    sub = p.add_subparsers(dest="medgrpo_command", required=True, metavar="SUBCOMMAND")
    fit = sub.add_parser(
        "fit-percentiles",
        help="Percentile table (p25/p50/p75 per dataset and task) from SFT-model predictions, for LogisticDatasetNorm.",
        description="Score SFT-model predictions with the MedGRPO raw RL metric and save p25/p50/p75 per "
        "(dataset, task) plus task-level pooled entries as JSON (transforms.0.table of the medgrpo preset).",
    )
    fit.set_defaults(func=cmd_fit_percentiles)
    fit.add_argument("predictions", help="JSONL / JSON records with dataset, task, answer, prediction (+ struc_info)")
    fit.add_argument("--out", required=True, help="JSON file to write (atomically)")
    fit.add_argument("--interpolation", default="linear", choices=["linear", "lower", "higher", "midpoint", "nearest"])
    fit.add_argument("--min-count", type=int, default=1, help="pairs with fewer scored records use the task fallback")
    fit.add_argument("--batch-size", type=int, default=64)
    _scorer_arguments(fit)
    ev = sub.add_parser(
        "eval",
        help="MedVidBench results table (CVS, NAP, SA, STG, TAG, DVC, VS, RC) from predictions or a policy.",
        description="Results table in the MedGRPO project-page layout, scored and pooled as the MedVidBench "
        "leaderboard does (--parsing/--aggregation official, the default) or with our tolerant parsers and "
        "(dataset, fps) macro average (lenient/bucket), from a predictions file or by sampling the policy of a run "
        "config (--config).",
    )
    ev.set_defaults(func=cmd_eval)
    ev.add_argument("predictions", nargs="?", help="JSONL / JSON prediction records")
    ev.add_argument("--config", help="run config whose policy answers the eval data (instead of a predictions file)")
    ev.add_argument("--checkpoint", help="with --config: checkpoint dir to load")
    ev.add_argument("--num-prompts", type=int, help="with --config: rows to answer (default: all eval data)")
    ev.add_argument("--output", help="write the results (and predictions) as JSON here")
    ev.add_argument(
        "--parsing",
        default="official",
        choices=["official", "lenient"],
        help="official: the leaderboard evaluator's parsers and zero-scoring of failures; lenient: ours",
    )
    ev.add_argument(
        "--aggregation",
        default="official",
        choices=["official", "bucket"],
        help="official: each column pooled as the leaderboard does; bucket: mean over (dataset, fps)",
    )
    _scorer_arguments(ev)


def _scorer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--similarity", default="minilm", choices=["minilm", "hashing"], help="caption similarity scorer")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL of the medical judge (e.g. http://host:8000/v1)")
    p.add_argument("--judge-model", default="gpt-4.1", help="judge model name sent to the endpoint")
    p.add_argument("--judge-api-key-env", help="environment variable holding the judge API key")
    p.add_argument("--judge-attempts", type=int, default=5, help="asks per sample until the five ratings parse")


def build_judge_from_args(args: argparse.Namespace) -> Any:
    """A MedicalCaptionJudge over an OpenAIChatClient when --judge-url is given, else None."""
    if not args.judge_url:
        return None
    from rewards.judges.client import OpenAIChatClient
    from rewards.judges.medical import MedicalCaptionJudge

    client = OpenAIChatClient(args.judge_url, args.judge_model, api_key_env=args.judge_api_key_env)
    return MedicalCaptionJudge(client, max_attempts=args.judge_attempts)


def cmd_fit_percentiles(args: argparse.Namespace) -> int:
    """Load predictions, score the raw metric, fit and save the table; print a summary."""
    from modalities.medical_video.percentiles import fit_from_predictions, load_predictions, save_table
    from rewards.video.rl import MedVidReward

    records = load_predictions(args.predictions)
    reward = MedVidReward(similarity=args.similarity, judge=build_judge_from_args(args))
    table = fit_from_predictions(
        records, reward, interpolation=args.interpolation, min_count=args.min_count, batch_size=args.batch_size
    )
    save_table(table, args.out)
    print(f"wrote {args.out}: {len(table.pairs)} (dataset, task) pairs, {len(table.tasks)} tasks")
    for (dataset, task), stats in sorted(table.pairs.items()):
        print(f"  {dataset:>16} {task:>4}  p25={stats.p25:.4f} p50={stats.p50:.4f} p75={stats.p75:.4f} n={stats.count}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Results table from a predictions file, or from a config's policy through the eval.evaluator hook."""
    if (args.predictions is None) == (args.config is None):
        raise ValueError("give either a predictions file or --config, not both or neither")
    if args.predictions is not None:
        from modalities.medical_video.evaluation import evaluate_predictions
        from modalities.medical_video.percentiles import load_predictions
        from toolkit.io.atomic import write_json_atomic

        results = evaluate_predictions(
            load_predictions(args.predictions),
            args.similarity,
            build_judge_from_args(args),
            parsing=args.parsing,
            aggregation=args.aggregation,
        )
        if args.output:
            write_json_atomic(args.output, results.to_json())
    else:
        results = _eval_config(args)
    print(results.table())
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _eval_config(args: argparse.Namespace) -> Any:
    from toolkit.config import load_config
    from toolkit.evaluation import evaluate

    config = dict(load_config(args.config, []))
    eval_section = dict(config.get("eval") or {})
    if eval_section.get("evaluator") is None:
        node: dict[str, Any] = {
            "_component_": "modalities.medical_video.evaluation.MedVidEvaluator",
            "similarity": args.similarity,
            "num_prompts": args.num_prompts,
            "parsing": args.parsing,
            "aggregation": args.aggregation,
        }
        if args.judge_url:
            client = {"base_url": args.judge_url, "model": args.judge_model, "api_key_env": args.judge_api_key_env}
            node["judge"] = {"client": client, "max_attempts": args.judge_attempts}
        eval_section["evaluator"] = node
    config["eval"] = eval_section
    return evaluate(config, checkpoint=args.checkpoint, output=args.output)
