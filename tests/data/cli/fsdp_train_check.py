"""Run `renorm train` under `accelerate launch` with FSDP, simulate a kill after the first checkpoint, resume, compare.

Usage: accelerate launch --config_file configs/accelerate/cpu_fsdp.yaml tests/data/cli/fsdp_train_check.py \
    RUN_DIR train CONFIG key=value ...
1. trains 2 steps into RUN_DIR with a checkpoint after each (the uninterrupted run);
2. rank 0 copies RUN_DIR to RUN_DIR-killed without the step-2 checkpoint (a process killed during step 2);
3. trains RUN_DIR-killed to step 2 again, resuming from its step-1 checkpoint in the same processes.
Then it counts the all-gathers of sampling calls with and without `sharding.gathered_weights` and writes one
`RUN_DIR-report-rank{r}.json` per rank; the test compares the checkpoints' weight files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

import toolkit.train.runner
from toolkit import cli, distributed
from toolkit.train import sharding

captured: dict[str, Any] = {}
original_fit = toolkit.train.runner.fit


def recording_fit(trainer: Any) -> Path | None:
    captured["trainer"] = trainer
    return original_fit(trainer)


@contextmanager
def counted_all_gathers() -> Iterator[list[int]]:
    """Counts FSDP2's parameter all-gathers (torch.distributed.all_gather_single) inside the block."""
    calls = [0]
    original = torch_dist.all_gather_single

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    torch_dist.all_gather_single = counting
    try:
        yield calls
    finally:
        torch_dist.all_gather_single = original


def sampling_all_gathers(trainer: Any, gathered: bool, max_new_tokens: int) -> int:
    trainer.sampler.max_new_tokens = max_new_tokens
    prompts = trainer.local_prompts()
    context = sharding.gathered_weights(trainer.accelerator, trainer.policy.module) if gathered else nullcontext()
    with counted_all_gathers() as calls, torch.no_grad(), context:
        trainer.sampler.sample(trainer.policy, prompts, trainer.config.group_size, torch.Generator().manual_seed(0))
    return calls[0]


def simulate_kill(run_dir: Path) -> Path:
    killed = run_dir.with_name(run_dir.name + "-killed")
    if distributed.rank() == 0:
        shutil.copytree(run_dir, killed, ignore=shutil.ignore_patterns("step_00000002", "*.lock"))
    distributed.barrier()
    return killed


def main() -> int:
    toolkit.train.runner.fit = recording_fit
    run_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    if cli.main([*argv, f"trainer.run_dir={run_dir}", "trainer.num_steps=2", "trainer.save_every=1"]) != 0:
        return 1
    killed = simulate_kill(run_dir)
    if cli.main([*argv, f"trainer.run_dir={killed}", "trainer.num_steps=2", "trainer.save_every=1"]) != 0:
        return 1
    trainer = captured["trainer"]
    from torch.distributed.fsdp import FSDPModule

    reference = trainer.policy.init_reference()
    report = {
        "rank": distributed.rank(),
        "world_size": distributed.world_size(),
        "engine": sharding.engine(trainer.accelerator),
        "step": trainer.global_step,
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in trainer.policy.module.modules()),
        "fsdp_unit_classes": sorted(
            {
                type(m).__name__.removeprefix("FSDP")
                for m in trainer.policy.module.modules()
                if isinstance(m, FSDPModule)
            }
        ),
        "reference_is_copy": reference is not trainer.policy.module,
        "reference_units": sum(isinstance(m, FSDPModule) for m in reference.modules()),
        "all_gathers_gathered_2_tokens": sampling_all_gathers(trainer, gathered=True, max_new_tokens=2),
        "all_gathers_gathered_6_tokens": sampling_all_gathers(trainer, gathered=True, max_new_tokens=6),
        "all_gathers_6_tokens": sampling_all_gathers(trainer, gathered=False, max_new_tokens=6),
    }
    run_dir.with_name(f"{run_dir.name}-report-rank{distributed.rank()}.json").write_text(json.dumps(report))
    return 0


def finish(code: int) -> None:
    """Exit every rank with `code` once all are done, skipping interpreter teardown: a gloo process group torn down
    at exit aborted once in ~6 runs on this machine ("terminate called without an active exception") after
    everything had been written and checked."""
    distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    finish(main())
