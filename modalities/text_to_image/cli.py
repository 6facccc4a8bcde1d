"""`renorm unigenbench CONFIG --csv FILE --out DIR`: run UniGenBench on a config's text-to-image policy.

Registered through the `renorm.commands` entry-point group; `toolkit.cli` calls `register(subparsers)`.
The judge is an OpenAI-compatible endpoint given by --judge-url/--judge-model, else the config's
`eval.evaluator.judge` node.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `unigenbench` subcommand to the `renorm` parser."""
    text = "Generate k images per UniGenBench prompt with a config's policy, judge each testpoint 0/1, report."
    p = subparsers.add_parser("unigenbench", help=text, description=text)
    p.set_defaults(func=cmd_unigenbench)
    p.add_argument("config", help="run config (policy and sampler sections are used)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--csv", required=True, help="UniGenBench prompt CSV (index, prompt_<lang>, sub_dims_<lang>)")
    p.add_argument("--out", required=True, help="results folder (resumes: prompts in results.jsonl are skipped)")
    p.add_argument("--checkpoint", help="checkpoint dir to load (default: the config's base weights)")
    p.add_argument("--language", default="en", help="column suffix of the CSV (en, zh)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt (benchmark protocol: 4)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per generation batch")
    p.add_argument("--max-prompts", type=int, help="only the first N prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-url", help="OpenAI-compatible judge endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", help="served judge model name (with --judge-url)")
    p.add_argument("--judge-api-key-env", help="environment variable holding the judge's API key")
    p.add_argument(
        "--parsing",
        choices=["official", "lenient"],
        default="official",
        help="how judge replies are read: as the released UniGenBench script (official) or ours (lenient)",
    )
    p.add_argument(
        "--max-retries-invalid",
        type=int,
        help="re-asks of a reply that is not accepted (default: 10 official, as the released script; 2 lenient)",
    )


def build_judge_client(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """The judge client: from --judge-url/--judge-model, else from `eval.evaluator.judge` in the config."""
    from rewards.judges.client import OpenAIChatClient
    from toolkit.config import instantiate, validate

    if args.judge_url:
        if not args.judge_model:
            raise ValueError("--judge-url needs --judge-model")
        return OpenAIChatClient(args.judge_url, args.judge_model, api_key_env=args.judge_api_key_env, max_tokens=4096)
    node = ((config.get("eval") or {}).get("evaluator") or {}).get("judge")
    if node is None:
        raise ValueError("no judge: pass --judge-url and --judge-model, or set eval.evaluator.judge in the config")
    validate(node, where="eval.evaluator.judge")
    return instantiate(node, where="eval.evaluator.judge")


def build_policy_and_sampler(config: dict[str, Any], checkpoint: str | None) -> tuple[Any, Any]:
    """Policy and sampler of the config, with the checkpoint's weights loaded when given."""
    from toolkit.config import instantiate, validate
    from toolkit.io.resume import load_policy_weights

    for name in ("policy", "sampler"):
        validate(config.get(name), where=name)
    policy = instantiate(config["policy"], where="policy")
    sampler = instantiate(config["sampler"], where="sampler")
    if checkpoint is not None:
        load_policy_weights(policy.module, checkpoint)
    return policy, sampler


def cmd_unigenbench(args: argparse.Namespace) -> int:
    """Load the config, build policy, sampler and judge, run the benchmark, print the table."""
    from modalities.text_to_image.unigenbench import load_unigenbench_csv, policy_generate, run_unigenbench
    from rewards.judges.unigenbench import TestpointJudge
    from toolkit.config import load_config

    config = load_config(args.config, args.overrides)
    prompts = load_unigenbench_csv(args.csv, args.language)[: args.max_prompts]
    client = build_judge_client(args, config)
    judge = TestpointJudge(client, max_retries_invalid=args.max_retries_invalid, parsing=args.parsing)
    policy, sampler = build_policy_and_sampler(config, args.checkpoint)
    report = run_unigenbench(
        prompts, policy_generate(policy, sampler), judge, args.out, args.num_images, args.batch_size, args.seed
    )
    print(report.table())
    return 0
