"""`renorm export ... --push-to-hub REPO`: an export folder uploaded to the Hugging Face Hub with a model card.

The upload goes through `huggingface_hub` (`HfApi.create_repo` + `upload_folder`), which finds the token itself
(`HF_TOKEN` or `hf auth login`): no token is taken on the command line, and none is written anywhere. When the
folder has no `README.md`, a model card is written first: the library that loads the folder, the base model when
the config names one on the Hub, and how the run was made.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from toolkit.io.datasets import is_hub_id

CARD = "README.md"
# Config keys under `policy:` that name the base model a policy was built from.
_MODEL_KEYS = ("pretrained_model_name_or_path", "model_name", "model_name_or_path", "path")


def library_of(folder: Path) -> str | None:
    """The library that loads an export folder: "peft", "diffusers", "transformers", or None (a DLM folder)."""
    if (folder / "adapter_config.json").is_file():
        return "peft"
    if any(
        (folder / name).exists() for name in ("model_index.json", "transformer", "pytorch_lora_weights.safetensors")
    ):
        return "diffusers"
    config = folder / "config.json"
    if config.is_file():
        meta = json.loads(config.read_text(encoding="utf-8"))
        return None if isinstance(meta, dict) and meta.get("format") == "renorm-dlm" else "transformers"
    return None


def base_models(policy_node: Any) -> list[str]:
    """The hub ids the `policy:` node loads its models from (in config order, without repeats)."""
    return list(dict.fromkeys(_hub_ids(policy_node)))


def _hub_ids(node: Any) -> Iterator[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key in _MODEL_KEYS and isinstance(value, str) and is_hub_id(value):
                yield value
            else:
                yield from _hub_ids(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _hub_ids(value)


def model_card(repo_id: str, folder: Path, config: Mapping[str, Any], version: str) -> str:
    """A Hub model card (YAML metadata + a short text) for the export `folder` of a run with `config`."""
    library, bases = library_of(folder), base_models(config.get("policy"))
    lines = ["---", "tags:", "- renorm", "- reinforcement-learning"]
    if library is not None:
        lines.append(f"library_name: {library}")
    if bases:
        lines += ["base_model:", *(f"- {base}" for base in bases)]
    lines += ["---", "", f"# {repo_id.split('/')[-1]}", ""]
    policy = (config.get("policy") or {}).get("_component_", "the policy")
    lines.append(f"Fine-tuned with reinforcement learning by renorm {version}")
    lines.append(f"(`{policy}`), exported with `renorm export`.")
    usage = {
        "transformers": "`AutoModelForCausalLM.from_pretrained` (text) or `AutoModelForImageTextToText` (video VLMs)",
        "peft": "`PeftModel.from_pretrained(base_model, REPO)` (LoRA adapters)",
        "diffusers": "`DiffusionPipeline.from_pretrained` (a pipeline) or `pipeline.load_lora_weights(REPO)`",
    }.get(library or "", "`renorm dlm sample` or `modalities.diffusion_lm.checkpoint_io.load_dlm_folder`")
    lines += ["", f"Load it with {usage}.", ""]
    return "\n".join(lines)


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    config: Mapping[str, Any],
    version: str,
    private: bool = False,
    commit_message: str = "Upload model exported by renorm",
) -> str:
    """Upload the export `folder` to the Hub repo `repo_id` (created when missing); returns the commit URL.

    A model card (naming renorm `version`) is written into the folder first unless it holds a README.md.

    Raises:
        ValueError: `repo_id` is not an "owner/name" or "name" id, or the folder is missing or empty.
    """
    out = Path(folder)
    if not is_hub_id(repo_id):
        raise ValueError(f"--push-to-hub {repo_id!r} is not a Hub repo id (OWNER/NAME)")
    if not out.is_dir() or not any(out.iterdir()):
        raise ValueError(f"nothing to push: {out} is missing or empty")
    if not (out / CARD).exists():
        (out / CARD).write_text(model_card(repo_id, out, config, version), encoding="utf-8")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
