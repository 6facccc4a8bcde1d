"""Checkpoints that cannot run code (weights_only unpickling) and checksums that catch corruption, with
auto-resume falling back to the newest checkpoint that verifies (issue 24)."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.demo_run import DEMO, FAST, run_cli, tiny_config
from toolkit.io.checkpoint import (
    COMPLETE,
    CORRUPT_PREFIX,
    CheckpointError,
    CheckpointManager,
    CheckpointState,
    file_sha256,
    load_checkpoint,
)
from toolkit.io.resume import resolve_resume
from toolkit.train.runner import build_trainer, fit

# ---------------------------------------------------------------------------------------------- malicious pickles


class _RunsCode:
    """Unpickling this calls `os.system` (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def plant_malicious(checkpoint: Path, file: str, marker: Path) -> None:
    """Replace `file` with a code-running pickle and fix the manifest, as an attacker handing it over would."""
    with open(checkpoint / file, "wb") as f:
        pickle.dump({"optimizer": _RunsCode(marker)}, f, protocol=2)
    manifest = json.loads((checkpoint / COMPLETE).read_text())
    manifest["files"][file] = {"size": (checkpoint / file).stat().st_size, "sha256": file_sha256(checkpoint / file)}
    (checkpoint / COMPLETE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("file", ["objects.pt", "rng.pt"])
def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path: Path, file: str) -> None:
    path = CheckpointManager(tmp_path / "run").save(CheckpointState(step=1, model={"w": torch.ones(2)}))
    marker = tmp_path / "pwned"
    plant_malicious(path, file, marker)
    with pytest.raises(CheckpointError, match=rf"refusing to load .*{file}.*could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_resume_and_eval_refuse_a_crafted_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fit(build_trainer(tiny_config(run_dir, "trainer.num_steps=1")))
    [checkpoint] = CheckpointManager(run_dir).list()
    marker = tmp_path / "pwned"
    plant_malicious(checkpoint, "objects.pt", marker)
    resumed = build_trainer(tiny_config(tmp_path / "other", "trainer.num_steps=2", f"trainer.resume={checkpoint}"))
    with pytest.raises(CheckpointError, match="refusing to load"):
        fit(resumed)
    code, err = run_cli("eval", DEMO, *FAST, "+eval.num_prompts=1", "--checkpoint", checkpoint)
    assert code == 2 and "refusing to load" in err and "Traceback" not in err
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- checksums


def flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_detected_and_auto_resume_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path)
    older = manager.save(CheckpointState(step=1, model={"w": torch.full((64,), 1.0)}))
    newer = manager.save(CheckpointState(step=2, model={"w": torch.full((64,), 2.0)}))
    flip_byte(newer / "model.safetensors")  # same size: only the checksum can tell
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 differs"):
        load_checkpoint(newer)
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_checkpoint(resolve_resume(str(newer), tmp_path))  # an explicit path is never silently swapped
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("auto", tmp_path, quarantine=True) == older
    assert "step_00000002" in caplog.text and "model.safetensors" in caplog.text
    [aside] = [p for p in manager.directory.iterdir() if p.name.startswith(CORRUPT_PREFIX)]
    assert aside.name.startswith("corrupt-step_00000002") and (aside / "model.safetensors").is_file()  # kept
    assert manager.list() == [older] and torch.equal(load_checkpoint(older).model["w"], torch.full((64,), 1.0))


def test_a_resume_hashes_each_file_once_unless_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`resume=auto` verifies the checkpoint it picks and the load verifies it again: the second check is a `stat`
    of each file (tens of GB are not hashed twice); a file rewritten since is hashed again and a flipped byte found."""
    import toolkit.io.integrity as integrity

    hashed: list[str] = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    checkpoint = CheckpointManager(tmp_path).save(CheckpointState(step=1, model={"w": torch.ones(64)}, meta={"a": 1}))
    files = sorted(json.loads((checkpoint / COMPLETE).read_text())["files"])
    assert resolve_resume("auto", tmp_path) == checkpoint
    load_checkpoint(checkpoint)
    assert sorted(hashed) == files  # once each
    hashed.clear()
    flip_byte(checkpoint / "model.safetensors")  # rewritten: a new modification time
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_checkpoint(checkpoint)
    assert "model.safetensors" in hashed


def test_training_resumes_from_the_newest_checkpoint_that_verifies(tmp_path: Path) -> None:
    fit(build_trainer(tiny_config(tmp_path, "trainer.num_steps=2", "trainer.save_every=1")))
    manager = CheckpointManager(tmp_path)
    flip_byte(manager.path_for(2) / "objects.pt", offset=len((manager.path_for(2) / "objects.pt").read_bytes()) // 2)
    trainer = build_trainer(tiny_config(tmp_path, "trainer.num_steps=3", "trainer.save_every=1"))
    fit(trainer)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # step 2 was run again from step 1's checkpoint
    assert [p.name for p in manager.list()][-1] == "step_00000003"


def test_version_1_manifests_still_load(tmp_path: Path) -> None:
    path = CheckpointManager(tmp_path).save(CheckpointState(step=3, model={"w": torch.ones(2)}))
    manifest = json.loads((path / COMPLETE).read_text())
    manifest["format_version"] = 1
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}
    (path / COMPLETE).write_text(json.dumps(manifest))
    assert load_checkpoint(path).step == 3


def test_a_manifest_naming_a_file_outside_the_checkpoint_is_corrupt(tmp_path: Path) -> None:
    path = CheckpointManager(tmp_path).save(CheckpointState(step=1, model={"w": torch.ones(2)}))
    manifest = json.loads((path / COMPLETE).read_text())
    manifest["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
    (path / COMPLETE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a plain name"):
        load_checkpoint(path)


def test_a_full_disk_while_saving_names_the_checkpoint_and_keeps_the_old_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import toolkit.io.checkpoint as checkpoint

    manager = CheckpointManager(tmp_path)
    first = manager.save(CheckpointState(step=1, model={"w": torch.ones(2)}))

    def full(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_text_synced", full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step_00000002: No space left"):
        manager.save(CheckpointState(step=2, model={"w": torch.ones(2)}))
    assert manager.list() == [first] and not [p for p in manager.directory.iterdir() if p.name.startswith(".")]


def test_eval_takes_a_run_dir_and_loads_its_newest_checkpoint(tmp_path: Path) -> None:
    from toolkit.io.resume import resolve_checkpoint

    run_dir = tmp_path / "run"
    fit(build_trainer(tiny_config(run_dir, "trainer.num_steps=2", "trainer.save_every=1")))
    assert resolve_checkpoint(run_dir) == CheckpointManager(run_dir).path_for(2)
    code, err = run_cli("eval", DEMO, *FAST, "+eval.num_prompts=1", "--checkpoint", run_dir)
    assert code == 0, err
    code, err = run_cli("eval", DEMO, *FAST, "+eval.num_prompts=1", "--checkpoint", tmp_path)
    assert code == 2 and "neither a checkpoint" in err and "run directory" in err
