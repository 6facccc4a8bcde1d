"""Video input pipeline for Qwen2.5-VL policies: frames → (box) → qwen-vl-utils sizing → tensor, LRU-cached.

Two sources (spec docs/methods/medgrpo.md §3): a list of pre-extracted frame paths with the sample's own fps
(MedVidBench), or a
video file read with decord (or PyAV) at `VideoConfig.fps`. Frame counts are rounded up to an even number by repeating
the last frame. Sizing follows qwen-vl-utils 0.0.14: frame lists are resized twice (factor 56 per frame, then factor 28
for the stacked video, "two_pass"), files once (factor 28); both are selectable. The region-caption box is drawn before
resizing by default; `official_compat` draws it after the first resize with original-frame coordinates, as the released
inference code does. Every failure to read a video is a `VideoError`, which the sampler turns into a counted skip.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, get_args

import torch
from PIL import Image, ImageDraw
from torch import Tensor

ResizeMode = Literal["auto", "two_pass", "single_pass"]
Reader = Literal["decord", "av"]
PATCH_FACTOR = 28  # patch 14 x spatial merge 2
FRAME_FACTOR = 2  # temporal patch
VIDEO_MAX_PIXELS_CAP = 768 * 28 * 28  # qwen-vl-utils VIDEO_MAX_TOKEN_NUM * 28^2
DEFAULT_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # qwen-vl-utils default (MODEL_SEQ_LEN 128000)
MAX_ASPECT_RATIO = 200
_T = TypeVar("_T")
log = logging.getLogger(__name__)


class VideoError(RuntimeError):
    """A video (file or frame list) could not be read or processed; names the source and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot read video {source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass
class VideoConfig:
    """How videos are read and sized (config settings, not code edits; spec §3).

    Args:
        fps: sampling fps for video files; the fps of a frame list when its record gives none.
        min_frames, max_frames: frame-count bounds for files (qwen-vl-utils 4 / 768); `max_frames` also caps a frame
            list (uniform subsampling, fps scaled to match) when set; None = no cap on lists (the released code).
        min_pixels, max_pixels: per-frame pixel budget (MedGRPO: 8·28·28 and 48·28·28).
        total_pixels: the whole video's pixel budget (None = qwen-vl-utils' default for a 128k context).
        resize: "two_pass" (factor 56 then 28, qwen-vl-utils 0.0.14's frame-list path), "single_pass" (factor 28,
            its file path), or "auto" (two_pass for frame lists, single_pass for files: parity in both cases).
        reader: decoder for video files: "decord" (PyAV when decord, the `video` extra, is not installed) or "av".
        box_color, box_width: the region-caption rectangle (green, width 8).
        official_compat: draw the box after the first resize with original-frame coordinates (released code).
        cache_size: processed videos kept in the per-sample LRU cache (0 disables it).
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int | None = None
    min_pixels: int = 8 * 28 * 28
    max_pixels: int = 48 * 28 * 28
    total_pixels: int | None = None
    resize: ResizeMode = "auto"
    reader: Reader = "decord"
    box_color: tuple[int, int, int] = (0, 255, 0)
    box_width: int = 8
    official_compat: bool = False
    cache_size: int = 64

    def __post_init__(self) -> None:
        for name, value, allowed in (("resize", self.resize, ResizeMode), ("reader", self.reader, Reader)):
            if value not in get_args(allowed):
                raise ValueError(f"{name}={value!r} is not one of {list(get_args(allowed))}")
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.min_pixels < 1 or self.max_pixels < self.min_pixels:
            raise ValueError(f"need 1 <= min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.max_frames is not None and self.max_frames < FRAME_FACTOR:
            raise ValueError(f"max_frames must be >= {FRAME_FACTOR} or None, got {self.max_frames}")
        if self.cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {self.cache_size}")
        self.box_color = tuple(int(c) for c in self.box_color)  # type: ignore[assignment]

    def key(self) -> tuple[Any, ...]:
        """Everything that changes the processed tensor (part of the cache key)."""
        return (
            self.fps,
            self.min_frames,
            self.max_frames,
            self.min_pixels,
            self.max_pixels,
            self.total_pixels,
            self.resize,
            self.reader,
            self.box_color,
            self.box_width,
            self.official_compat,
        )


@dataclass(frozen=True)
class RegionBox:
    """A region-caption box: [x1, y1, x2, y2] in original-frame pixels on frame `frame` of the clip (RC_info)."""

    frame: int
    box: tuple[float, float, float, float]


@dataclass
class ProcessedVideo:
    """A sized video: frames [F, 3, H, W] float32 in 0..255 (F even, H and W multiples of 28) and its fps."""

    frames: Tensor
    fps: float
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- sizing (pure functions)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) multiples of `factor`, aspect ratio kept, h·w within [min_pixels, max_pixels] (qwen-vl-utils rule).

    Rounds each side to the nearest multiple; if the area is too large, scales by sqrt(area / max) and floors;
    if too small, scales by sqrt(min / area) and ceils.
    """
    if min(height, width) < 1 or max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"frame {height}x{width}: aspect ratio must be below {MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def video_max_pixels(config: VideoConfig, num_frames: int) -> int:
    """The per-frame cap of the video pass: min(max_pixels, 768·28², total/F·2), at least 1.05·min_pixels."""
    total = config.total_pixels if config.total_pixels is not None else DEFAULT_TOTAL_PIXELS
    cap = max(min(VIDEO_MAX_PIXELS_CAP, total / num_frames * FRAME_FACTOR), int(config.min_pixels * 1.05))
    return int(min(config.max_pixels, cap))


def resized_shape(height: int, width: int, num_frames: int, config: VideoConfig, two_pass: bool) -> tuple[int, int]:
    """Final (h, w) of a `height`×`width` frame (spec M8: 1920×1080 → 112×224 two-pass, 140×252 single-pass)."""
    if two_pass:
        height, width = smart_resize(height, width, 2 * PATCH_FACTOR, config.min_pixels, config.max_pixels)
    return smart_resize(height, width, PATCH_FACTOR, config.min_pixels, video_max_pixels(config, num_frames))


def num_video_tokens(num_frames: int, height: int, width: int, merge_size: int = 2, patch_size: int = 14) -> int:
    """LLM tokens of a video: (F/2)·(H/28)·(W/28) for Qwen2.5-VL (patch 14, merge 2, temporal patch 2)."""
    unit = patch_size * merge_size
    return math.ceil(num_frames / FRAME_FACTOR) * (height // unit) * (width // unit)


def even_frame_count(frames: list[_T]) -> list[_T]:
    """Round the frame count up to a multiple of 2 by repeating the last frame."""
    missing = -len(frames) % FRAME_FACTOR
    return frames + [frames[-1]] * missing


def sample_frame_indices(total: int, source_fps: float, config: VideoConfig) -> list[int]:
    """Frame indices of a file sampled at `config.fps` (qwen-vl-utils `smart_nframes` + linspace rounding)."""
    lower = math.ceil(config.min_frames / FRAME_FACTOR) * FRAME_FACTOR
    upper_raw = config.max_frames if config.max_frames is not None else min(768, total)
    upper = math.floor(upper_raw / FRAME_FACTOR) * FRAME_FACTOR
    count = min(max(total / source_fps * config.fps, lower), upper, total)
    count = math.floor(count / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= count <= total:
        raise ValueError(f"cannot sample an even number of frames (>= 2) from {total} frames")
    return torch.linspace(0, total - 1, count).round().long().tolist()


# ---------------------------------------------------------------- drawing and resizing


def draw_region_box(frame: Image.Image, box: Sequence[float], color: tuple[int, int, int], width: int) -> Image.Image:
    """A copy of `frame` with the rectangle `box` = [x1, y1, x2, y2] drawn on it."""
    out = frame.copy()
    ImageDraw.Draw(out).rectangle([float(v) for v in box], outline=color, width=width)
    return out


def _first_pass(frames: list[Image.Image], config: VideoConfig) -> list[Image.Image]:
    width, height = frames[0].size
    h, w = smart_resize(height, width, 2 * PATCH_FACTOR, config.min_pixels, config.max_pixels)
    return [f.resize((w, h), resample=Image.Resampling.BICUBIC) for f in frames]


def _video_pass(frames: list[Image.Image], config: VideoConfig) -> Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    stacked = torch.stack([torch.from_numpy(_rgb_array(f)).permute(2, 0, 1) for f in frames])
    _, _, height, width = stacked.shape
    h, w = smart_resize(height, width, PATCH_FACTOR, config.min_pixels, video_max_pixels(config, len(frames)))
    resized: Tensor = tvf.resize(stacked, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return resized.float()


def _rgb_array(frame: Image.Image) -> Any:
    import numpy as np

    return np.asarray(frame.convert("RGB")).copy()


def size_frames(frames: list[Image.Image], config: VideoConfig, two_pass: bool, box: RegionBox | None = None) -> Tensor:
    """Draw the region box (if any), resize, stack: [F, 3, H, W] float32 (F already even)."""
    if box is not None:
        if not 0 <= box.frame < len(frames):
            raise ValueError(f"region box frame {box.frame} outside the clip's {len(frames)} frames")
        if frames[0].height > frames[0].width:  # portrait frames are rotated by 270 degrees first (spec §3)
            frames = [f.rotate(270, expand=True) for f in frames]
    draw_late = box is not None and config.official_compat
    if box is not None and not draw_late:
        frames = list(frames)
        frames[box.frame] = draw_region_box(frames[box.frame], box.box, config.box_color, config.box_width)
    if two_pass:
        frames = _first_pass(frames, config)
    if box is not None and draw_late:  # the released code's order: original-pixel coordinates on a resized frame
        frames = list(frames)
        frames[box.frame] = draw_region_box(frames[box.frame], box.box, config.box_color, config.box_width)
    return _video_pass(frames, config)


# ---------------------------------------------------------------- reading


def read_frame_list(
    frames: Sequence[str | Path | Image.Image],
    config: VideoConfig,
    fps: float | None = None,
    box: RegionBox | None = None,
) -> ProcessedVideo:
    """A pre-extracted frame list at its own `fps` (default `config.fps`) → ProcessedVideo.

    With `config.max_frames`, longer lists are subsampled uniformly and the fps scaled by the kept fraction.
    """
    if not frames:
        raise VideoError("<empty frame list>", "the frame list is empty")
    source = str(frames[0]) if not isinstance(frames[0], Image.Image) else "<in-memory frames>"
    sample_fps = float(fps) if fps is not None else config.fps
    if sample_fps <= 0:
        raise VideoError(source, f"fps must be > 0, got {sample_fps}")
    items = list(frames)
    if config.max_frames is not None and len(items) > config.max_frames:
        keep = torch.linspace(0, len(items) - 1, config.max_frames).round().long().tolist()
        sample_fps *= len(keep) / len(items)
        items = [items[i] for i in keep]
    try:
        images = [_open_frame(item) for item in items]
    except (OSError, ValueError) as error:
        raise VideoError(source, f"{type(error).__name__}: {error}") from error
    if len({im.size for im in images}) > 1:
        raise VideoError(source, f"frames differ in size: {sorted({im.size for im in images})}")
    two_pass = config.resize in ("auto", "two_pass")
    tensor = _sized(source, even_frame_count(images), config, two_pass, box)
    return ProcessedVideo(tensor, sample_fps, source, {"num_source_frames": len(frames)})


def read_video_file(path: str | Path, config: VideoConfig, box: RegionBox | None = None) -> ProcessedVideo:
    """A video file decoded with `config.reader`, sampled at `config.fps` → ProcessedVideo (its effective fps)."""
    source = str(path).removeprefix("file://")
    if not Path(source).is_file():
        raise VideoError(source, "file not found")
    try:
        images, source_fps, total = _decode(source, config)
    except VideoError:
        raise
    except Exception as error:  # decoders raise their own types (decord.DECORDError, av.error.*)
        raise VideoError(source, f"{type(error).__name__}: {error}") from error
    sample_fps = len(images) / max(total, 1e-6) * source_fps
    two_pass = config.resize == "two_pass"
    tensor = _sized(source, images, config, two_pass, box)
    return ProcessedVideo(tensor, sample_fps, source, {"source_fps": source_fps, "num_source_frames": total})


def load_video(
    video: str | Path | Sequence[str | Path | Image.Image],
    config: VideoConfig,
    fps: float | None = None,
    box: RegionBox | None = None,
) -> ProcessedVideo:
    """A record's `video` (file path, or list of frame paths / PIL frames) → ProcessedVideo; VideoError on failure."""
    if isinstance(video, (str, Path)):
        return read_video_file(video, config, box)
    return read_frame_list(list(video), config, fps, box)


def _open_frame(item: str | Path | Image.Image) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(str(item).removeprefix("file://")) as image:
        return image.convert("RGB")


def _sized(
    source: str, images: list[Image.Image], config: VideoConfig, two_pass: bool, box: RegionBox | None
) -> Tensor:
    try:
        return size_frames(images, config, two_pass, box)
    except ValueError as error:
        raise VideoError(source, str(error)) from error


def _decode(path: str, config: VideoConfig) -> tuple[list[Image.Image], float, int]:
    """(sampled frames, source fps, source frame count) with decord or PyAV.

    `reader="decord"` without decord installed (an optional extra: no wheels for aarch64 or Apple Silicon) reads
    with PyAV, which gives the same frames; a warning says so once.
    """
    decord = _import_decord() if config.reader == "decord" else None
    if decord is not None:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        total, source_fps = len(reader), float(reader.get_avg_fps())
        indices = sample_frame_indices(total, source_fps, config)
        array = reader.get_batch(indices).asnumpy()
        return [Image.fromarray(frame) for frame in array], source_fps, total
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        source_fps = float(stream.average_rate or config.fps)
        decoded = [frame.to_image() for frame in container.decode(stream)]
    if not decoded:
        raise VideoError(path, "no decodable frames")
    indices = sample_frame_indices(len(decoded), source_fps, config)
    return [decoded[i] for i in indices], source_fps, len(decoded)


_warned_no_decord = False


def _import_decord() -> Any:
    """The decord module, or None (with one warning) when it is not installed."""
    global _warned_no_decord
    try:
        import decord
    except ImportError:
        if not _warned_no_decord:
            _warned_no_decord = True
            log.warning("decord is not installed (pip install 'renorm[video]'); reading video files with PyAV")
        return None
    return decord


class VideoCache(Generic[_T]):
    """An LRU cache of processed videos (or their features), so the G rollouts of a prompt decode once.

    `get(key, build)` returns the cached value or builds, stores and returns it; `hits`/`misses` count calls.
    Failures are not cached (a missing file may appear later).
    """

    def __init__(self, max_size: int = 64) -> None:
        if max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {max_size}")
        self.max_size = max_size
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, _T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, build: Callable[[], _T]) -> _T:
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = build()
        if self.max_size > 0:
            self._items[key] = value
            while len(self._items) > self.max_size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()
