"""decord is optional (the `video` extra: no wheels for aarch64 or Apple Silicon): without it `reader="decord"` reads
video files with PyAV and gets the same frames, fps and metadata; a warning says so once."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from modalities.medical_video import video
from modalities.medical_video.synthetic import render_frames, write_mp4
from modalities.medical_video.video import RegionBox, VideoConfig, load_video, read_video_file


def moving_box_mp4(path: Path, num_frames: int = 16, fps: float = 4.0) -> Path:
    boxes = [[4 * t, 8, 4 * t + 16, 24] for t in range(num_frames)]
    write_mp4(path, render_frames(boxes, 64, (0, 200, 0)), fps)
    return path


@pytest.mark.parametrize(
    "config",
    [
        VideoConfig(fps=2.0, min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28),
        VideoConfig(fps=1.0, min_pixels=3136, max_pixels=3136, resize="two_pass", max_frames=4),
    ],
    ids=["single_pass", "two_pass"],
)
def test_without_decord_the_same_frames_come_from_pyav(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, config: VideoConfig
) -> None:
    import decord  # installed here (make test installs the `video` extra): the reference

    path = moving_box_mp4(tmp_path / "clip.mp4")
    box = RegionBox(frame=1, box=(8.0, 8.0, 40.0, 40.0))
    assert video._import_decord() is decord
    with_decord = [read_video_file(path, config), load_video(str(path), config, box=box)]

    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    monkeypatch.setattr(video, "_warned_no_decord", False)
    with caplog.at_level(logging.WARNING, logger=video.__name__):
        without = [read_video_file(path, config), load_video(str(path), config, box=box)]
    assert config.reader == "decord" and video._import_decord() is None
    for ours, reference in zip(without, with_decord, strict=True):
        assert ours.frames.shape == reference.frames.shape and torch.equal(ours.frames, reference.frames)
        assert ours.fps == pytest.approx(reference.fps) and ours.metadata == reference.metadata
    warnings = [r for r in caplog.records if "decord is not installed" in r.getMessage()]
    assert len(warnings) == 1 and "renorm[video]" in warnings[0].getMessage()


def test_decord_is_an_extra_not_a_requirement() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())["project"]
    assert not any(dep.replace(" ", "").startswith("decord") for dep in project["dependencies"])
    assert any(dep.startswith("av") for dep in project["dependencies"])
    assert any(dep.startswith("decord") for dep in project["optional-dependencies"]["video"])
