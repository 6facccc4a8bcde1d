"""Two trainer ranks sampling through one `server` engine each, launched by test_weight_push_ranks.py:

    accelerate launch --config_file configs/accelerate/cpu_fsdp.yaml tests/toolkit/engines/weight_push_ranks.py URL OUT

Two phases in the same processes: "ddp" (the policy wrapped in DistributedDataParallel) and "fsdp" (sharded by
`toolkit.train.sharding.prepare` with the launch's FSDP2 plugin). Each phase: two steps of sample (inside
`gathered_weights`, as the trainer does) then a gradient step; a third weights version synced, after which rank 1
alone finds the server restarted (it serves other weights) and repairs it while rank 0 waits; then a fourth version
whose pushes the server fails (503 twice, then 400). Each rank writes OUT/report-rank{r}.json.
"""

from __future__ import annotations

import faulthandler
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from modalities.text_agent.sampler import SingleTurnSampler
from tests.tiny import tiny_prompts, tiny_text_policy
from toolkit import distributed as dist
from toolkit.engines import ServerEngine
from toolkit.engines.weights import encode_weights, is_sharded, policy_weights
from toolkit.train import sharding
from toolkit.train.trainer_config import TrainerConfig

GROUP_SIZE = 2


def sample(policy: Any, engine: ServerEngine, accelerator: Any, step: int) -> dict[str, Any]:
    """This rank's rollout of its own 2 prompts inside gathered weights (a collective, as in the trainer)."""
    with sharding.gathered_weights(accelerator, policy.module):
        return sample_gathered(policy, engine, step)


def sample_gathered(policy: Any, engine: ServerEngine, step: int) -> dict[str, Any]:
    """This rank's rollout (the weights already gathered); what it says about the weights it was sampled from."""
    prompts = tiny_prompts(4)[2 * dist.rank() : 2 * dist.rank() + 2]
    sampler = SingleTurnSampler(max_new_tokens=4, engine=engine)
    generator = torch.Generator().manual_seed(100 * step + dist.rank())
    with torch.no_grad():
        rollout = sampler.sample(policy, prompts, GROUP_SIZE, generator)
    return {
        # Reading the weights for the push left FSDP's gathered weights whole (state_dict() would reshard them).
        "whole": not any(is_sharded(p) for p in policy.module.parameters()),
        "version": engine.served_version,
        "pushes": engine.num_pushes,
        "pushed": rollout.metrics["engine/weight_pushed"],
        "retries": rollout.metrics["engine/retries"],
        "mismatch": rollout.metrics["rollout/engine_logprob_abs_diff_max"],
        "rollout": rollout,
    }


def update(policy: Any, optimizer: torch.optim.Optimizer, rollout: Any) -> None:
    """One gradient step raising the sampled tokens' log-probs (every rank: the gradients are averaged)."""
    policy.module.train()
    logprobs = policy.log_probs(rollout)
    loss = -(logprobs * rollout.mask).sum() / rollout.mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def restart_seen_by_rank_1(url: str, policy: Any, engine: ServerEngine, accelerator: Any) -> dict[str, Any]:
    """Version 3 is synced by every rank, outside gathered weights (FSDP: every shard all-gathered by every rank).
    Then, inside gathered weights (entered by all ranks together, as the trainer does), the server "restarts"
    (serves other weights) before rank 1 samples while rank 0 waits at a barrier: rank 1 alone gets 409 and sends
    version 3 again. Rank 0 samples afterwards."""
    assert engine.sync_weights(policy)  # collective: a new version
    out: dict[str, Any] = {}
    with sharding.gathered_weights(accelerator, policy.module):
        dist.barrier()
        if dist.rank() == 1:
            other, kind = policy_weights(tiny_text_policy(seed=1))
            body = encode_weights(other, "restarted", kind)
            headers = {"Content-Type": "application/octet-stream"}
            urllib.request.urlopen(urllib.request.Request(url + "/weights", data=body, headers=headers)).read()
            out = sample_gathered(policy, engine, 3)
        dist.barrier()
        if dist.rank() == 0:
            out = sample_gathered(policy, engine, 3)
        dist.barrier()
    return out


def failing_pushes(policy: Any, engine: ServerEngine, accelerator: Any) -> list[dict[str, Any]]:
    """Version 4's pushes fail (the server answers 503, 503, then 400): every rank raises the same error."""
    failures = []
    for _ in range(2):
        start = time.perf_counter()
        try:
            sample(policy, engine, accelerator, 4)
            failures.append({"error": None})
        except Exception as error:  # recorded for the test to compare across ranks
            failures.append({"type": type(error).__name__, "error": str(error), "seconds": time.perf_counter() - start})
    return failures


def phase(name: str, url: str, policy: Any, optimizer: torch.optim.Optimizer, accelerator: Any) -> dict[str, Any]:
    engine = ServerEngine(url, max_retries=1, retry_backoff_s=0.05, timeout_s=60)
    steps = []
    for step in range(2):
        seen = sample(policy, engine, accelerator, step)
        update(policy, optimizer, seen.pop("rollout"))
        steps.append(seen)
    repaired = restart_seen_by_rank_1(url, policy, engine, accelerator)
    update(policy, optimizer, repaired.pop("rollout"))
    failures = failing_pushes(policy, engine, accelerator)
    dist.barrier()
    return {"phase": name, "steps": steps, "repaired": repaired, "failures": failures, "pushes": engine.num_pushes}


def main() -> int:
    # A rank stuck in a collective (the regression these checks guard against) exits with every thread's stack.
    faulthandler.dump_traceback_later(120, exit=True)
    url, out = sys.argv[1], Path(sys.argv[2])
    accelerator = dist.make_accelerator("no")
    assert sharding.engine(accelerator) == "fsdp" and dist.world_size() == 2
    reports = []

    policy = tiny_text_policy(seed=0)
    # No buffer broadcast: the buffers (rotary tables) are constants, and broadcasting them would make the first
    # forward after a backward a collective, while rank 1 re-scores alone when it repairs the restarted server.
    policy.module = DistributedDataParallel(policy.module, forward_sync_buffers=False)
    optimizer = torch.optim.SGD(policy.module.parameters(), lr=0.5)
    reports.append(phase("ddp", url, policy, optimizer, accelerator))

    policy = tiny_text_policy(seed=0)
    optimizer = torch.optim.SGD(policy.module.parameters(), lr=0.5)
    config = TrainerConfig(prompts_per_step=4, group_size=GROUP_SIZE, mixed_precision="no")
    policy.module, optimizer = sharding.prepare(accelerator, policy.module, optimizer, config)
    assert any(is_sharded(p) for p in policy.module.parameters())  # really sharded
    reports.append(phase("fsdp", url, policy, optimizer, accelerator))

    (out / f"report-rank{dist.rank()}.json").write_text(json.dumps({"rank": dist.rank(), "phases": reports}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
