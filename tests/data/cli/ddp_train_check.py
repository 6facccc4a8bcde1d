"""Run `renorm train` (toolkit.cli.main) under `accelerate launch`, then compare every rank's final parameters.

Usage: accelerate launch ... tests/data/cli/ddp_train_check.py RESUME_TO train CONFIG key=value ...
Runs the command, then runs it again with `trainer.num_steps=RESUME_TO` (a resume from the first run's
checkpoint). `toolkit.train.runner.fit` is wrapped to keep the trainer and a copy of its initial weights; after
the second run each rank all-gathers its flat parameter vector and prints one `DDP_CHECK {json}` line.
The script exits 1 when ranks differ, when the weights did not move, or when rank 0's checkpoint differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

import toolkit.train.runner
from toolkit import cli, distributed
from toolkit.io.checkpoint import load_checkpoint

captured: dict[str, Any] = {}
original_fit = toolkit.train.runner.fit


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in distributed.unwrap(module).parameters()])


def recording_fit(trainer: Any) -> Path | None:
    captured["trainer"] = trainer
    captured["initial"] = flat_parameters(trainer.policy.module)
    last = original_fit(trainer)
    captured["last"] = last
    return last


def check_ranks() -> dict[str, Any]:
    trainer = captured["trainer"]
    final = flat_parameters(trainer.policy.module)
    everyone = distributed.gather_rows(final[None, :])
    report: dict[str, Any] = {
        "step": trainer.global_step,
        "rank": distributed.rank(),
        "world_size": distributed.world_size(),
        "num_parameters": int(final.numel()),
        "max_abs_diff_between_ranks": float((everyone - everyone[0]).abs().max()),
        "moved": float((final - captured["initial"]).abs().max()),
    }
    if distributed.rank() == 0 and captured["last"] is not None:
        saved = load_checkpoint(captured["last"]).model
        state = distributed.unwrap(trainer.policy.module).state_dict()
        report["checkpoint_max_abs_diff"] = max(float((saved[k] - v.cpu()).abs().max()) for k, v in state.items())
    return report


def main() -> int:
    toolkit.train.runner.fit = recording_fit
    resume_to, argv = sys.argv[1], sys.argv[2:]
    for run in (argv, [*argv, f"trainer.num_steps={resume_to}"]):
        code = cli.main(run)
        if code != 0:
            return code
    report = check_ranks()
    print("DDP_CHECK " + json.dumps(report), flush=True)
    ok = (
        report["world_size"] == 2
        and report["max_abs_diff_between_ranks"] == 0.0
        and report["moved"] > 0.0
        and report.get("checkpoint_max_abs_diff", 0.0) == 0.0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
