"""Trained causal-LM policies leave the toolkit: the demo config trained for 2 steps (full fine-tuning and LoRA)
is exported and loaded back with transformers / peft, giving the trained policy's logits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tests.demo_run import DEMO, run_cli, tiny_config
from tests.export_round_trip import assert_export_loads_back
from toolkit.config import instantiate
from toolkit.evaluation import evaluate
from toolkit.io.export import export_checkpoint, load_export
from toolkit.train.runner import build_trainer, fit

LORA = "policy.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}"
PROMPT = [{"role": "user", "content": "write the letter x, then stop"}]
BOOKKEEPING = {"COMPLETE", "objects.pt", "rng.pt", "meta.json"}


@dataclass
class TrainedRun:
    run_dir: Path
    config: dict[str, Any]
    tokenizer: Any
    input_ids: Tensor  # [1, L] the chat-templated prompt
    logits: Tensor  # [1, L, V] the trained policy's


def logits_of(model: nn.Module, input_ids: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        out: Tensor = model(input_ids=input_ids).logits
    return out


def train(run_dir: Path, *overrides: str) -> TrainedRun:
    config = tiny_config(run_dir, "trainer.num_steps=2", *overrides)
    trainer = build_trainer(config)
    fit(trainer)
    policy: Any = trainer.policy
    text = policy.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    input_ids = torch.tensor([policy.tokenizer(text)["input_ids"]])
    return TrainedRun(run_dir, config, policy.tokenizer, input_ids, logits_of(policy.module, input_ids))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train(tmp_path_factory.mktemp("full") / "run")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train(tmp_path_factory.mktemp("lora") / "run", LORA)


def base_model(run: TrainedRun) -> nn.Module:
    """The config's base model (a seeded tiny Qwen2), as the LoRA adapters were trained on."""
    model: nn.Module = instantiate(run.config["policy"]["model"], where="policy.model")
    return model


def test_full_model_folder_loads_with_transformers(full_run: TrainedRun, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    checkpoint = export_checkpoint(full_run.config, full_run.run_dir, out)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert {"tokenizer_config.json", "chat_template.jinja"} <= files and not files & BOOKKEEPING
    assert checkpoint.name == "step_00000002"
    trained, written = load_file(str(checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert written.keys() == trained.keys() and all(torch.equal(written[k], trained[k]) for k in trained)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    assert torch.equal(logits_of(model, full_run.input_ids), full_run.logits)  # exact in fp32
    assert model.generation_config.eos_token_id == full_run.tokenizer.eos_token_id

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == full_run.tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == (full_run.tokenizer.eos_token, full_run.tokenizer.pad_token)
    # transformers 5 loads every qwen2-typed folder with Qwen2's byte-level tokenizer class, whatever
    # tokenizer_config.json names; the tiny char tokenizer survives it except for spaces and newlines.
    text = "<|im_start|>user<answer>x</answer><|im_end|>"
    assert tokenizer(text)["input_ids"] == full_run.tokenizer(text)["input_ids"]
    exact = PreTrainedTokenizerFast.from_pretrained(out)
    templated = exact.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert exact(templated)["input_ids"] == full_run.input_ids[0].tolist()


def test_bf16_export_writes_bf16_weights(full_run: TrainedRun, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    checkpoint = export_checkpoint(full_run.config, full_run.run_dir, out, dtype="bf16")
    trained = load_file(str(checkpoint / "model.safetensors"))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for name in list(f.keys()):
            assert f.get_tensor(name).dtype == torch.bfloat16
            assert torch.equal(f.get_tensor(name), trained[name].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    torch.testing.assert_close(logits_of(model, full_run.input_ids).float(), full_run.logits, atol=0.1, rtol=0.05)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_lora_adapter_folder_loads_with_peft(lora_run: TrainedRun, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    export_checkpoint(lora_run.config, lora_run.run_dir, out)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert "config.json" not in files and not files & BOOKKEEPING
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    names = load_file(str(out / "adapter_model.safetensors")).keys()
    assert len(names) == 8 and all(".default." not in n and ("lora_A" in n or "lora_B" in n) for n in names)

    base = base_model(lora_run)
    base_logits = logits_of(base, lora_run.input_ids)
    assert not torch.equal(base_logits, lora_run.logits)  # the adapters learned something
    model = PeftModel.from_pretrained(base, out)
    assert torch.equal(logits_of(model, lora_run.input_ids), lora_run.logits)


def test_merge_lora_gives_a_plain_folder(lora_run: TrainedRun, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    export_checkpoint(lora_run.config, lora_run.run_dir, out, merge_lora=True)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and "adapter_config.json" not in files
    assert not any("lora" in name for name in load_file(str(out / "model.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(out)
    # W + s·BA is rounded once where the adapter path rounds x·A·B: equal up to fp32 rounding.
    torch.testing.assert_close(logits_of(model, lora_run.input_ids), lora_run.logits, atol=1e-5, rtol=1e-5)


def test_another_models_checkpoint_is_refused(full_run: TrainedRun, lora_run: TrainedRun, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"does not hold this config's policy weights .*missing \(27\)"):
        export_checkpoint(full_run.config, lora_run.run_dir, out)  # a LoRA checkpoint, a full-model config
    wider = tiny_config(tmp_path, "policy.model.hidden_size=32")
    with pytest.raises(ValueError, match=r"shape differs .*\(128, 64\) vs \(128, 32\)"):
        export_checkpoint(wider, full_run.run_dir, out)
    with pytest.raises(ValueError, match="merge_lora needs a LoRA policy"):
        export_checkpoint(full_run.config, full_run.run_dir, out, merge_lora=True)
    assert not out.exists()


def test_cli_end_to_end(full_run: TrainedRun, lora_run: TrainedRun, tmp_path: Path) -> None:
    code, err = run_cli("export", full_run.run_dir, tmp_path / "full")  # the run's own config.yaml
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert torch.equal(logits_of(model, full_run.input_ids), full_run.logits)

    step = lora_run.run_dir / "checkpoints" / "step_00000002"
    code, err = run_cli("export", DEMO, step, tmp_path / "merged", "--merge-lora", LORA, "--dtype", "fp32")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits_of(model, lora_run.input_ids), lora_run.logits, atol=1e-5, rtol=1e-5)

    code, err = run_cli("export", DEMO, lora_run.run_dir, tmp_path / "refused")
    assert code == 2 and "renorm: error: checkpoint" in err and "LoRA vs full fine-tuning" in err
    assert not (tmp_path / "refused").exists()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_eval_takes_the_export_folder(full_run: TrainedRun, lora_run: TrainedRun, tmp_path: Path) -> None:
    for run, name in ((full_run, "full"), (lora_run, "lora")):
        export_checkpoint(run.config, run.run_dir, tmp_path / name)
        assert_export_loads_back(run.config, run.run_dir, tmp_path / name)
    config = {**full_run.config, "eval": {"num_prompts": 4, "num_samples": 2, "batch_size": 4}}
    from_export, from_run = evaluate(config, str(tmp_path / "full")), evaluate(config, str(full_run.run_dir))
    assert from_export.rows == from_run.rows  # same weights, same seeded sampling
    export_checkpoint(lora_run.config, lora_run.run_dir, tmp_path / "merged", merge_lora=True)
    with pytest.raises(ValueError, match="holds a full model .*policy.lora unset"):
        load_export(instantiate(lora_run.config["policy"]), tmp_path / "merged")
    with pytest.raises(ValueError, match="holds LoRA adapters .*trains all weights"):
        load_export(instantiate(full_run.config["policy"]), tmp_path / "lora")
    code, err = run_cli("eval", DEMO, "--checkpoint", tmp_path / "lora", LORA, "+eval.num_prompts=2")
    assert code == 0, err
