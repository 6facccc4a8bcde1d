"""`renorm serve-policy CONFIG [key=value ...]`: the config's policy served by `policy_server.PolicyServer` in a
process of its own (loopback by default), for training with `sampler.engine: server` or splitting generation from
training across processes or machines. Any config's token policy serves: a text policy, or a video one (the MedGRPO
configs' Qwen2.5-VL, whose processor and tokenizer come with the policy) taking the sampler's video inputs in
`renorm_multimodal`; string prompts are tokenized text-only. Registered through the `renorm.commands` entry points;
the server module (torch, transformers) is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `serve-policy` subcommand to the `renorm` parser."""
    p = subparsers.add_parser(
        "serve-policy",
        help="Serve the config's policy at an OpenAI-compatible /v1/completions with a weight-update channel.",
        description="Serve the config's policy (generating with HF generate) at POST /v1/completions (prompts as "
        "token ids, token ids and log-probs back), POST /v1/weights (the trainer's weights, versioned), "
        "GET /v1/models and GET /health, until interrupted. Train against it with sampler.engine=server.",
    )
    p.set_defaults(func=cmd_serve_policy)
    p.add_argument(
        "config", help="a training config (text or video): its `policy` section is served (seeded with trainer.seed)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8001, help="port to bind (0 = any free port; 8000 is serve-retriever's)")
    p.add_argument("--model-name", default="policy", help="the id /v1/models lists")
    p.add_argument("--device", default="cpu", help="where the policy runs (cpu, cuda, cuda:1, ...)")
    p.add_argument("--generation-batch-size", type=int, help="rows per generate call (default: all)")
    p.add_argument("--max-rows", type=int, default=1024, help="prompts x n per request (more: 413)")
    p.add_argument("--max-prompt-tokens", type=int, default=8192, help="tokens per prompt (more: 400)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="largest max_tokens a request may ask (more: 400)")
    p.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024, help="completions body (more: 413)")
    p.add_argument("--max-weights-bytes", type=int, default=16 * 1024**3, help="weights body (more: 413)")
    p.add_argument(
        "--max-multimodal-bytes",
        type=int,
        default=1024**3,
        help="video/image tensors of one completions body, decoded (more: 413; the client splits above its "
        "multimodal_chunk_bytes, 256 MiB by default)",
    )
    p.add_argument("--timeout-s", type=float, default=60.0, help="per socket read/write")
    p.add_argument("--api-key-env", help="environment variable holding a bearer token every POST must carry")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"], help="INFO: one line a request")


def build_server(args: argparse.Namespace) -> Any:
    """The config's policy (seeded as the trainer seeds it) behind a bound, not yet serving, `PolicyServer`."""
    import torch

    from modalities.text_agent.policy_server import PolicyServer, PolicyServerLimits
    from toolkit.config import instantiate, load_config
    from toolkit.train.trainer import seed_everything

    config = load_config(args.config, args.overrides)
    trainer = config.get("trainer") or {}
    seed_everything(int(trainer.get("seed", 0)))
    if trainer.get("num_threads"):
        torch.set_num_threads(int(trainer["num_threads"]))
    policy = instantiate(config["policy"], where="policy")
    policy.module.to(args.device)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env {args.api_key_env} names an environment variable that is not set")
    caps = PolicyServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PolicyServerLimits)})
    return PolicyServer(
        policy, (args.host, args.port), args.model_name, caps, args.generation_batch_size, api_key=api_key
    )


def cmd_serve_policy(args: argparse.Namespace) -> int:
    """Build the policy, then serve until Ctrl-C."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(args)
    from modalities.text_agent.tools.retriever_server import serve_until_interrupted

    return serve_until_interrupted(server, f"serving {args.config} ({args.model_name}) at {server.url}")


def main(argv: list[str] | None = None) -> int:
    """`python -m modalities.text_agent.serve_policy CONFIG ...` (the same as `renorm serve-policy`)."""
    parser = argparse.ArgumentParser(prog="renorm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve-policy", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
