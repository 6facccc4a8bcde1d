"""Sharded training through accelerate: what FSDP2 and DeepSpeed ZeRO need from the trainer beyond DDP.

`prepare` fills the DeepSpeed settings the trainer's own micro-batching implies (accelerate cannot infer a micro-batch
size without a DataLoader), shards the policy (accelerate's FSDP2 auto-wrap over the module's `_no_split_modules`
blocks) and its frozen reference copy the same way: under FSDP2 the reference arrives as a storage-less skeleton
and is filled from the sharded policy's own shards (toolkit.train.sharded_copy), so no rank holds a second full
copy. `micro_step`, `backward` and `grad_norm` give one optimizer step per `gradient_accumulation_steps`
micro-batches on every engine (DeepSpeed steps inside the last backward).
`gathered_weights` unshards the policy once for all of a step's sampling instead of all-gathering every block per token.
`save_checkpoint` / `load_checkpoint` keep every rank's RNG streams and, under FSDP, torch.distributed.checkpoint
shards (toolkit.train.sharded_checkpoint, loaded without running code from the files), a policy's own sharded state
(DiDi's EMA) among them.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from toolkit import distributed as dist
from toolkit.io.checkpoint import SHARDED_DIR, CheckpointManager, CheckpointState, capture_rng_state
from toolkit.train.trainer_config import TrainerConfig

Engine = Literal["none", "fsdp", "deepspeed"]


def engine(accelerator: Any) -> Engine:
    """Which sharding engine the launch config chose: "fsdp" (FSDP2 only), "deepspeed" or "none" (DDP, one process)."""
    kind = str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
    if kind == "FSDP":
        if not getattr(accelerator, "is_fsdp2", False):
            raise ValueError("FSDP1 is not supported: set `fsdp_version: 2` in the accelerate config's fsdp_config")
        return "fsdp"
    return "deepspeed" if kind == "DEEPSPEED" else "none"


# ---------------------------------------------------------------------------------------------- prepare


def prepare(
    accelerator: Any,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainerConfig,
    reference: nn.Module | None = None,
    has_critic: bool = False,
) -> tuple[nn.Module, Any]:
    """`accelerator.prepare(module, optimizer)` plus what FSDP2 / DeepSpeed need; returns both prepared.

    `reference` (a policy's frozen reference copy, taken before this) is sharded like the policy, in place. Under
    FSDP2 it is a skeleton without storage (`toolkit.hf.reference` takes it so when the accelerate state is FSDP)
    that receives each rank's shards of the prepared policy: no rank ever holds a second full copy. ZeRO-3
    partitions a full copy. A critic is refused under a sharding engine (its state is saved unsharded).
    """
    kind = engine(accelerator)
    zero3 = kind == "deepspeed" and _zero_stage(accelerator) == 3
    if kind != "none" and has_critic:
        raise ValueError(f"a critic is not supported under {kind} yet: launch with DDP (configs/accelerate/ddp.yaml)")
    if kind == "fsdp" or zero3:
        check_lockstep(config, accelerator.num_processes, "FSDP" if kind == "fsdp" else "ZeRO-3")
    if kind == "deepspeed":
        world = accelerator.num_processes
        rows = config.prompts_per_step * config.group_size
        micro = math.ceil(rows / (world * config.num_minibatches * config.gradient_accumulation_steps))
        settings = accelerator.state.deepspeed_plugin.deepspeed_config
        configure_deepspeed(settings, micro, config.gradient_accumulation_steps, config.max_grad_norm, world)
    prepared_module, prepared_optimizer = accelerator.prepare(module, optimizer)
    copy = reference if reference is not None and reference is not module else None
    if kind == "fsdp":
        from toolkit.train.sharded_copy import shard_like

        _init_fsdp_root(prepared_module)
        if copy is not None:
            _init_fsdp_root(shard_like(accelerator, copy, prepared_module))
    elif zero3 and copy is not None:
        _partition_with_zero3(accelerator, copy)
    return prepared_module, prepared_optimizer


def check_lockstep(config: TrainerConfig, world: int, engine_name: str) -> None:
    """ValueError unless every rank runs the same forwards and `generate` calls (sharded weights are all-gathered in
    each forward, and transformers' `generate` synchronises the ranks token by token under FSDP and ZeRO-3)."""
    if config.prompts_per_step % world:
        raise ValueError(
            f"trainer.prompts_per_step={config.prompts_per_step} must be a multiple of the {world} ranks under "
            f"{engine_name}: every rank must run the same forwards"
        )


def in_lockstep(accelerator: Any) -> bool:
    """True when every rank must run the same forwards and `generate` calls (FSDP, ZeRO-3): dynamic sampling then
    refills until every rank has its groups (`any_rank`), the ranks that are done sampling along."""
    name = engine(accelerator)
    return name == "fsdp" or (name == "deepspeed" and _zero_stage(accelerator) == 3)


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank (a collective: every rank calls it)."""
    return bool(dist.all_reduce_sum(torch.tensor(float(flag))).item() > 0)


def configure_deepspeed(
    config: dict[str, Any], micro_batch_size: int, accumulation_steps: int, max_grad_norm: float | None, world: int
) -> None:
    """Fill the DeepSpeed config from the trainer's micro-batching (in place); clipping 0 turns it off.

    Raises:
        ValueError: the launch config sets the micro-batch size, accumulation or clipping to another value than the
            trainer's (it may leave them out or "auto").
    """
    wanted: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": float(max_grad_norm) if max_grad_norm is not None else 0.0,
    }
    trainer_keys = {
        "train_micro_batch_size_per_gpu": "prompts_per_step × group_size / (ranks × num_minibatches × accumulation)",
        "gradient_accumulation_steps": "trainer.gradient_accumulation_steps",
        "gradient_clipping": "trainer.max_grad_norm",
    }
    for key, value in wanted.items():
        current = config.get(key, "auto")
        if current != "auto" and current != value:
            raise ValueError(
                f"the DeepSpeed config sets {key}={current!r} but the trainer uses {value!r} ({trainer_keys[key]}): "
                "remove it from the accelerate config (or set it to 'auto') so the trainer fills it"
            )
        config[key] = value
    config["train_batch_size"] = micro_batch_size * accumulation_steps * world


def _init_fsdp_root(module: nn.Module) -> None:
    """Make `module` FSDP2's root now instead of at its first forward.

    FSDP2 picks as root the first unit to run forward; a policy that runs a block alone first (a frozen vision tower
    encoding each video once per step) would make that block a root and break the real root's forward.
    """
    module._get_fsdp_state()._lazy_init()  # type: ignore[operator]  # FSDPModule's state (no public call for this)


def _zero_stage(accelerator: Any) -> int:
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def _partition_with_zero3(accelerator: Any, reference: nn.Module) -> None:
    """Partition the frozen reference with ZeRO-3 (inference only): its blocks are gathered as they run."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine_, *_ = deepspeed.initialize(model=reference, config=config)
    engine_.eval()
    # Kept with the reference (not registered as its submodule: the engine holds the reference itself) so the
    # engine's gather/release hooks outlive this call.
    object.__setattr__(reference, "_zero3_engine", engine_)


# ---------------------------------------------------------------------------------------------- the update


@contextlib.contextmanager
def micro_step(accelerator: Any, last: bool) -> Iterator[None]:
    """Mark whether this micro-batch ends the optimizer step: DeepSpeed reduces and steps only on the last one."""
    accelerator.sync_gradients = last
    try:
        yield
    finally:
        accelerator.sync_gradients = True  # accelerate's optimizer wrapper skips step() otherwise


def backward(accelerator: Any, loss: Tensor) -> None:
    """`accelerator.backward`; DeepSpeed must not divide by its accumulation count (the loss holds global counts)."""
    if engine(accelerator) == "deepspeed":
        accelerator.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def grad_norm(accelerator: Any, parameters: Iterable[Tensor], max_norm: float | None) -> float:
    """The pre-clip gradient norm (clipping at `max_norm`); NaN when not computed.

    DeepSpeed clipped and stepped inside the last backward (`gradient_clipping`); accelerate hands back the norm
    the engine recorded there, or None when the engine keeps none (read as NaN, never as a crash or a zero).
    """
    if engine(accelerator) == "deepspeed":
        norm = accelerator.clip_grad_norm_(parameters, max_norm or 0.0)
        return math.nan if norm is None else float(norm)
    if max_norm is None:
        return math.nan
    return float(accelerator.clip_grad_norm_(parameters, max_norm))


# ---------------------------------------------------------------------------------------------- generation


@contextlib.contextmanager
def gathered_weights(accelerator: Any, module: nn.Module) -> Iterator[None]:
    """The policy's full weights while sampling: each block all-gathered once, not once per generated token.

    FSDP2: every unit is unsharded with resharding after forward off, then resharded and restored on exit.
    DeepSpeed ZeRO-3: `GatheredParameters` (read-only). Otherwise nothing to do.
    """
    kind = engine(accelerator)
    if kind == "fsdp":
        with _fsdp_unsharded(module):
            yield
    elif kind == "deepspeed" and _zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            yield
    else:
        yield


@contextlib.contextmanager
def _fsdp_unsharded(module: nn.Module) -> Iterator[None]:
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    # Each param group's post-forward mesh says whether it reshards after forward (None: it keeps the full weights);
    # read so that exit restores exactly the launch config's choice per unit.
    saved = [[g.post_forward_mesh_info for g in unit._get_fsdp_state()._fsdp_param_groups] for unit in units]
    try:
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        yield
    finally:
        for unit, infos in zip(units, saved, strict=True):
            unit.reshard()
            for group, info in zip(unit._get_fsdp_state()._fsdp_param_groups, infos, strict=True):
                group.post_forward_mesh_info = info


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    accelerator: Any,
    policy: Any,
    optimizer: Any,
    manager: CheckpointManager,
    make_state: Callable[..., CheckpointState],
) -> Path | None:
    """Save a checkpoint into `manager` from every rank; `make_state(weights=None, **objects)` builds rank 0's.

    FSDP: every rank writes its shards, the whole weights are gathered into `model.safetensors` (export and
    evaluation read it) and the optimizer's param groups go into `objects.pt`; a policy's own sharded state (DiDi's
    EMA) is written as shards too, and gathered once as its `policy_state` for export. ZeRO-3: the weights are
    gathered for rank 0's state dict. Otherwise rank 0 saves as in one process.
    """
    main = accelerator.is_main_process
    if engine(accelerator) == "fsdp":
        from toolkit.io.export import POLICY_STATE
        from toolkit.train import sharded_checkpoint as sharded

        weights = sharded.full_weights(policy)
        objects: dict[str, Any] = {"optimizer": {"param_groups": sharded.param_groups(policy.module, optimizer)}}
        if sharded.policy_shards(policy):
            objects[POLICY_STATE] = policy.full_state_dict()  # collective; replaces rank 0's unsharded state_dict()
        return sharded.save_checkpoint(manager, make_state(weights, **objects) if main else None, policy, optimizer)
    with gathered_weights(accelerator, policy.module):
        state = make_state() if main else None
    path = manager.save(state) if state is not None else None
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(
    accelerator: Any, manager: CheckpointManager, path: Path, module: nn.Module, optimizer: Any
) -> CheckpointState:
    """Restore the weights and optimizer state of the checkpoint at `path` (from its shards when it has them, also
    into another world size); returns the checkpoint for the rest of the trainer's state."""
    sharded = (path / SHARDED_DIR).is_dir()
    check_resumable(accelerator, path, sharded)
    state = manager.load(path, read_model=not sharded)
    if sharded:
        from toolkit.io.export import POLICY_STATE
        from toolkit.train.sharded_checkpoint import attach_policy_shards, load_sharded

        load_sharded(path / SHARDED_DIR, module, optimizer, state.objects["optimizer"]["param_groups"])
        attach_policy_shards(path / SHARDED_DIR, state.objects, POLICY_STATE)  # read by the policy's load_state_dict
        return state
    result = dist.unwrap(module).load_state_dict(state.model, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {path} has weights the policy does not: {result.unexpected_keys[:5]}")
    optimizer.load_state_dict(state.objects["optimizer"])
    return state


def check_resumable(accelerator: Any, path: Path, sharded: bool) -> None:
    """ValueError when this run cannot resume the checkpoint at `path` (`sharded`: it holds FSDP shards)."""
    kind = engine(accelerator)
    if kind == "deepspeed":
        raise ValueError(
            f"cannot resume {path} under DeepSpeed: its ZeRO optimizer state is not checkpointed (loading DeepSpeed's "
            "own format would unpickle arbitrary objects); resume with FSDP or DDP, or set trainer.resume=never"
        )
    if kind == "fsdp" and not sharded:
        raise ValueError(
            f"cannot resume {path} under FSDP: it was written without sharding (no {path.name}/sharded/); "
            "resume it with the launcher that wrote it (DDP or one process)"
        )


def rank_states(generator: torch.Generator) -> list[dict[str, Any]] | None:
    """Every rank's global RNG state and sampling generator, in rank order (collective); None in one process.

    Checkpointed beside rank 0's own state so that each rank resumes its own streams (`own_rank_state`).
    """
    if dist.world_size() == 1:
        return None
    buffer = io.BytesIO()  # tensors travel as torch.save bytes: pickled storages do not survive all_gather_object
    torch.save({"rng": capture_rng_state(), "generator": generator.get_state()}, buffer)
    blobs = dist.gather_objects(buffer.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in blobs]


def own_rank_state(rng: Mapping[str, Any]) -> dict[str, Any] | None:
    """This rank's entry of a checkpoint's per-rank states, or None (one process, or another world size)."""
    ranks = rng.get("ranks")
    if ranks and len(ranks) != dist.world_size():
        warnings.warn(
            f"the checkpoint holds RNG states of {len(ranks)} ranks, this run has {dist.world_size()}: "
            "every rank restores rank 0's (sampling streams differ from the interrupted run's)",
            stacklevel=2,
        )
    if not ranks or len(ranks) != dist.world_size():
        return None
    own: dict[str, Any] = ranks[dist.rank()]
    return own
