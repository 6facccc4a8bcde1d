"""Image rewards: CLIP score oracle with a tiny open_clip model, JPEG compressibility, aesthetic head, mixture."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import RewardModel, RewardOutput
from rewards.image.aesthetic import AestheticHead, AestheticScore
from rewards.image.aesthetic import tiny as aesthetic_tiny
from rewards.image.clip import (
    CLIP_MEAN,
    CLIP_STD,
    ClipScore,
    build_tiny_open_clip,
    clip_preprocess,
    tiny,
    to_image_tensor,
)
from rewards.image.hps import HPSv2Score
from rewards.image.hps import tiny as hps_tiny
from rewards.image.jpeg import JpegCompressibility, jpeg_size_kb
from rewards.image.mixture import RewardMixture
from rewards.image.pickscore import tiny as pickscore_tiny


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


def noisy_image(noise: float, size: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.full((size, size, 3), 128.0)
    return Image.fromarray(np.clip(base + noise * rng.standard_normal((size, size, 3)), 0, 255).astype(np.uint8))


def test_jpeg_compressibility_falls_with_noise() -> None:
    images = [noisy_image(level) for level in (0.0, 10.0, 40.0, 100.0)]
    out = JpegCompressibility(quality=95)(["x"] * 4, images)
    assert out.scores.tolist() == sorted(out.scores.tolist(), reverse=True)  # more noise, bigger file, lower score
    assert float(out.scores[0]) == pytest.approx(-jpeg_size_kb(images[0], 95), abs=1e-6)
    flipped = JpegCompressibility(mode="incompressibility")(["x"] * 4, images).scores
    assert torch.allclose(flipped, -out.scores)
    tensor_scores = JpegCompressibility()(["x"] * 4, to_image_tensor(images)).scores
    assert torch.allclose(tensor_scores, out.scores)
    with pytest.raises(ValueError, match="mode"):
        JpegCompressibility(mode="size")  # type: ignore[arg-type]


def test_aesthetic_linear_head_matches_hand_computation() -> None:
    reward = aesthetic_tiny(seed=0, head="linear")
    images = random_images(3, seed=5)
    out = reward(["ignored"] * 3, images)
    embeds = reward.clip.embed_images(images)
    embeds = embeds / embeds.norm(dim=-1, keepdim=True)
    layer = reward.head.layers[0]
    expected = embeds @ layer.weight.detach()[0] + layer.bias.detach()[0]
    assert torch.allclose(out.scores, expected, atol=1e-5)


def test_aesthetic_mlp_head_loads_laion_layout(tmp_path: Path) -> None:
    head = AestheticHead(32, "mlp")
    for p in head.parameters():
        torch.nn.init.constant_(p, 0.01)
    path = tmp_path / "head.pth"
    torch.save({"state_dict": head.state_dict()}, path)
    reward = AestheticScore(clip=ClipScore.from_model(build_tiny_open_clip()), head="mlp", weights=str(path))
    assert sorted(reward.head.state_dict()) == sorted(head.state_dict())
    assert torch.equal(reward.head.layers[0].weight, head.layers[0].weight)
    out = reward(["a", "b"], random_images(2))
    # Unit-norm inputs through constant linear layers without activations: a fixed, input-independent-ish value.
    assert out.scores.shape == (2,) and bool(torch.isfinite(out.scores).all())


def test_hps_is_cosine_and_loads_a_checkpoint(tmp_path: Path) -> None:
    backbone = build_tiny_open_clip(seed=4)
    path = tmp_path / "hps.pt"
    torch.save({"state_dict": backbone.state_dict()}, path)
    reward = HPSv2Score(checkpoint=str(path), model=build_tiny_open_clip(seed=9))
    images, captions = random_images(2), ["a", "b"]
    assert torch.allclose(reward(captions, images).scores, ClipScore.from_model(backbone)(captions, images).scores)
    assert float(hps_tiny()(captions, images).scores.abs().max()) <= 1.0


def test_pickscore_is_scaled_cosine() -> None:
    import open_clip

    reward = pickscore_tiny(seed=0, divisor=26.0)
    images, captions = random_images(2), ["a cat", "a dog"]
    out = reward(captions, images)
    model = reward.model
    pixels = clip_preprocess(to_image_tensor(images), 32)
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=16)(captions)
    with torch.no_grad():
        a = model.get_image_features(pixel_values=pixels).pooler_output
        b = model.get_text_features(input_ids=tokens).pooler_output
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert torch.allclose(out.scores, cos * model.logit_scale.exp().detach() / 26.0, atol=1e-5)


class ConstantReward:
    def __init__(self, values: list[float]) -> None:
        self.values = values

    def __call__(self, prompts: list[str], samples: list[object], **metadata: object) -> RewardOutput:
        return RewardOutput(scores=torch.tensor(self.values), metrics={"mean": sum(self.values)})


def test_mixture_is_weighted_sum_with_nan_policy() -> None:
    parts = {"a": ConstantReward([1.0, 2.0, math.nan]), "b": ConstantReward([0.5, math.nan, math.nan])}
    out = RewardMixture(parts, {"a": 2.0, "b": -1.0}, nan_policy="skip")(["p"] * 3, [0, 1, 2])
    assert out.scores[:2].tolist() == [1.5, 4.0] and math.isnan(float(out.scores[2]))
    assert out.metrics["mixture/nan_parts"] == 3.0 and out.metrics["b/mean"] == pytest.approx(math.nan, nan_ok=True)
    assert set(out.components) == {"a", "b"}
    propagated = RewardMixture(parts, {"a": 2.0, "b": -1.0})(["p"] * 3, [0, 1, 2]).scores
    assert propagated[0] == 1.5 and math.isnan(float(propagated[1]))
    with pytest.raises(ValueError, match="weights"):
        RewardMixture(parts, {"a": 1.0})
    with pytest.raises(ValueError, match="nan_policy"):
        RewardMixture(parts, nan_policy="zero")  # type: ignore[arg-type]


def test_clip_score_runs_a_bf16_model_and_checks_precision() -> None:
    reward = ClipScore.from_model(build_tiny_open_clip(seed=0).to(torch.bfloat16))
    out = reward(["a cat", "a dog"], random_images(2))
    reference = tiny(seed=0)(["a cat", "a dog"], random_images(2))
    assert out.scores.dtype == torch.float32 and torch.allclose(out.scores, reference.scores, atol=0.05)
    with pytest.raises(ValueError, match="precision"):
        ClipScore.from_model(build_tiny_open_clip(), precision="int8")  # type: ignore[arg-type]


def test_image_files_of_different_sizes_are_scored(tmp_path: Path) -> None:
    images = [random_images(1, size=32, seed=1)[0], random_images(1, size=64, seed=2)[0].resize((64, 40))]
    paths = []
    for k, image in enumerate(images):
        paths.append(str(tmp_path / f"{k}.png"))
        image.save(paths[-1])
    reward = tiny(seed=0)
    from_files = reward(["a", "b"], paths).scores
    one_by_one = torch.cat([reward([c], [im]).scores for c, im in zip(["a", "b"], images, strict=True)])
    assert torch.allclose(from_files, one_by_one, atol=1e-6)
    assert pickscore_tiny()(["a", "b"], paths).scores.shape == (2,)
    assert JpegCompressibility()(["a", "b"], paths).scores.shape == (2,)
