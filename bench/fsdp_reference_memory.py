"""Peak host memory of preparing a policy and its frozen reference for FSDP2: a full copy vs a sharded skeleton.

Before issue 19's follow-up the reference was a whole frozen copy of the policy (`toolkit.hf.reference.frozen_copy`)
sharded after the policy; now, under FSDP2, `policy.init_reference()` returns a skeleton without storage that
`toolkit.train.sharding.prepare` fills with each rank's shards of the prepared policy. Both variants run in the same
2-rank gloo launch (configs/accelerate/cpu_fsdp.yaml), alternating A B B A, each from a freshly built policy:
the figure is the peak RSS during take-reference + `sharding.prepare`, minus the RSS just before (VmHWM reset
through /proc/self/clear_refs; glibc is told to mmap every block of 64 KiB or more, so a freed tensor leaves RSS at
once and a new one always shows: `fixed_mmap_threshold`).

    .venv/bin/python bench/fsdp_reference_memory.py                       # hidden 1024, 8 layers (~94 M params)
    .venv/bin/python bench/fsdp_reference_memory.py --hidden-size 512 --num-layers 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script under accelerate launch
    sys.path.insert(0, str(ROOT))

from bench.logprob_memory import peak_rss_extra  # noqa: E402

Variant = Literal["full_copy", "skeleton", "none"]
VARIANTS: tuple[Variant, ...] = ("full_copy", "skeleton", "none")


def build_policy(hidden_size: int, num_layers: int) -> Any:
    """A CausalLMPolicy with reference="copy" around a seeded Qwen2 of the given width and depth (vocab 128)."""
    from modalities.text_agent.policy import CausalLMPolicy
    from modalities.text_agent.tiny import build_char_tokenizer, build_tiny_qwen2

    model = build_tiny_qwen2(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 11 // 4,
        num_layers=num_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        seed=0,
    )
    return CausalLMPolicy(model=model, tokenizer=build_char_tokenizer(), reference="copy")


def fixed_mmap_threshold(threshold: int = 1 << 16) -> None:
    """Have glibc mmap every allocation of `threshold` bytes or more, and unmap it when freed.

    By default glibc raises its mmap threshold after a large block is freed, so later tensors reuse heap memory that
    RSS still counts: a copy made after something else was freed would not show. Setting the threshold turns that
    adjustment off (mallopt M_MMAP_THRESHOLD); without glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is not None:
        ctypes.CDLL(name).mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD


def storage_bytes(module: nn.Module) -> int:
    """Bytes of this rank's storage behind `module`'s parameters and buffers (a DTensor's local shard; 0 on meta)."""
    from toolkit.train.sharded_copy import local_tensors

    return sum(0 if t.is_meta else t.numel() * t.element_size() for _, t in local_tensors(module))


def take_reference(policy: Any, variant: Variant) -> nn.Module | None:
    """The reference as each variant takes it: a whole frozen copy, the policy's own (a skeleton under FSDP2), none."""
    from toolkit.hf.reference import frozen_copy

    if variant == "full_copy":
        return frozen_copy(policy.module)
    return policy.init_reference() if variant == "skeleton" else None


def prepare_with_reference(
    accelerator: Any, policy: Any, variant: Variant
) -> tuple[nn.Module | None, dict[str, float]]:
    """Take `policy`'s reference (`variant`) and run `sharding.prepare` on both; returns the reference and figures.

    "full_copy": a whole frozen copy (the path before the skeleton), sharded after the policy; "skeleton": what
    `policy.init_reference()` takes under FSDP2; "none": no reference (what preparing the policy alone costs).
    Figures: `peak_extra` (bytes of peak RSS over the RSS before), `weights` (the policy's weight bytes),
    `reference_taken` (storage bytes of the reference as taken) and `reference_local` (its bytes after prepare).
    """
    from toolkit.train import sharding
    from toolkit.train.trainer_config import TrainerConfig

    def take_and_prepare() -> tuple[nn.Module | None, int]:
        reference = take_reference(policy, variant)
        taken = storage_bytes(reference) if reference is not None else 0
        optimizer = torch.optim.AdamW([p for p in policy.module.parameters() if p.requires_grad], lr=1e-5)
        config = TrainerConfig(prompts_per_step=accelerator.num_processes, group_size=2)
        policy.module, _ = sharding.prepare(accelerator, policy.module, optimizer, config, reference=reference)
        return reference, taken

    weights = storage_bytes(policy.module)
    gc.collect()
    peak, (reference, taken) = peak_rss_extra(take_and_prepare)
    local = storage_bytes(reference) if reference is not None else 0
    return reference, {"peak_extra": peak, "weights": weights, "reference_taken": taken, "reference_local": local}


def worker(args: argparse.Namespace) -> None:
    from toolkit import distributed

    torch.set_num_threads(1)
    fixed_mmap_threshold()
    accelerator = distributed.make_accelerator("no")
    rows = []
    for variant in (*VARIANTS, *reversed(VARIANTS)):  # A B C C B A
        policy = build_policy(args.hidden_size, args.num_layers)
        _, figures = prepare_with_reference(accelerator, policy, variant)
        rows.append({"variant": variant, **figures})
        del policy
        accelerator.free_memory()  # drops accelerate's references to the prepared module and optimizer
        distributed.barrier()
    out = Path(args.out) / f"rank{distributed.rank()}.json"
    out.write_text(json.dumps(rows))
    distributed.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip gloo teardown (see tests/data/cli/fsdp_train_check.py)


def launch(args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    """Run the worker on 2 ranks; every rank's rows, in rank order."""
    from bench.vllm_serve import free_port

    with tempfile.TemporaryDirectory() as out:
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file"]
        command += [str(ROOT / "configs" / "accelerate" / "cpu_fsdp.yaml"), "--main_process_port", str(free_port())]
        command += [__file__, "--worker", "--out", out, "--hidden-size", str(args.hidden_size)]
        command += ["--num-layers", str(args.num_layers)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        return [json.loads(path.read_text()) for path in sorted(Path(out).glob("rank*.json"))]


def report(ranks: list[list[dict[str, Any]]]) -> str:
    """A markdown table (per rank and variant, the means over the repeats) and the ratios."""
    mib = 2**20
    lines = ["| rank | reference | weights (MiB) | reference as taken (MiB) | after prepare (MiB) | peak extra (MiB) |"]
    lines.append("|---|---|---|---|---|---|")
    peaks: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for rank, rows in enumerate(ranks):
        for variant in VARIANTS:
            mine = [r for r in rows if r["variant"] == variant]
            peaks[variant] += [r["peak_extra"] for r in mine]
            cells = [sum(r[k] for r in mine) / len(mine) / mib for k in ("weights", "reference_taken")]
            cells += [sum(r[k] for r in mine) / len(mine) / mib for k in ("reference_local", "peak_extra")]
            lines.append(f"| {rank} | {variant} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    mean = {variant: sum(values) / len(values) / mib for variant, values in peaks.items()}
    lines.append(f"\nPeak extra host memory, full copy / skeleton: **{mean['full_copy'] / mean['skeleton']:.1f}x**.")
    full, skeleton = mean["full_copy"] - mean["none"], mean["skeleton"] - mean["none"]
    lines.append(
        f"The reference's own part (minus none): {full:.0f} MiB as a full copy, {skeleton:.0f} MiB as a skeleton."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    print(report(launch(args)))


if __name__ == "__main__":
    main()
