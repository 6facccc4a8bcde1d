"""Video pipeline: decord reads an mp4 the test writes, parity with qwen-vl-utils 0.0.14 (both paths), M8 two-pass
sizing, region box drawn before resizing (and the official order), corrupt/missing video → counted skip, the cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from modalities.medical_video.policy import VideoVLMPolicy
from modalities.medical_video.sampler import VideoSampler
from modalities.medical_video.synthetic import render_frames, write_mp4
from modalities.medical_video.tiny import build_tiny_processor, build_tiny_qwen2_5_vl
from modalities.medical_video.video import (
    RegionBox,
    VideoCache,
    VideoConfig,
    VideoError,
    draw_region_box,
    num_video_tokens,
    read_frame_list,
    read_video_file,
    resized_shape,
    size_frames,
    smart_resize,
)

MEDGRPO = VideoConfig()  # max 48·28·28 = 37 632, min 8·28·28 = 6 272 (spec §3)
TINY = VideoConfig(fps=1.0, min_pixels=3136, max_pixels=3136)


def noise_frames(count: int, height: int, width: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def moving_box_mp4(path: Path, num_frames: int = 16, fps: float = 4.0) -> Path:
    boxes = [[4 * t, 8, 4 * t + 16, 24] for t in range(num_frames)]
    write_mp4(path, render_frames(boxes, 64, (0, 200, 0)), fps)
    return path


def test_m8_two_pass_sizing() -> None:
    """M8: 1920×1080 and 854×480 → 112×224 (factor 56, then 28); a single factor-28 pass gives 140×252."""
    assert resized_shape(1080, 1920, 2, MEDGRPO, two_pass=True) == (112, 224)
    assert resized_shape(480, 854, 2, MEDGRPO, two_pass=True) == (112, 224)
    assert resized_shape(1080, 1920, 2, MEDGRPO, two_pass=False) == (140, 252)
    assert num_video_tokens(2, 112, 224) == 32 and num_video_tokens(2, 140, 252) == 45
    video = read_frame_list(noise_frames(2, 1080, 1920), MEDGRPO, fps=0.5)
    assert tuple(video.frames.shape) == (2, 3, 112, 224)


def test_frame_list_matches_qwen_vl_utils() -> None:
    from qwen_vl_utils import vision_process

    frames = noise_frames(3, 480, 854, seed=1)
    ours = read_frame_list(frames, MEDGRPO, fps=0.5)
    element = {"video": frames, "sample_fps": 0.5, "min_pixels": MEDGRPO.min_pixels, "max_pixels": MEDGRPO.max_pixels}
    reference, fps = vision_process.fetch_video(element, image_patch_size=14, return_video_sample_fps=True)
    assert ours.frames.shape[0] == 4, "3 frames round up to an even 4 (last frame repeated)"
    assert torch.equal(ours.frames, reference) and ours.fps == fps == 0.5


def test_decord_reads_written_mp4_like_qwen_vl_utils(tmp_path: Path) -> None:
    import decord
    from qwen_vl_utils import vision_process

    path = moving_box_mp4(tmp_path / "clip.mp4")
    assert len(decord.VideoReader(str(path))) == 16
    config = VideoConfig(fps=2.0, min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28)
    ours = read_video_file(path, config)
    vision_process.FORCE_QWENVL_VIDEO_READER = "decord"
    vision_process.get_video_reader_backend.cache_clear()
    element = {"video": f"file://{path}", "fps": 2.0, "min_pixels": config.min_pixels, "max_pixels": config.max_pixels}
    reference, fps = vision_process.fetch_video(element, return_video_sample_fps=True)
    assert tuple(ours.frames.shape) == (8, 3, 56, 56) and ours.fps == pytest.approx(fps) == 2.0
    assert torch.equal(ours.frames, reference)
    via_av = read_video_file(path, VideoConfig(fps=2.0, min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28, reader="av"))
    assert torch.equal(via_av.frames, ours.frames)


def test_region_box_drawn_before_resize_and_official_order() -> None:
    frame = Image.new("RGB", (1920, 1080), (40, 40, 40))
    box = RegionBox(frame=1, box=(400.0, 200.0, 1200.0, 800.0))
    ours = size_frames([frame, frame], MEDGRPO, two_pass=True, box=box)
    expected = size_frames([frame, draw_region_box(frame, box.box, (0, 255, 0), 8)], MEDGRPO, two_pass=True)
    assert torch.equal(ours, expected) and not torch.equal(ours[0], ours[1])
    # the box lands where it should in the 112×224 frame: its left edge at x = 400·224/1920 ≈ 46.7
    green = ours[1, 1] - ours[1, 0]
    assert green[30:70, 44:50].mean() > 20 and green[30:70, 60:100].abs().mean() < 1
    official = size_frames([frame, frame], VideoConfig(official_compat=True), two_pass=True, box=box)
    assert not torch.equal(official, ours), "official order draws original coordinates on the resized frame"
    assert (official[1, 1] - official[1, 0])[:, 40:50].abs().max() < 1, "no edge near x≈47 in the official order"


def test_portrait_frames_rotated_before_drawing() -> None:
    frames = noise_frames(2, 200, 100)
    out = size_frames(frames, TINY, two_pass=True, box=RegionBox(0, (10.0, 10.0, 50.0, 50.0)))
    assert out.shape[-1] >= out.shape[-2], "portrait frames become landscape"


@given(st.integers(28, 4000), st.integers(28, 4000), st.sampled_from([28, 56]), st.sampled_from([3136, 6272]))
def test_smart_resize_matches_qwen_vl_utils(height: int, width: int, factor: int, min_pixels: int) -> None:
    """Same (h, w) as qwen-vl-utils 0.0.14 wherever it gives a non-degenerate size; multiples of `factor`;
    inside the pixel budget for ordinary aspect ratios (extreme ones are clamped to one factor, as upstream)."""
    from qwen_vl_utils.vision_process import smart_resize as upstream

    ours = smart_resize(height, width, factor, min_pixels, 37632)
    theirs = upstream(height, width, factor, min_pixels, 37632)
    if min(theirs) >= factor:
        assert ours == theirs
    assert ours[0] % factor == 0 and ours[1] % factor == 0
    if max(height, width) / min(height, width) <= 4:
        assert min_pixels <= ours[0] * ours[1] <= 37632


def test_cache_lru_and_hits() -> None:
    cache: VideoCache[int] = VideoCache(max_size=2)
    assert cache.get("a", lambda: 1) == 1 and cache.get("a", lambda: 2) == 1
    cache.get("b", lambda: 3)
    cache.get("c", lambda: 4)
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 2)
    assert cache.get("a", lambda: 5) == 5, "the least recently used entry was evicted"


def _policy() -> VideoVLMPolicy:
    return VideoVLMPolicy(build_tiny_qwen2_5_vl(seed=0), build_tiny_processor())


def test_corrupt_and_missing_videos_are_counted_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = moving_box_mp4(tmp_path / "good.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 4)
    prompts = [
        {"prompt": "where?", "video": str(tmp_path / "missing.mp4"), "id": "missing"},
        {"prompt": "where?", "video": str(good), "id": "good", "task": "stg", "dataset": "d"},
        {"prompt": "where?", "video": str(corrupt), "id": "corrupt"},
        {"prompt": "where?", "video": [str(tmp_path / "no_frame.png")], "fps": 1.0, "id": "frames"},
    ]
    sampler = VideoSampler(video=VideoConfig(fps=2.0, min_pixels=3136, max_pixels=3136), max_new_tokens=4)
    with caplog.at_level(logging.WARNING):
        rollout = sampler.sample(_policy(), prompts, 2, torch.Generator().manual_seed(0))
    assert len(rollout) == 2 and rollout.prompt_keys == ["good", "good"]
    assert rollout.metrics["video/skipped_prompts"] == 3 and sampler.skipped_total == 3
    assert sum("skipping prompt" in r.getMessage() for r in caplog.records) == 3
    with pytest.raises(VideoError, match="none of the 1 prompts"):
        sampler.sample(_policy(), prompts[:1], 2, torch.Generator().manual_seed(0))


def test_sampler_decodes_each_video_once_and_sets_mrope_time(tmp_path: Path) -> None:
    frames = []
    for t, image in enumerate(noise_frames(3, 64, 64)):
        image.save(tmp_path / f"{t}.png")
        frames.append(str(tmp_path / f"{t}.png"))
    prompt = {"prompt": "what?", "video": frames, "fps": 0.5, "id": "p"}
    sampler = VideoSampler(video=TINY, max_new_tokens=3)
    policy = _policy()
    first = sampler.sample(policy, [prompt], 4, torch.Generator().manual_seed(0))
    assert (first.metrics["video/cache_misses"], first.metrics["video/cache_hits"]) == (1, 0)
    second = sampler.sample(policy, [prompt], 4, torch.Generator().manual_seed(1))
    assert (second.metrics["video/cache_misses"], second.metrics["video/cache_hits"]) == (0, 1)
    videos = first.data["videos"]
    assert len(videos) == 4 and all(v is videos[0] for v in videos), "the G rows share one processed video"
    assert videos[0].second_per_grid_ts == pytest.approx(2 / 0.5), "temporal patch 2 / sample fps 0.5"
    assert tuple(videos[0].video_grid_thw.tolist()[0]) == (2, 4, 4) and videos[0].num_tokens == 8
