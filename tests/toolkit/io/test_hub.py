"""`renorm export ... --push-to-hub REPO` (issue 18 item 4): the export folder and a model card reach the Hub through
`huggingface_hub.HfApi`, here a local stand-in that keeps the uploaded files (never the network)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from transformers import AutoModelForCausalLM

from tests.demo_run import run_cli, tiny_config
from toolkit.io.hub import library_of, model_card, push_to_hub
from toolkit.train.runner import build_trainer, fit

SECRET = "hf_pushTestToken0123456789abcdef"


class StandInHub:
    """`HfApi` with create_repo and upload_folder: repos are folders under `root` (no network)."""

    root: Path
    calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        StandInHub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return f"https://hub.local/{repo_id}"

    def upload_folder(self, folder_path: str, repo_id: str, **kwargs: Any) -> str:
        StandInHub.calls.append(("upload_folder", {"folder_path": folder_path, "repo_id": repo_id, **kwargs}))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f"https://hub.local/{repo_id}/commit/1"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> type[StandInHub]:
    monkeypatch.setattr(StandInHub, "root", tmp_path / "hub", raising=False)
    monkeypatch.setattr(StandInHub, "calls", [])
    monkeypatch.setattr(huggingface_hub, "HfApi", StandInHub)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return StandInHub


def test_cli_exports_then_pushes_a_loadable_folder_with_a_card(tmp_path: Path, hub: type[StandInHub]) -> None:
    run_dir = tmp_path / "run"
    fit(build_trainer(tiny_config(run_dir, "trainer.num_steps=1")))
    code, err = run_cli("export", run_dir, tmp_path / "out", "--push-to-hub", "team/tiny-grpo", "--private")
    assert code == 0, err
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": "team/tiny-grpo", "repo_type": "model", "private": True, "exist_ok": True}
    pushed = hub.root / "team" / "tiny-grpo"
    assert AutoModelForCausalLM.from_pretrained(pushed).config.model_type == "qwen2"
    card = (pushed / "README.md").read_text()
    assert card.startswith("---\ntags:\n- renorm\n") and "library_name: transformers" in card and "# tiny-grpo" in card
    assert not any(SECRET in p.read_text(errors="ignore") for p in pushed.rglob("*") if p.is_file())


def test_push_keeps_an_existing_card_and_refuses_bad_input(tmp_path: Path, hub: type[StandInHub]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / "README.md").write_text("my card")
    push_to_hub(out, "team/adapter", {}, "1.0")
    assert (hub.root / "team" / "adapter" / "README.md").read_text() == "my card"
    with pytest.raises(ValueError, match="'a/b/c' is not a Hub repo id"):
        push_to_hub(out, "a/b/c", {}, "1.0")
    with pytest.raises(ValueError, match="nothing to push"):
        push_to_hub(tmp_path / "missing", "team/x", {}, "1.0")
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]  # the refusals sent nothing


def test_model_card_names_library_and_base_model(tmp_path: Path) -> None:
    (tmp_path / "transformer").mkdir()
    policy = {"_component_": "P", "model": {"pretrained_model_name_or_path": "Qwen/Qwen2.5-3B"}, "lora": {"r": 4}}
    card = model_card("me/flux-pref", tmp_path, {"policy": policy}, "0.3.0")
    assert "library_name: diffusers" in card and "base_model:\n- Qwen/Qwen2.5-3B\n" in card and "renorm 0.3.0" in card
    dlm = tmp_path / "dlm"
    dlm.mkdir()
    (dlm / "config.json").write_text('{"format": "renorm-dlm"}')
    assert library_of(dlm) is None and "library_name" not in model_card("me/dlm", dlm, {}, "0.3.0")
