"""MedVidBench data: SFT-format records → prompt rows, and a seeded, resumable multi-dataset/task mixture DataSource.

A record (spec docs/methods/medgrpo.md §1) holds `conversations` ("<video>\\n" + question, then the reference answer),
`video` (a
list of pre-extracted frame paths, or one video file), `metadata.fps` (a string), `qa_type`, `data_source`,
`struc_info`, and for region captions `is_RC` + `RC_info` {start_frame, start_frame_bbox}. A prompt row is
{"prompt", "video", "fps", "dataset", "task", "qa_type", "answer", "struc_info", "rc_info", "id"}; the trainer passes
its extra keys to the reward models as per-row metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from modalities.medical_video.video import RegionBox
from rewards.video.tasks import normalize_task
from toolkit.data import epoch_permutation, load_records

log = logging.getLogger(__name__)
MixBy = Literal["task", "dataset", "pair"]
VIDEO_TAG = "<video>"


def region_box(rc_info: Any) -> RegionBox | None:
    """RC_info {start_frame, start_frame_bbox} → RegionBox; None when absent.

    [Our decision] `start_frame` is read as an index into the clip's frame list (the released code's convention is
    not documented); the box is [x1, y1, x2, y2] in original-frame pixels.
    """
    if not rc_info:
        return None
    if not isinstance(rc_info, Mapping) or "start_frame_bbox" not in rc_info:
        raise ValueError(f"RC_info must be a mapping with start_frame and start_frame_bbox, got {rc_info!r:.120}")
    box = [float(v) for v in rc_info["start_frame_bbox"]]
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
        raise ValueError(f"RC_info.start_frame_bbox must be [x1, y1, x2, y2] with x2 > x1, y2 > y1, got {box}")
    return RegionBox(frame=int(rc_info.get("start_frame", 0)), box=(box[0], box[1], box[2], box[3]))


def record_to_row(record: Mapping[str, Any], where: str, video_root: Path | None = None) -> dict[str, Any]:
    """One MedVidBench record → a prompt row; ValueError naming `where` (file and record) on a malformed record."""
    try:
        turns = record["conversations"]
        question = str(turns[0]["value"]).replace(VIDEO_TAG + "\n", "").replace(VIDEO_TAG, "").strip()
        answer = str(turns[1]["value"]) if len(turns) > 1 else None
        video = record["video"]
        qa_type = str(record["qa_type"])
        task = normalize_task(qa_type)
        metadata = record.get("metadata") or {}
        fps = float(metadata["fps"]) if metadata.get("fps") is not None else None
        rc_info = record.get("RC_info") if record.get("is_RC", record.get("RC_info") is not None) else None
        region_box(rc_info)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: malformed MedVidBench record ({type(error).__name__}: {error})") from error
    if fps is not None and fps <= 0:
        raise ValueError(f"{where}: metadata.fps must be > 0, got {fps}")
    if not isinstance(video, (str, list)) or not video:
        raise ValueError(f"{where}: 'video' must be a file path or a non-empty list of frame paths")
    return {
        "prompt": question,
        "video": _resolve(video, video_root),
        "fps": fps,
        "dataset": str(record.get("data_source", "unknown")),
        "task": task,
        "qa_type": qa_type,
        "answer": answer,
        "struc_info": record.get("struc_info"),
        "rc_info": rc_info,
        "id": str(record.get("id", metadata.get("video_id", where))),
    }


def load_medvidbench(path: str | Path, video_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Prompt rows of a MedVidBench JSON list or JSONL file; relative video paths resolve against `video_root`
    (default: the file's directory)."""
    file = Path(path)
    root = Path(video_root) if video_root is not None else file.parent
    return [record_to_row(r, f"{file}, record {i}", root) for i, r in enumerate(load_records(file))]


def _resolve(video: str | list[Any], root: Path | None) -> str | list[str]:
    def one(item: Any) -> str:
        text = str(item).removeprefix("file://")
        return str(root / text) if root is not None and not Path(text).is_absolute() else text

    return one(video) if isinstance(video, str) else [one(v) for v in video]


class MedVidBenchDataset:
    """An endless, seeded, resumable stream of MedVidBench prompt rows with configurable mixture weights.

    Every slot of a batch first draws a stratum (a task, a dataset, or a "dataset/task" pair, per `mix_by`) with
    probability proportional to its weight, then takes that stratum's next row (each stratum runs through seeded
    epochs of its own). `state_dict()` holds the stratum draw generator and each stratum's position: resuming
    continues with exactly the next batch.

    Args:
        paths: one or more MedVidBench .json/.jsonl files; or `records` (raw records) instead.
        video_root: base directory for relative video paths (default: each file's directory).
        mixture: {stratum: weight}; strata not named get weight 0. None = proportional to stratum sizes.
        mix_by: what a stratum is: "task", "dataset" or "pair".
        tasks, datasets: keep only these tasks (canonical or qa_type spellings) / data sources.
        shuffle: permute each stratum's epochs (False keeps file order).
        seed: seeds the stratum draws and the epoch permutations.
    """

    def __init__(
        self,
        paths: str | Sequence[str] | None = None,
        records: Sequence[Mapping[str, Any]] | None = None,
        video_root: str | None = None,
        mixture: Mapping[str, float] | None = None,
        mix_by: MixBy = "task",
        tasks: Sequence[str] | None = None,
        datasets: Sequence[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if mix_by not in get_args(MixBy):
            raise ValueError(f"mix_by={mix_by!r} is not one of {list(get_args(MixBy))}")
        if (paths is None) == (records is None):
            raise ValueError("give exactly one of paths and records")
        rows = self._load(paths, records, video_root)
        keep_tasks = {normalize_task(t) for t in tasks} if tasks is not None else None
        rows = [r for r in rows if keep_tasks is None or r["task"] in keep_tasks]
        rows = [r for r in rows if datasets is None or r["dataset"] in set(datasets)]
        if not rows:
            raise ValueError(f"no MedVidBench rows left after filtering (tasks={tasks}, datasets={datasets})")
        self.rows, self.mix_by, self.shuffle, self.seed = rows, mix_by, shuffle, seed
        self.strata: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            self.strata.setdefault(self.stratum(row), []).append(index)
        self.names = sorted(self.strata)
        self.weights = self._weights(mixture)
        self.generator = torch.Generator().manual_seed(seed)
        self.positions = {name: (0, 0) for name in self.names}
        self._orders: dict[str, tuple[int, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def stratum(self, row: Mapping[str, Any]) -> str:
        """The mixture stratum of a row: its task, its dataset, or "dataset/task"."""
        if self.mix_by == "task":
            return str(row["task"])
        if self.mix_by == "dataset":
            return str(row["dataset"])
        return f"{row['dataset']}/{row['task']}"

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[list[dict[str, Any]]]:
        """Endless batches; `generator` is unused (the stream depends only on `seed` and the state)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        while True:
            yield self.next_batch(batch_size)

    def next_batch(self, batch_size: int) -> list[dict[str, Any]]:
        draws = torch.multinomial(self.weights, batch_size, replacement=True, generator=self.generator).tolist()
        return [dict(self.rows[self._next_index(self.names[d])]) for d in draws]

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "positions": {k: list(v) for k, v in self.positions.items()},
            "num_rows": len(self.rows),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("num_rows", len(self.rows))) != len(self.rows):
            raise ValueError(f"state is for {state['num_rows']} rows, this dataset has {len(self.rows)}")
        unknown = set(state["positions"]) - set(self.names)
        if unknown:
            raise ValueError(f"state names strata {sorted(unknown)} that this dataset lacks ({self.names})")
        self.generator.set_state(state["generator"])
        self.positions.update({k: (int(v[0]), int(v[1])) for k, v in state["positions"].items()})

    def _next_index(self, name: str) -> int:
        members = self.strata[name]
        epoch, position = self.positions[name]
        stratum_seed = self.seed * 1_000_003 + self.names.index(name)
        cached = self._orders.get(name)
        if cached is None or cached[0] != epoch:
            order = epoch_permutation(len(members), stratum_seed, epoch) if self.shuffle else list(range(len(members)))
            cached = self._orders[name] = (epoch, order)
        order = cached[1]
        index = members[order[position]]
        position += 1
        self.positions[name] = (epoch + 1, 0) if position == len(members) else (epoch, position)
        return index

    def _weights(self, mixture: Mapping[str, float] | None) -> torch.Tensor:
        if mixture is None:
            return torch.tensor([float(len(self.strata[n])) for n in self.names])
        unknown = sorted(set(mixture) - set(self.names))
        if unknown:
            raise ValueError(f"mixture names unknown {self.mix_by} strata {unknown}; available: {self.names}")
        weights = torch.tensor([float(mixture.get(n, 0.0)) for n in self.names])
        if (weights < 0).any() or not torch.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError(f"mixture weights must be finite, >= 0 and not all 0, got {dict(mixture)}")
        return weights

    @staticmethod
    def _load(
        paths: str | Sequence[str] | None, records: Sequence[Mapping[str, Any]] | None, video_root: str | None
    ) -> list[dict[str, Any]]:
        if records is not None:
            root = Path(video_root) if video_root is not None else None
            return [record_to_row(r, f"records[{i}]", root) for i, r in enumerate(records)]
        files = [paths] if isinstance(paths, str) else list(paths or [])
        return [row for file in files for row in load_medvidbench(file, video_root)]
