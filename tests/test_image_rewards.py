"""Image rewards: CLIP score oracle with a tiny open_clip model, JPEG compressibility, aesthetic head, mixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import RewardModel
from rewards.image.clip import (
    CLIP_MEAN,
    CLIP_STD,
    ClipScore,
    build_tiny_open_clip,
    clip_preprocess,
    tiny,
    to_image_tensor,
)


def random_images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_score_matches_hand_computed_cosine() -> None:
    import open_clip

    model = build_tiny_open_clip(seed=0)
    reward = ClipScore.from_model(model)
    assert isinstance(reward, RewardModel)
    images = random_images(3)
    captions = ["a red cat", "a blue dog", "two green birds"]
    out = reward(captions, images)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    expected = []
    for caption, image in zip(captions, images, strict=True):
        pixels = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255.0
        pixels = (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
        with torch.no_grad():
            a = model.encode_image(pixels[None])[0]
            b = model.encode_text(tokenizer([caption]))[0]
        expected.append(float(a @ b / (a.norm() * b.norm())))
    assert out.scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(out.components["clip"], out.scores)
    assert not torch.is_grad_enabled() or all(p.grad is None for p in model.parameters())


def test_clip_score_accepts_tensors_and_batches_consistently() -> None:
    reward = tiny(seed=1)
    images = random_images(5, size=48, seed=3)
    captions = [f"caption {k}" for k in range(5)]
    batch = to_image_tensor(images)
    assert batch.shape == (5, 3, 48, 48) and float(batch.max()) <= 1.0
    whole = reward(captions, batch).scores
    reward.batch_size = 2
    chunked = reward([{"prompt": c} for c in captions], images).scores
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert reward([], []).scores.shape == (0,)


def test_clip_preprocess_resizes_short_side_and_center_crops() -> None:
    images = torch.rand(2, 3, 40, 64)
    out = clip_preprocess(images, 32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert out.shape == (2, 3, 32, 32)
    same = torch.rand(1, 3, 32, 32)
    assert torch.allclose(clip_preprocess(same, 32, (0.5,) * 3, (0.5,) * 3), (same - 0.5) / 0.5)


def test_bad_image_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="N, 3, H, W"):
        to_image_tensor(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        to_image_tensor(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="prompts"):
        tiny()(["a"], [])
