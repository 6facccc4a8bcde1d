"""A synthetic MedVidBench-format set generated on the fly: tiny videos of a moving box, records for all 8 tasks.

Each video is a dark field on which a coloured "instrument" box enters, moves and leaves, so temporal grounding
(when is it visible) and spatio-temporal grounding (where is it, per second) have real, exactly known answers.
Frames are written both as a pre-extracted frame list (PNG, the MedVidBench layout) and as an mp4 (the decord path).
Nothing is shipped: `make_synthetic_medvidbench(out_dir, seed)` writes a few tens of KB in well under a second.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modalities.medical_video.data import MedVidBenchDataset, MixBy

DATASETS = ("SynthLap", "SynthEndo")
STEPS = ("dissection", "clipping", "cutting")
COLORS = {"red": (200, 40, 40), "blue": (40, 80, 200), "yellow": (210, 190, 40)}
RECORDS_FILE = "medvidbench.json"


def box_track(num_frames: int, size: int, rng: random.Random) -> tuple[int, int, list[list[int] | None]]:
    """(first, last) visible frame and per-frame [x1, y1, x2, y2] boxes (None while the box is not visible)."""
    first = rng.randrange(0, num_frames // 3)
    last = rng.randrange(2 * num_frames // 3, num_frames)
    side = size // 4
    y = rng.randrange(0, size - side)
    boxes: list[list[int] | None] = []
    for t in range(num_frames):
        if not first <= t <= last:
            boxes.append(None)
            continue
        x = round((t - first) / max(last - first, 1) * (size - side))
        boxes.append([x, y, x + side, y + side])
    return first, last, boxes


def render_frames(boxes: Sequence[list[int] | None], size: int, color: tuple[int, int, int]) -> list[np.ndarray]:
    """[size, size, 3] uint8 frames: a dark field with the box filled in `color` where visible."""
    frames = []
    for box in boxes:
        frame = np.full((size, size, 3), 30, dtype=np.uint8)
        if box is not None:
            frame[box[1] : box[3], box[0] : box[2]] = color
        frames.append(frame)
    return frames


def write_mp4(path: Path, frames: Sequence[np.ndarray], fps: float) -> None:
    """Encode `frames` as an mpeg4 mp4 with PyAV (readable by decord)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=int(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def video_records(
    name: str, frames: list[str], fps: float, track: Any, color: str, rng: random.Random
) -> list[dict[str, Any]]:
    """The eight task records of one synthetic video (answers derived from its box track)."""
    first, last, boxes = track
    dataset = DATASETS[int(name[-1]) % len(DATASETS)]
    stg = " ".join(f"{t / fps:.1f} seconds: {box}" for t, box in enumerate(boxes) if box is not None)
    step = rng.choice(STEPS)
    cvs = [rng.randint(0, 2) for _ in range(3)]
    skills = [rng.randint(1, 5) for _ in range(6)]
    mid = next(t for t, b in enumerate(boxes) if b is not None)
    tasks: list[tuple[str, str, str]] = [
        ("tal", "When is the instrument visible? Answer as 'a-b seconds.'",
         f"{first / fps:.1f}-{last / fps:.1f} seconds."),
        ("stg", "Where is the instrument each second? Give [x1, y1, x2, y2].", stg),
        ("region_caption_gpt", "Describe the object in the green box.", f"A {color} grasper holds the tissue."),
        ("video_summary_gemini", "Summarize the video.", f"A {color} grasper crosses the field from left to right."),
        ("next_action", f"Steps: {', '.join(STEPS)}. What is the next step?", step),
        ("cvs_assessment", "Assess the critical view of safety.",
         f"Two structures: {cvs[0]}, Cystic plate: {cvs[1]}, Hepatocystic triangle: {cvs[2]}"),
        ("skill_assessment", "Rate the surgical skill.",
         ", ".join(f"{k}: {v}/5" for k, v in zip(("Respect for tissue", "Suture/needle handling", "Time and motion",
                                                   "Flow of operation", "Overall performance",
                                                   "Quality of final product"), skills, strict=True))),
        ("dense_captioning_gpt", "Describe each event with 'a-b seconds: label: caption'.",
         f"{first / fps:.1f}-{last / fps:.1f} seconds: grasp: the {color} grasper moves right."),
    ]  # fmt: skip
    records = []
    for qa_type, question, answer in tasks:
        record: dict[str, Any] = {
            "id": f"{name}_{qa_type}",
            "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}],
            "video": frames,
            "metadata": {"fps": str(fps), "video_id": name},
            "qa_type": qa_type,
            "data_source": dataset,
            "struc_info": {"skill_level": "N"} if qa_type == "skill_assessment" else None,
            "is_RC": qa_type.startswith("region_caption"),
        }
        if record["is_RC"]:
            record["RC_info"] = {"start_frame": mid, "start_frame_bbox": boxes[mid]}
        records.append(record)
    return records


def make_synthetic_medvidbench(
    out_dir: str | Path, seed: int = 0, num_videos: int = 4, num_frames: int = 8, size: int = 64, fps: float = 1.0
) -> Path:
    """Write the synthetic set under `out_dir` (frames/, videos/, medvidbench.json); returns the records file.

    Deterministic in its arguments; an existing set made with the same arguments is reused.
    """
    out = Path(out_dir)
    records_file = out / RECORDS_FILE
    params = {"seed": seed, "num_videos": num_videos, "num_frames": num_frames, "size": size, "fps": fps}
    params_file = out / "params.json"
    if records_file.is_file() and params_file.is_file() and json.loads(params_file.read_text()) == params:
        return records_file
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for k in range(num_videos):
        name = f"vid{k}"
        color = rng.choice(sorted(COLORS))
        track = box_track(num_frames, size, rng)
        frames = render_frames(track[2], size, COLORS[color])
        (out / "frames" / name).mkdir(parents=True, exist_ok=True)
        (out / "videos").mkdir(parents=True, exist_ok=True)
        paths = []
        for t, frame in enumerate(frames):
            Image.fromarray(frame).save(out / "frames" / name / f"{t:03d}.png")
            paths.append(f"frames/{name}/{t:03d}.png")
        write_mp4(out / "videos" / f"{name}.mp4", frames, fps)
        records.extend(video_records(name, paths, fps, track, color, rng))
    _write_atomic(records_file, json.dumps(records, indent=1))
    _write_atomic(out / "params.json", json.dumps(params))
    return records_file


def synthetic_dataset(
    out_dir: str = "runs/medical_video_synthetic",
    seed: int = 0,
    num_videos: int = 4,
    num_frames: int = 8,
    tasks: Sequence[str] | None = None,
    mixture: Mapping[str, float] | None = None,
    mix_by: MixBy = "task",
    shuffle: bool = True,
) -> MedVidBenchDataset:
    """The synthetic set (generated if needed) as a MedVidBenchDataset: the `data:` node of tiny.yaml."""
    path = make_synthetic_medvidbench(out_dir, seed=seed, num_videos=num_videos, num_frames=num_frames)
    return MedVidBenchDataset(paths=str(path), tasks=tasks, mixture=mixture, mix_by=mix_by, shuffle=shuffle, seed=seed)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
