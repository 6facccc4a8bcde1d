"""The serialisable multimodal form (`toolkit.engines.multimodal`): it batches as the sampler's callable does (rows'
tensors concatenated, token types left-padded like the ids), round-trips through its wire form with each distinct
tensor sent once, splits into byte-bounded chunks of whole prompts, and refuses malformed payloads naming the field."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import torch
from torch import Tensor

from toolkit.engines import GenerationRequest, SamplingParams
from toolkit.engines.multimodal import (
    MultimodalInputs,
    MultimodalTooLarge,
    decode_multimodal,
    encode_multimodal,
    prompt_chunks,
)

PARAMS = SamplingParams(max_new_tokens=2, pad_token_id=0)


def video(frames: int, seed: int) -> dict[str, Tensor]:
    """A fake Qwen-VL video: `frames`·4 patches of 6 values on a (frames, 2, 2) grid."""
    patches = torch.randn(frames * 4, 6, generator=torch.Generator().manual_seed(seed))
    return {"pixel_values_videos": patches, "video_grid_thw": torch.tensor([[frames, 2, 2]])}


def inputs_for(prompts: list[list[int]], videos: list[dict[str, Tensor]]) -> MultimodalInputs:
    per_prompt = [
        {**v, "second_per_grid_ts": torch.tensor([2.0]), "mm_token_type_ids": (torch.tensor(ids) == 6).long() * 2}
        for ids, v in zip(prompts, videos, strict=True)
    ]
    batching: dict[str, Any] = {key: "concat" for key in per_prompt[0]}
    batching["mm_token_type_ids"] = "left_pad"
    return MultimodalInputs(tuple(per_prompt), batching)


PROMPTS = [[1, 6, 6, 2], [3, 6, 6, 6, 6, 2, 9], [1, 6, 6, 2]]


@pytest.fixture()
def shared() -> MultimodalInputs:
    """Three prompts; the last two share one video tensor (two questions on one video)."""
    second = video(2, 1)
    return inputs_for(PROMPTS, [video(1, 0), second, second])


def test_the_callable_concatenates_rows_and_left_pads_token_types(shared: MultimodalInputs) -> None:
    request = GenerationRequest(PROMPTS, PARAMS, 2, model_inputs=shared.model_inputs(2), multimodal=shared)
    ids = torch.zeros(3, 7, dtype=torch.long)  # rows 2..4 (prompts 1, 1, 2) padded to the widest prompt
    assert request.model_inputs is not None
    out = request.model_inputs(slice(2, 5), ids)
    prompts = [shared.prompts[p] for p in (1, 1, 2)]
    assert torch.equal(out["pixel_values_videos"], torch.cat([p["pixel_values_videos"] for p in prompts]))
    assert torch.equal(out["video_grid_thw"], torch.tensor([[2, 2, 2], [2, 2, 2], [2, 2, 2]]))
    assert torch.equal(out["second_per_grid_ts"], torch.tensor([2.0, 2.0, 2.0]))
    expected = torch.tensor([[0, 2, 2, 2, 2, 0, 0], [0, 2, 2, 2, 2, 0, 0], [0, 0, 0, 0, 2, 2, 0]])
    assert torch.equal(out["mm_token_type_ids"], expected)


def test_the_wire_form_round_trips_and_sends_a_shared_video_once(shared: MultimodalInputs) -> None:
    wire = json.loads(json.dumps(encode_multimodal(shared)))  # through JSON, as on the wire
    raw = base64.b64decode(wire["tensors"])
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    names = {key for key in header if key != "__metadata__"}
    assert len(names) == 2 + 2 + 3 + 3  # 2 videos (patches, grid), 3 seconds and 3 token-type tensors
    assert wire["prompts"][1]["pixel_values_videos"] == wire["prompts"][2]["pixel_values_videos"]
    decoded = decode_multimodal(wire, max_bytes=shared.num_bytes + 1024)  # + the safetensors header
    assert decoded.batching == shared.batching
    for got, sent in zip(decoded.prompts, shared.prompts, strict=True):
        assert all(torch.equal(got[k], sent[k]) and got[k].dtype == sent[k].dtype for k in sent)
    with pytest.raises(MultimodalTooLarge, match="over max_multimodal_bytes=100"):
        decode_multimodal(wire, max_bytes=100)


def test_chunks_are_whole_prompts_within_the_byte_budget(shared: MultimodalInputs) -> None:
    sizes = [sum(t.numel() * t.element_size() for t in p.values()) for p in shared.prompts]
    own = sum(shared.prompts[2][k].numel() * shared.prompts[2][k].element_size() for k in ("second_per_grid_ts",))
    own += shared.prompts[2]["mm_token_type_ids"].numel() * 8  # what prompt 2 adds next to prompt 1's video
    assert prompt_chunks(shared, 10**9) == [range(0, 3)]
    assert prompt_chunks(shared, sizes[1] + own) == [range(0, 1), range(1, 3)]  # the shared video counts once
    assert prompt_chunks(shared, 1) == [range(0, 1), range(1, 2), range(2, 3)]  # each alone, even over the budget
    assert [len(p) for p in shared.select(range(1, 3)).prompts] == [4, 4]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, b: p[1].pop("second_per_grid_ts"), r"prompts\[1\] has keys .*expected"),
        (lambda p, b: b.update(video_grid_thw="stack"), r"batching .*not one of \['concat', 'left_pad'\]"),
        (lambda p, b: p[0].update(mm_token_type_ids=torch.zeros(1, 4)), r"prompts\[0\]\.mm_token_type_ids is left_pad"),
        (lambda p, b: p[1].update(pixel_values_videos=torch.zeros(8, 5)), r"prompts\[1\]\.pixel_values_videos is"),
        (lambda p, b: p[0].update(second_per_grid_ts=torch.zeros(1, dtype=torch.float64)), "dtype torch.float64"),
    ],
)
def test_malformed_inputs_name_the_prompt_and_key(shared: MultimodalInputs, change: Any, message: str) -> None:
    prompts, batching = [dict(p) for p in shared.prompts], dict(shared.batching)
    change(prompts, batching)
    with pytest.raises(ValueError, match=message):
        MultimodalInputs(tuple(prompts), batching)


def test_requests_check_their_inputs_against_the_prompts(shared: MultimodalInputs) -> None:
    with pytest.raises(ValueError, match=r"prompts\[1\]\.mm_token_type_ids has 7 entries for a prompt of 6 tokens"):
        GenerationRequest([PROMPTS[0], PROMPTS[1][:-1], PROMPTS[2]], PARAMS, model_inputs=print, multimodal=shared)
    with pytest.raises(ValueError, match="for 3 prompts, but the request has 2"):
        GenerationRequest(PROMPTS[:2], PARAMS, model_inputs=print, multimodal=shared)
    with pytest.raises(ValueError, match="needs `model_inputs` too"):
        GenerationRequest(PROMPTS, PARAMS, multimodal=shared)


def wire_with(shared: MultimodalInputs, **changes: Any) -> dict[str, Any]:
    wire = encode_multimodal(shared)
    wire.update(changes)
    return wire


def test_malformed_payloads_name_the_field(shared: MultimodalInputs) -> None:
    from safetensors.torch import save

    def blob(tensors: dict[str, Tensor]) -> str:
        return base64.b64encode(save(tensors)).decode()

    wire = encode_multimodal(shared)
    names = wire["prompts"][1]
    forged = {name: shared.prompts[1][key] for key, name in names.items()}
    forged[names["video_grid_thw"]] = torch.tensor([[2, 4, 4]])
    cases = [
        (wire_with(shared, format=2), r"renorm_multimodal\.format must be 1"),
        (wire_with(shared, tensors="not base64!"), r"renorm_multimodal\.tensors is not base64"),
        (wire_with(shared, tensors=base64.b64encode(b"junk").decode()), r"renorm_multimodal\.tensors is not safetens"),
        (wire_with(shared, tensors=blob({"t0": torch.zeros(2, dtype=torch.complex64)})), r"tensors\['t0'\] has dtype"),
        (wire_with(shared, prompts=[{"pixel_values_videos": "t99"}]), r"renorm_multimodal\.prompts\[0\] must map keys"),
        (wire_with(shared, prompts=wire["prompts"][:1]), r"renorm_multimodal\.tensors has tensors no prompt names"),
        (wire_with(shared, batching=["concat"]), r"renorm_multimodal\.batching must map"),
        (
            wire_with(shared, prompts=[names], tensors=blob(forged)),
            r"renorm_multimodal\.prompts\[0\]\.video_grid_thw describes 32 patches but pixel_values_videos has 8",
        ),
    ]
    for payload, message in cases:
        with pytest.raises(ValueError, match=message):
            decode_multimodal(payload, max_bytes=10**6)
