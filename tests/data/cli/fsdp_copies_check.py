"""DiDi's EMA and a text policy's frozen reference under FSDP2, on the ranks of one `accelerate launch`.

Usage: accelerate launch --config_file configs/accelerate/cpu_fsdp.yaml tests/data/cli/fsdp_copies_check.py \
    OUT train DIDI_CONFIG key=value ...
1. trains the DiDi config 2 steps into OUT/didi with a checkpoint after each, copies it without step 2 (a process
   killed during step 2) to OUT/didi-killed and resumes that to step 2 (fsdp_train_check.py's helpers);
2. on the resumed trainer: how the EMA is held (local vs whole elements) and the collectives one EMA update and one
   gather of it run (torch's CommDebugMode counts FSDP's and DTensor's);
3. prepares a text policy and its reference with `sharding.prepare`, once as the policy takes it (a skeleton) and
   once from a whole frozen copy (the path before, for contrast): bench/fsdp_reference_memory.py's figures, and
   whether the skeleton's reference gathers to the initial weights and scores like the policy.
Every rank writes OUT/report-rank{r}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor.debug import CommDebugMode

import toolkit.train.runner
from bench.fsdp_reference_memory import build_policy, fixed_mmap_threshold, prepare_with_reference
from tests.data.cli.fsdp_train_check import captured, finish, recording_fit, simulate_kill
from toolkit import cli, distributed
from toolkit.train.sharded_copy import gather_full, local_tensors

REFERENCE_MODEL = {"hidden_size": 384, "num_layers": 8}  # ~52 MB of fp32 weights: well above RSS noise


def ema_report(policy: Any) -> dict[str, Any]:
    ema = policy.ema
    local = sum(t.numel() for _, t in local_tensors(ema))
    whole = sum(t.numel() for t in ema.state_dict().values())
    with CommDebugMode() as update:
        policy.after_optimizer_step()
    with CommDebugMode() as gather:
        gather_full(ema.state_dict(), keep=False)
    return {
        "ema_local_numel": local,
        "ema_numel": whole,
        "ema_update_collectives": update.get_total_counts(),
        "ema_gather_collectives": gather.get_total_counts(),
    }


def reference_report(accelerator: Any) -> dict[str, Any]:
    from accelerate.utils import FullyShardedDataParallelPlugin

    # The DiDi run's plugin wraps DiT blocks; a fresh one reads the launch config again (as toolkit.distributed).
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    report: dict[str, Any] = {}
    for variant in ("skeleton", "full_copy"):
        policy = build_policy(**REFERENCE_MODEL)
        initial = {name: tensor.clone() for name, tensor in policy.module.state_dict().items()}
        reference, figures = prepare_with_reference(accelerator, policy, variant)
        report[variant] = figures
        if variant == "skeleton":
            gathered = gather_full(reference.state_dict(), keep=True)
            report["reference_equals_initial"] = gathered.keys() == initial.keys() and all(
                torch.equal(gathered[k], initial[k]) for k in initial
            )
            report["snapshot_is_reference"] = policy.init_reference() is reference
            ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                diff = (policy.module(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max()
            report["logits_max_diff"] = float(diff)
        del policy, reference
        accelerator.free_memory()
    return report


def main() -> int:
    toolkit.train.runner.fit = recording_fit
    fixed_mmap_threshold()  # RSS shows every tensor made and freed (bench/fsdp_reference_memory.py)
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    steps = ["trainer.num_steps=2", "trainer.save_every=1"]
    if cli.main([*argv, f"trainer.run_dir={out / 'didi'}", *steps]) != 0:
        return 1
    killed = simulate_kill(out / "didi")
    if cli.main([*argv, f"trainer.run_dir={killed}", *steps]) != 0:
        return 1
    trainer = captured["trainer"]
    report = {"rank": distributed.rank(), "step": trainer.global_step, **ema_report(trainer.policy)}
    report["reference"] = reference_report(trainer.accelerator)
    (out / f"report-rank{distributed.rank()}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    finish(main())
