"""Update-selective merging: docs/methods/dler.md D6, tie rules, global scope, properties and a sharded safetensors
round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from modalities.text_agent.policy import CausalLMPolicy
from modalities.text_agent.tiny import build_char_tokenizer, build_tiny_qwen2
from toolkit.io.checkpoint import CheckpointManager, CheckpointState
from toolkit.io.export import is_export_folder, load_export
from toolkit.io.merging import CHECKPOINT_BOOKKEEPING, kth_largest, merge_checkpoints, num_kept, update_selective_merge

ATOL = 1e-5


def test_d6_per_tensor_merge() -> None:
    base = {"w": torch.ones(8)}
    tuned = {"w": torch.tensor([1.5, 0.9, 1.05, 0.2, 1.2, 1.0, 1.3, 0.98])}
    out = update_selective_merge(base, tuned, density=0.25, scale=0.7, scope="tensor", ties="keep_all")
    torch.testing.assert_close(out["w"], torch.tensor([1.35, 1, 1, 0.44, 1, 1, 1, 1]), atol=ATOL, rtol=0)


def test_ties_keep_all_versus_exact() -> None:
    base = {"w": torch.zeros(6)}
    tuned = {"w": torch.tensor([3.0, -2.0, 2.0, 2.0, 1.0, 0.0])}
    keep_all = update_selective_merge(base, tuned, density=0.34, scale=1.0, ties="keep_all")["w"]  # k = 2
    assert keep_all.tolist() == [3.0, -2.0, 2.0, 2.0, 0.0, 0.0]  # ">=" keeps the three |Δ| = 2 ties
    exact = update_selective_merge(base, tuned, density=0.34, scale=1.0, ties="exact")["w"]
    assert exact.tolist() == [3.0, -2.0, 0.0, 0.0, 0.0, 0.0]  # first tie in flattened order
    assert num_kept(100, 0.29) == 29 and num_kept(3, 0.25) == 1 and num_kept(8, 0.0) == 0


def test_global_scope_and_dtype() -> None:
    base = {"a": torch.zeros(4, dtype=torch.bfloat16), "b": torch.zeros(2, 2)}
    tuned = {
        "a": torch.tensor([0.5, 0.25, 4.0, 0.125], dtype=torch.bfloat16),
        "b": torch.tensor([[1.0, 2.0], [3.0, 0.0]]),
    }
    out = update_selective_merge(base, tuned, density=0.375, scale=0.5, scope="global")  # k = 3 of 8: 4, 3, 2
    assert out["a"].dtype == torch.bfloat16 and out["b"].dtype == torch.float32
    assert out["a"].float().tolist() == [0, 0, 2.0, 0] and out["b"].tolist() == [[0, 1.0], [1.5, 0]]
    per_tensor = update_selective_merge(base, tuned, density=0.375, scale=0.5, scope="tensor")  # k = 1 each
    assert per_tensor["a"].float().tolist() == [0, 0, 2.0, 0] and per_tensor["b"].tolist() == [[0, 0], [1.5, 0]]
    exact = update_selective_merge(
        base, {"a": torch.ones(4, dtype=torch.bfloat16), "b": torch.ones(2, 2)}, 0.375, 1.0, "global", "exact"
    )
    assert exact["a"].float().tolist() == [1, 1, 1, 0] and exact["b"].sum() == 0


def test_keep_base_and_errors() -> None:
    base = {"embed": torch.zeros(3), "w": torch.zeros(3), "ids": torch.arange(3)}
    tuned = {"embed": torch.ones(3), "w": torch.ones(3), "ids": torch.arange(3)}
    out = update_selective_merge(base, tuned, density=1.0, scale=1.0, keep_base=["^embed"])
    assert out["embed"].sum() == 0 and out["w"].sum() == 3 and torch.equal(out["ids"], base["ids"])
    with pytest.raises(ValueError, match="shape mismatch for 'w'"):
        update_selective_merge({"w": torch.zeros(3)}, {"w": torch.zeros(4)})
    with pytest.raises(ValueError, match="missing in tuned \\['v'\\]"):
        update_selective_merge({"w": torch.zeros(3), "v": torch.zeros(1)}, {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="non-floating tensor 'ids'"):
        update_selective_merge({"ids": torch.arange(3)}, {"ids": torch.arange(3) + 1})
    with pytest.raises(ValueError, match="scope='layer'"):
        update_selective_merge(base, tuned, scope="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        update_selective_merge({"w": torch.zeros(1)}, {"w": torch.tensor([float("nan")])})


def test_kth_largest_matches_topk() -> None:
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, generator=gen).abs() for n in (7, 100, 33)]
    parts.append(torch.tensor([0.0, 0.0, 1e-40, 3.0e38]))  # zeros, a subnormal, a huge value
    flat = torch.cat(parts)
    for k in (1, 2, 17, 80, flat.numel() - 1, flat.numel()):
        assert kth_largest(lambda: iter(parts), k) == float(flat.topk(k).values.min())


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**31 - 1), st.sampled_from(["tensor", "global"]), st.sampled_from([torch.float32, torch.bfloat16])
)
def test_density_extremes(seed: int, scope: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = {"a": (torch.randn(5, 3, generator=gen) * 1e4).to(dtype), "b": torch.randn(7, generator=gen).to(dtype)}
    tuned = {k: (v.float() + torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
    full = update_selective_merge(base, tuned, density=1.0, scale=1.0, scope=scope)  # type: ignore[arg-type]
    none = update_selective_merge(base, tuned, density=0.0, scale=0.7, scope=scope)  # type: ignore[arg-type]
    for key in base:
        assert torch.equal(full[key], tuned[key]) and torch.equal(none[key], base[key])


def test_full_density_copies_tuned_exactly_across_magnitudes() -> None:
    base, tuned = {"w": torch.tensor([1e8, 3.0, -2.0])}, {"w": torch.tensor([1.0, 1e-9, 5e7])}
    assert float(base["w"][0] + (tuned["w"][0] - base["w"][0])) != 1.0  # naive fp32 base + Δ loses the value
    for scope in ("tensor", "global"):
        out = update_selective_merge(base, tuned, density=1.0, scale=1.0, scope=scope)  # type: ignore[arg-type]
        assert torch.equal(out["w"], tuned["w"])


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], shards: list[list[str]] | None) -> None:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "tiny", "dir": directory.name}))
    if shards is None:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("ties", ["keep_all", "exact"])
def test_sharded_checkpoint_round_trip(tmp_path: Path, scope: str, ties: str) -> None:
    gen = torch.Generator().manual_seed(1)
    base = {"embed.weight": torch.randn(6, 4, generator=gen).bfloat16(), "l0.w": torch.randn(4, 4, generator=gen)}
    base |= {"l1.w": torch.randn(4, generator=gen), "l1.b": torch.zeros(3)}
    tuned = {k: (v.float() + torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in base.items()}
    tuned["l1.b"][1] = 1.0  # ties in |Δ| around the threshold
    write_checkpoint(tmp_path / "base", base, [["embed.weight", "l0.w"], ["l1.w", "l1.b"]])
    write_checkpoint(tmp_path / "tuned", tuned, [["embed.weight"], ["l0.w", "l1.w", "l1.b"]])  # other sharding
    stats = merge_checkpoints(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", 0.3, 0.7, scope, ties)  # type: ignore[arg-type]
    out_dir = tmp_path / "out"
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    merged: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        merged |= load_file(str(out_dir / file))
    expected = update_selective_merge(base, tuned, 0.3, 0.7, scope, ties)  # type: ignore[arg-type]
    assert merged.keys() == expected.keys() and stats["merge/shards"] == 2
    for key in expected:
        assert merged[key].dtype == base[key].dtype and torch.equal(merged[key], expected[key])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    assert json.loads((out_dir / "config.json").read_text())["dir"] == "base"  # side files follow the base
    with pytest.raises(FileExistsError, match="not empty"):
        merge_checkpoints(tmp_path / "base", tmp_path / "tuned", out_dir)


def test_single_file_checkpoint_and_missing_dir(tmp_path: Path) -> None:
    base, tuned = {"w": torch.zeros(4)}, {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    write_checkpoint(tmp_path / "base", base, None)
    write_checkpoint(tmp_path / "tuned", tuned, None)
    merge_checkpoints(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", density=1.0, scale=1.0)
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], tuned["w"])
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        merge_checkpoints(tmp_path / "nowhere", tmp_path / "tuned", tmp_path / "out2")


# ---------------------------------------------------------------------------------------------- loadable output


def save_tiny_base(directory: Path) -> Qwen2ForCausalLM:
    """A tiny Qwen2 saved as a Hugging Face folder with its tokenizer (what a hub base model looks like)."""
    model = build_tiny_qwen2(seed=0)
    model.save_pretrained(directory)
    build_char_tokenizer().save_pretrained(directory)
    return model


def test_merged_hf_base_and_exported_tuned_load_with_transformers(tmp_path: Path) -> None:
    base = save_tiny_base(tmp_path / "base")
    tuned_policy = CausalLMPolicy(build_tiny_qwen2(seed=1), tokenizer=build_char_tokenizer())
    (tmp_path / "tuned").mkdir()
    tuned_policy.export(tmp_path / "tuned")
    merge_checkpoints(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", density=1.0, scale=1.0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in (tmp_path / "base").iterdir())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    input_ids = torch.tensor([[2, 42, 40, 26, 39, 107]])
    with torch.no_grad():  # density 1, scale 1: the merged model is the tuned one
        torch.testing.assert_close(merged(input_ids).logits, tuned_policy.module(input_ids).logits, rtol=0, atol=0)
        assert not torch.equal(merged(input_ids).logits, base(input_ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == build_char_tokenizer().chat_template
    # `renorm eval CONFIG --checkpoint OUT`: the merged folder loads into the config's (full-weight) policy
    policy = CausalLMPolicy(build_tiny_qwen2(seed=0), tokenizer=build_char_tokenizer())
    assert is_export_folder(tmp_path / "out")
    load_export(policy, tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(
            policy.module(input_ids).logits, tuned_policy.module(input_ids).logits, rtol=0, atol=0
        )


def test_merging_a_training_checkpoint_copies_no_bookkeeping(tmp_path: Path) -> None:
    base = save_tiny_base(tmp_path / "base")
    tuned = {name: value + 0.01 for name, value in base.state_dict().items()}
    checkpoint = CheckpointManager(tmp_path / "run").save(CheckpointState(step=3, model=tuned, meta={"a": 1}))
    merge_checkpoints(tmp_path / "base", checkpoint, tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert not files & CHECKPOINT_BOOKKEEPING and {"config.json", "generation_config.json", "tokenizer.json"} <= files
    assert (tmp_path / "out" / "config.json").read_text() == (tmp_path / "base" / "config.json").read_text()
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
