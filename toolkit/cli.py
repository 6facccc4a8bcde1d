"""`renorm`: train, eval, score, plot, merge, export and config from the command line.

renorm train CONFIG [key=value ...]      train from a YAML config (resumes by default)
renorm eval CONFIG [--checkpoint DIR]    score the policy's samples on the eval prompts
renorm score REWARD --input FILE         run one reward model standalone, JSONL in/out
renorm plot RUN_DIR [RUN_DIR ...]        write PNG curves of a run's metrics (several: overlaid)
renorm merge BASE TUNED OUT              DLER update-selective merging of two checkpoints
renorm export [CONFIG] CHECKPOINT OUT    a checkpoint as a transformers / PEFT / diffusers / DiDi folder
renorm config CONFIG [key=value ...]     print the resolved config (--validate, --defaults)
renorm data list | prepare NAME --out DIR   the datasets the recipes read, written where they read them
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from toolkit.config import ConfigError


def cmd_train(args: argparse.Namespace) -> int:
    from toolkit.config import load_config
    from toolkit.io.console import window_means
    from toolkit.io.logging import print_before_after, read_metrics
    from toolkit.io.plotting import plot_run
    from toolkit.train.runner import build_trainer, fit

    flags = {"trainer.overwrite=true": args.overwrite, "trainer.allow_config_change=true": args.allow_config_change}
    overrides = [*args.overrides, *(override for override, on in flags.items() if on)]
    config = load_config(args.config, overrides)
    trainer = build_trainer(config)
    last = fit(trainer)
    if not trainer.accelerator.is_main_process:
        return 0
    records = read_metrics(trainer.run_dir)
    if records:
        window, first, final = window_means(records)  # a few steps averaged at each end
        keys = [k for k in summary_keys(records[0]) if k in first and k in final]
        title = f"{args.config}: first vs last {window} step{'s' if window > 1 else ''}"
        print_before_after(first, final, keys, title=title)
        plots = plot_run(trainer.run_dir)
        print(f"plots: {', '.join(str(p) for p in plots)}")
    print(f"run dir: {trainer.run_dir}  last checkpoint: {last}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from toolkit.config import load_config
    from toolkit.evaluation import evaluate

    config = load_config(args.config, args.overrides)
    result = evaluate(config, checkpoint=args.checkpoint, output=args.output)
    print(result.table())
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from toolkit.evaluation import score_file

    count = score_file(args.reward, Path(args.input), Path(args.output) if args.output else None, args.batch_size)
    print(f"scored {count} rows", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from toolkit.io.plotting import plot_runs

    for path in plot_runs(args.run_dirs, args.out_dir, smooth=args.smooth, ema=args.ema):
        print(path)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from toolkit.io.merging import merge_checkpoints

    merge_checkpoints(args.base, args.tuned, args.out, density=args.density, scale=args.scale, scope=args.scope)
    print(f"merged checkpoint written to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from toolkit.config import load_config
    from toolkit.io.export import export_checkpoint, split_export_args

    config_path, checkpoint, out, overrides = split_export_args([*args.paths, *args.overrides])
    config = load_config(config_path, overrides)
    loaded = export_checkpoint(config, checkpoint, out, merge_lora=args.merge_lora, dtype=args.dtype)
    print(f"exported {loaded} (config {config_path}) to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    if args.push_to_hub:
        from toolkit.io.hub import push_to_hub

        url = push_to_hub(out, args.push_to_hub, config, package_version(), private=args.private)
        print(f"pushed {out} to the Hub repo {args.push_to_hub}: {url}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from toolkit.config import format_config, load_config
    from toolkit.io.redaction import redact

    config = load_config(args.config, args.overrides)
    if args.validate:
        from toolkit.train.runner import validate_run_config

        validate_run_config(config)  # what `renorm train` checks before any model loads; errors exit 2
    if not args.defaults:
        print(format_config(redact(config)))
    else:
        from toolkit.config.defaults import fill_defaults, format_with_defaults
        from toolkit.evaluation import EvalConfig
        from toolkit.train.runner import RunSpec
        from toolkit.train.trainer_config import TrainerConfig

        sections = {"": RunSpec, "trainer": TrainerConfig, "eval": EvalConfig}
        print(format_with_defaults(fill_defaults(redact(config), sections)), end="")
    if args.validate:
        print(f"renorm: {args.config} is a valid run config", file=sys.stderr)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from toolkit.io.prepare import list_datasets, prepare_dataset

    if args.data_command == "list":
        rows = list_datasets()
        width = max((len(name) for name, _ in rows), default=0)
        for name, description in rows:
            print(f"{name:<{width}}  {description}")
        return 0
    files = prepare_dataset(args.name, args.out, source=args.source, limit=args.limit)
    for path in files:
        print(path)
    print(f"renorm: {args.name}: wrote {len(files)} file(s) under {args.out}", file=sys.stderr)
    return 0


def add_data_command(sub: Any) -> None:
    """`renorm data list` and `renorm data prepare NAME --out DIR [--source S] [--limit N]`."""
    p = sub.add_parser(
        "data",
        help="List the datasets the recipes read, or prepare one where its recipes read it.",
        description="List the datasets the recipes read (`renorm data list`), or download and convert one "
        "(`renorm data prepare NAME --out data/NAME`, the folder the recipes read).",
    )
    p.set_defaults(func=cmd_data)
    actions = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="the registered datasets, one line each")
    prepare = actions.add_parser(
        "prepare", help="write dataset NAME under --out", description="Write dataset NAME under --out."
    )
    prepare.add_argument("name", metavar="NAME", help="a name from `renorm data list`")
    prepare.add_argument("--out", required=True, type=Path, help="output folder; the recipes read data/NAME")
    prepare.add_argument(
        "--source", help="read the upstream data from here (a local file or folder, or a hub id) instead of the hub"
    )
    prepare.add_argument("--limit", type=int, help="keep the first N rows (a quick try); default: all")


PLUGIN_GROUP = "renorm.commands"


CORE_COMMANDS = ("train", "eval", "score", "plot", "merge", "export", "config", "data")


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="renorm", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=f"renorm {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: object, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = command("train", cmd_train, "Train from a YAML config; key=value pairs override it (e.g. optimizer.lr=1e-5).")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="with trainer.resume=never on a run dir that holds a run: move that run aside (RUN_DIR.old-*) first",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config changes what is trained (lr included): applied and recorded in "
        "RUN_DIR/config_changes.jsonl",
    )
    p = command("eval", cmd_eval, "Sample from the policy on the eval prompts and report rewards per dataset/task.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument(
        "--checkpoint",
        help="a checkpoint dir, a run dir (its newest checkpoint) or an export folder (renorm export's OUT, "
        "RUN_DIR/export); default: the config's base weights",
    )
    p.add_argument("--output", help="write the results as JSON here")
    p = command("score", cmd_score, "Run one reward model standalone over a JSONL file (prompt, completion, ...).")
    p.add_argument(
        "reward", help="dotted path (rewards.text.math.MathAccuracyReward) or a YAML file with a _component_ node"
    )
    p.add_argument("--input", required=True, help="JSONL with 'prompt' and 'completion' per line")
    p.add_argument("--output", help="JSONL to write (default: stdout)")
    p.add_argument("--batch-size", type=int, default=64)
    p = command(
        "plot",
        cmd_plot,
        "Write PNG curves of a run (overview, reward, eval, advantage, KL, clip, length, ...); several runs: overlaid.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one run, or several to overlay (one colour each)")
    p.add_argument("--out-dir", help="default: RUN_DIR/plots (one run), compare_A_vs_B/ next to the first run")
    smoothing = p.add_mutually_exclusive_group()
    smoothing.add_argument(
        "--ema", type=float, metavar="ALPHA", help="EMA weight of the newest point in (0, 1]; 1 = raw curves only"
    )
    smoothing.add_argument(
        "--smooth", type=int, metavar="N", help="trailing moving-average window instead of the EMA; 1 = raw curves only"
    )
    p.epilog = "Default smoothing: an EMA spanning ~1/10 of each curve, drawn over the faint raw curve."
    p = command("merge", cmd_merge, "Update-selective merging (DLER §4.6): base + scale · top-density(tuned − base).")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("out")
    p.add_argument("--density", type=float, default=0.25)
    p.add_argument("--scale", type=float, default=0.7)
    p.add_argument("--scope", choices=["tensor", "global"], default="tensor")
    p = command("export", cmd_export, "Write a checkpoint as a Hugging Face folder (transformers, PEFT or diffusers).")
    p.usage = (
        "%(prog)s [--merge-lora] [--dtype {auto,fp32,bf16}] [--push-to-hub REPO [--private]] "
        "[CONFIG] CHECKPOINT_OR_RUN_DIR OUT [key=value ...]"
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="[CONFIG] CHECKPOINT_OR_RUN_DIR OUT, then key=value overrides of the config; CONFIG defaults to the "
        "run's config.yaml (secrets redacted); a run dir exports its newest verified checkpoint",
    )
    p.add_argument("--merge-lora", action="store_true", help="LoRA: merge the adapters and write a full model")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="cast the weights (auto: keep)")
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="then upload OUT (with a model card) to this Hub repo, created when missing; the token comes from "
        "HF_TOKEN or `hf auth login`",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(overrides=[])
    p.epilog = (
        "Full fine-tuning: config.json, generation_config.json, safetensors, tokenizer and chat template "
        "(AutoModelForCausalLM.from_pretrained(OUT)). LoRA: adapter_config.json, adapter_model.safetensors and the "
        "tokenizer (PeftModel.from_pretrained(base, OUT)); with --merge-lora a full model folder."
    )
    p = command("config", cmd_config, "Print the resolved config (bases merged, overrides applied, ${...} resolved).")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument(
        "--validate",
        action="store_true",
        help="run the checks of `renorm train` (every section against its constructor, nothing built); "
        "a bad key exits 2 naming it",
    )
    p.add_argument(
        "--defaults",
        action="store_true",
        help="also show every constructor and TrainerConfig default the config leaves out, each marked '# default'",
    )
    add_data_command(sub)
    for plugin in entry_points(group=PLUGIN_GROUP) if plugins else ():
        try:
            register = plugin.load()
        except ImportError as err:  # one broken modality must not take the whole CLI down
            print(f"renorm: skipping the {plugin.name!r} command ({plugin.value}): {err}", file=sys.stderr)
            continue
        register(sub)
    return parser


def package_version() -> str:
    """The installed distribution's version (`pip install -e .` included), or "unknown" from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("renorm")
    except PackageNotFoundError:
        return "unknown (not installed)"


def summary_keys(record: Mapping[str, Any]) -> list[str]:
    """The metrics of the end-of-training table: the score, each reward component, tool use, length, stats."""
    components = sorted(k for k in record if k.startswith("reward/") and k.count("/") == 1 and k != "reward/mean")
    extra = ("agent/tool_calls_mean", "rollout/length_mean", "advantage/std", "policy/clip_frac")
    return ["reward/mean", *components[:8], *extra]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Loading a plugin imports its modality package (torch, transformers: seconds); core commands skip it.
    core = bool(argv) and argv[0] in CORE_COMMANDS
    parser = build_parser(plugins=not core)
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also come after options (`eval CONFIG --checkpoint DIR a.b=c`).
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"renorm: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"renorm: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from toolkit.io.checkpoint import CheckpointError  # lazy: `import toolkit.cli` stays free of torch
        from toolkit.io.run_dir import RunDirError
        from toolkit.train.scoring import RewardFailure

        if isinstance(err, RunDirError):
            print(f"renorm: run dir error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, RewardFailure):
            print(f"renorm: reward failure: {err}", file=sys.stderr)
            return 1
        if not isinstance(err, CheckpointError):
            raise
        print(f"renorm: checkpoint error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only, permission: one line naming the file, no traceback
        where = f" ({err.filename})" if err.filename and str(err.filename) not in str(err) else ""
        print(f"renorm: error: {err}{where}", file=sys.stderr)
        return 1


def entry() -> int:
    """The `renorm` command (and `python -m toolkit.cli`): `main`, then the process group of a distributed run is
    closed. In-process callers of `main` (tests, scripts that run several commands under one launch) keep theirs."""
    try:
        return main()
    finally:
        close_process_group()


def close_process_group() -> None:
    """Destroy the default process group of a distributed run (`accelerate launch`) before the interpreter exits:
    left to interpreter shutdown, gloo's worker threads could be torn down while still joinable, aborting a rank
    ("terminate called without an active exception") after a run that finished."""
    distributed = sys.modules.get("torch.distributed")  # never imported by a core command: nothing to close
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(entry())
