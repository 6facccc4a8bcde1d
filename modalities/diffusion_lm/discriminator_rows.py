"""Where `DiscriminatorReward`'s teacher-sampled and held-out real rows come from (arXiv:2509.25035, [Our decision]).

A mixin: the reward keeps the pool, its ring cursor and the held-out rows as its own attributes (it checkpoints
them); these methods draw teacher samples for the pool, its refresh and the memorisation monitor, and read the
`data_holdout` rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class RealRowSource:
    """Teacher pool, pool refresh and held-out rows of `DiscriminatorReward` (see its `__init__` for the knobs).

    The host sets every attribute annotated here in its `__init__`; `generator` is the training stream and
    `monitor_generator` the held-out monitor's own.
    """

    teacher: Any
    teacher_num_steps: int
    teacher_time_grid: str
    teacher_pool_size: int
    teacher_pool_refresh: int
    teacher_pool: Tensor | None
    pool_cursor: int
    teacher_holdout_size: int
    data_holdout: Any
    data_holdout_size: int
    generator: torch.Generator
    monitor_generator: torch.Generator

    def sample_teacher_pool(self, length: int) -> Tensor:
        """[teacher_pool_size, length] teacher samples (CPU), seeded once from this reward's generator."""
        return self.sample_teacher_rows(self.teacher_pool_size, length, self.generator)

    def sample_teacher_rows(self, count: int, length: int, generator: torch.Generator) -> Tensor:
        """[count, length] teacher samples (CPU) with `teacher_num_steps` steps, seeded from `generator`."""
        from modalities.diffusion_lm.masked_diffusion import sample_in_batches

        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return sample_in_batches(
            self.teacher, count, length, self.teacher_num_steps, seed=seed, time_grid=self.teacher_time_grid
        )

    @torch.no_grad()
    def sample_teacher(self, count: int, length: int) -> Tensor:
        """[count, length] fresh teacher samples (`teacher_num_steps` steps on `teacher_time_grid`, this reward's
        generator): the real rows of a call without a pool, and a pool's refreshed rows."""
        rows: Tensor = self.teacher.sample(
            count, length, self.teacher_num_steps, self.generator, time_grid=self.teacher_time_grid
        )
        return rows

    def refresh_pool(self) -> None:
        """Replace the `teacher_pool_refresh` oldest pooled rows (a ring) with fresh teacher samples."""
        assert self.teacher_pool is not None
        size, n = self.teacher_pool.shape[0], self.teacher_pool_refresh
        rows = self.sample_teacher(n, self.teacher_pool.shape[1])
        slots = (self.pool_cursor + torch.arange(n)) % size
        self.teacher_pool[slots] = rows.to(self.teacher_pool.device)
        self.pool_cursor = int((self.pool_cursor + n) % size)

    def held_out_rows(self, length: int) -> Tensor:
        """[H, length] rows that never train the discriminator: teacher samples or the `data_holdout` rows."""
        if self.data_holdout is None:
            return self.sample_teacher_rows(self.teacher_holdout_size, length, self.monitor_generator)
        from modalities.diffusion_lm.text_data import collate_input_ids

        count = self.data_holdout_size
        if hasattr(self.data_holdout, "__len__"):
            count = min(count, len(self.data_holdout))
        rows = collate_input_ids(self.data_holdout.next_batch(count))
        if rows.shape[1] != length:
            raise ValueError(
                f"data_holdout rows have length(s) [{rows.shape[1]}], the samples {length} (set its seq_len)"
            )
        return rows
