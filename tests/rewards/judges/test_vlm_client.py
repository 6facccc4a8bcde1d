"""Local VLM judge client: a tiny random Qwen2.5-VL answers image conversations; garbage becomes counted ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modalities.medical_video.tiny import build_tiny_processor, build_tiny_qwen2_5_vl
from rewards.judges.client import JudgeClient, image_data_url, image_part
from rewards.judges.pairwise import PairwisePreferenceJudge
from rewards.judges.vlm_client import HFVisionChatClient, decode_data_url, split_images


def picture(seed: int, size: int = 28) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def client() -> HFVisionChatClient:
    model = build_tiny_qwen2_5_vl(eos_logit=None, seed=0)
    return HFVisionChatClient(model, build_tiny_processor(), max_new_tokens=6, batch_size=2)


def ask(*images: Image.Image, text: str = "which is better?") -> list[dict[str, object]]:
    return [{"role": "user", "content": [*(image_part(im) for im in images), {"type": "text", "text": text}]}]


def test_generates_deterministic_text_for_image_conversations(client: HFVisionChatClient) -> None:
    assert isinstance(client, JudgeClient)
    batch = [ask(picture(0), picture(1)), ask(picture(2), text="a longer question for left padding"), ask(picture(3))]
    first = client.complete(batch)
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    assert client.complete(batch) == first
    alone = [client.complete([c])[0] for c in batch]
    assert alone == first  # batched greedy generation equals one by one (left padding is right)
    assert client.stats.requests == 9 and client.stats.failures == 0


def test_images_change_the_answer_path(client: HFVisionChatClient) -> None:
    messages, images = split_images(ask(picture(0), picture(1)))
    assert messages[0]["content"][0] == {"type": "image"} and len(images) == 2
    _, other = split_images(ask(picture(5), picture(6)))
    text = [client.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
    inputs = client.processor(text=text, images=images, return_tensors="pt")
    inputs_b = client.processor(text=text, images=other, return_tensors="pt")
    assert int((inputs["input_ids"] == 7).sum()) > 0 and inputs["pixel_values"].shape[0] > 0  # image pad tokens
    with torch.no_grad():
        logits_a = client.model(**inputs).logits[0, -1]
        logits_b = client.model(**inputs_b).logits[0, -1]
    assert not torch.allclose(logits_a, logits_b)


def test_data_urls_are_decoded_and_remote_urls_refused() -> None:
    image = picture(7)
    url = image_data_url(image)
    assert np.array_equal(np.asarray(decode_data_url(url)), np.asarray(image))
    conversation = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "q"}]}
    ]
    messages, images = split_images(conversation)
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "q"}] and len(images) == 1
    with pytest.raises(ValueError, match="data URLs"):
        split_images([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}])
    with pytest.raises(ValueError, match="unsupported"):
        split_images([{"role": "user", "content": [{"type": "audio"}]}])


def test_garbage_from_tiny_vlm_is_a_counted_tie(client: HFVisionChatClient) -> None:
    judge = PairwisePreferenceJudge(client)
    matrix = judge.judge_group("a cat", [picture(k) for k in range(3)])
    assert judge.last_metrics["judge/pairs"] == 3.0 and judge.last_metrics["judge/failures"] == 0.0
    assert judge.last_metrics["judge/ties"] == 3.0  # random weights never say "Image 1 is better"
    assert matrix[0, 1] == 0.5 and matrix[0, 2] == 0.5 and matrix[1, 2] == 0.5


def test_needs_processor_with_template() -> None:
    model = build_tiny_qwen2_5_vl()
    with pytest.raises(ValueError, match="processor"):
        HFVisionChatClient(model)
