"""The recipe stand-ins (tests/recipe_models.py) in their own formats: an MDLM Lightning `.ckpt` loads through the
DiDi recipe's loader without unpickling code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from modalities.diffusion_lm.checkpoint_io import PREFIX
from tests.recipe_models import EMA_OFFSET, save_gpt2_tokenizer, write_lightning_checkpoint


class Planted:
    """Pickles as a call of os.makedirs: loading it would run code from the file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return os.makedirs, (str(self.target),)


def test_mdlm_lightning_checkpoint_loads_without_pickle(tmp_path: Path) -> None:
    """The DiDi recipe's loader reads an MDLM Lightning `.ckpt` (OmegaConf config and tokenizer object in its
    hyper-parameters) with weights_only: raw and EMA weights arrive, the containers stay inert data."""
    from transformers import GPT2TokenizerFast

    from modalities.diffusion_lm.checkpoint_io import OpaqueObject, _read_raw, load_mdlm_checkpoint
    from modalities.diffusion_lm.tiny import build_tiny_dit

    tokenizer = GPT2TokenizerFast.from_pretrained(str(save_gpt2_tokenizer(tmp_path / "gpt2")))
    dit = build_tiny_dit(vocab_size=len(tokenizer) + 1, seed=3, hidden_size=32, num_heads=2, cond_dim=16)
    path = write_lightning_checkpoint(tmp_path / "mdlm.ckpt", dit, tokenizer)
    raw = load_mdlm_checkpoint(path, num_heads=2)
    ema = load_mdlm_checkpoint(path, use_ema=True, num_heads=2)
    for name, weight in dit.state_dict().items():
        assert torch.equal(raw.state_dict()[name], weight), name
    for name, weight in dit.named_parameters():
        torch.testing.assert_close(ema.state_dict()[name], weight.detach() + EMA_OFFSET)
    hyper = _read_raw(path)["hyper_parameters"]
    assert isinstance(hyper["config"], OpaqueObject) and isinstance(hyper["tokenizer"], OpaqueObject)
    assert "omegaconf.dictconfig.DictConfig" in repr(hyper["config"])

    planted = tmp_path / "planted"
    torch.save({"state_dict": {PREFIX + k: v for k, v in dit.state_dict().items()}, "x": Planted(planted)}, path)
    with pytest.raises(ValueError, match=r"(os|posix)\.makedirs.*could run code"):
        load_mdlm_checkpoint(path, num_heads=2)
    assert not planted.exists(), "loading ran code from the checkpoint"
