"""The EMA copy of the DiDi student: taken from the initial weights, and sharded like the student under FSDP2.

Until it is needed the copy is a skeleton without storage (`toolkit.train.sharded_copy.meta_copy`). It is taken
when the Trainer hands the policy its prepared student (`StudentPolicy.module = ...`, before any update) or at first
use outside a Trainer. Under FSDP2 each rank then clones only its shards of the student (DTensors with the student's
mesh and placements), the update lerps local shards (no communication), and a checkpoint writes the shards beside
the student's (toolkit.train.sharded_checkpoint) plus one gathered copy that `renorm export` reads. Without sharding
the copy is whole, on the device the student was built on (as before: an EMA on CPU beside a student on GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from toolkit import distributed
from toolkit.hf.reference import weight_fingerprint
from toolkit.train.sharded_copy import (
    clone_into,
    gather_full,
    is_fsdp_sharded,
    local_tensors,
    meta_copy,
    named_tensors,
    reshard,
)


class StudentEMA:
    """ema ← decay·ema + (1 − decay)·student after every optimizer step, over a copy of the student taken lazily.

    Args:
        student: the student backbone as built (its structure is copied now, without storage; its weights when
            `take` is first called).
        decay: the EMA decay in [0, 1).
    """

    def __init__(self, student: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module: nn.Module | None = None
        self._skeleton: nn.Module | None = meta_copy(student).requires_grad_(False).eval()
        self._fingerprint = weight_fingerprint(student)
        self._device = next(student.parameters()).device

    @property
    def sharded(self) -> bool:
        """True when the copy holds this rank's FSDP2 shards only."""
        return self.module is not None and is_fsdp_sharded(self.module)

    def take(self, student: nn.Module, updated: bool, prepared: bool = False) -> nn.Module:
        """The EMA module, taken now from `student` (its shards when it is FSDP2-sharded) if not taken yet.

        A whole copy taken before the student was sharded is replaced by a clone of the student's shards.
        `prepared`: `student` is the Trainer's prepared module, handed over before any update; its weights may differ
        from construction (DDP broadcasts rank 0's), so only `updated` is checked.

        Raises:
            RuntimeError: the copy would be taken after the student's weights changed (`updated`, or its
                fingerprint differs from construction): the EMA must start from the initial weights.
        """
        sharded = is_fsdp_sharded(student)
        if self.module is not None and (self.sharded or not sharded):
            return self.module
        changed = not (sharded or prepared) and not torch.allclose(
            weight_fingerprint(student), self._fingerprint, rtol=1e-9, atol=1e-12
        )
        if updated or changed:
            raise RuntimeError(
                "the EMA copy must be taken from the student's initial weights, but "
                + ("an optimizer step has run" if updated else "they changed since construction")
                + ": read policy.ema (or hand the policy to the Trainer) before the first update"
            )
        skeleton = self._skeleton if self.module is None else meta_copy(self.module)
        reshard(student)
        assert skeleton is not None, "an EMA not taken keeps its skeleton"
        self.module = clone_into(
            skeleton, named_tensors(distributed.unwrap(student)), None if sharded else self._device
        )
        self._skeleton = None
        return self.module

    @torch.no_grad()
    def update(self, student: nn.Module, updated: bool) -> None:
        """One EMA step towards `student`'s current weights (shard by shard under FSDP2: no gathers)."""
        ema = dict(local_tensors(self.take(student, updated)))
        reshard(student)  # its registered parameters are its shards again (FSDP2; a no-op otherwise)
        for name, value in local_tensors(distributed.unwrap(student)):
            target = ema[name]
            if target.is_floating_point():
                target.lerp_(value.to(target.device), 1.0 - self.decay)
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, Tensor] | None:
        """The whole EMA weights; None while sharded (`sharded_state_dict` / `full_state_dict`) or not yet taken."""
        if self.module is None or self.sharded:
            return None
        return self.module.state_dict()

    def sharded_state_dict(self) -> dict[str, Tensor]:
        """This rank's shards (DTensors, in place: a sharded checkpoint load writes into them); {} when unsharded."""
        return self.module.state_dict() if self.module is not None and self.sharded else {}

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The whole weights on CPU, gathered shard by shard on rank 0 (collective when sharded; {} on other ranks)."""
        if not self.sharded:
            return self.state_dict()
        assert self.module is not None
        return gather_full(self.module.state_dict(), keep=distributed.rank() == 0)

    def load_state_dict(self, state: Mapping[str, Tensor], load_shards: Callable[[Any], None] | None) -> None:
        """Load whole weights (`state_dict`'s), or this rank's shards through `load_shards` when sharded.

        Raises:
            ValueError: the copy is sharded and no shard loader came with the state (a checkpoint written without
                sharding cannot fill the shards here).
        """
        if self.sharded:
            if load_shards is None:
                raise ValueError(
                    "the EMA is sharded (FSDP2) but the checkpoint brings no EMA shards: resume an FSDP checkpoint "
                    "through Trainer.load (toolkit.train.sharding.load_checkpoint)"
                )
            load_shards({"ema": self.sharded_state_dict()})
        elif self.module is None:  # not taken yet (a fresh policy loading a checkpoint): the state is the copy
            assert self._skeleton is not None, "an EMA not taken keeps its skeleton"
            self.module = clone_into(self._skeleton, state, self._device)
            self._skeleton = None
        else:
            self.module.load_state_dict(state)
