"""Tests for toolkit.io.checkpoint: round trip, RNG, pruning, atomicity under SIGKILL, resume modes, signals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from toolkit.io.checkpoint import (
    COMPLETE,
    CheckpointError,
    CheckpointManager,
    CheckpointState,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from toolkit.io.resume import resolve_resume
from toolkit.train.interrupt import GracefulInterrupt

REPO = Path(__file__).resolve().parents[3]


class TiedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale_bf16", torch.arange(4, dtype=torch.bfloat16))


def small_state(step: int, value: float = 0.0) -> CheckpointState:
    return CheckpointState(step=step, model={"w": torch.full((2,), value)}, meta={"step_seen": step})


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def run_child(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )


def wait_for_line(child: subprocess.Popen[str], expected: str) -> None:
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    assert line == expected, f"child printed {line!r}, expected {expected!r}"


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_tensors_optimizer_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.head(model.embed(torch.tensor([1, 2]))).sum().backward()
    optimizer.step()
    state_dict = model.state_dict()
    state_dict["strided"] = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous
    rng = capture_rng_state()
    expected = draws()

    manager = CheckpointManager(tmp_path / "run")
    path = manager.save(
        CheckpointState(step=7, model=state_dict, objects={"optimizer": optimizer.state_dict()}, rng=rng, meta={"a": 1})
    )
    assert path == tmp_path / "run" / "checkpoints" / "step_00000007"
    draws()  # move every generator on
    loaded = manager.load(path)

    assert loaded.step == 7 and loaded.meta == {"a": 1}
    assert set(loaded.model) == set(state_dict)
    for name, tensor in state_dict.items():
        assert loaded.model[name].dtype == tensor.dtype
        assert torch.equal(loaded.model[name], tensor), name
    momentum = loaded.objects["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state_dict()["state"][0]["momentum_buffer"])
    restore_rng_state(loaded.rng)
    assert draws() == expected

    fresh = TiedModel()
    fresh.load_state_dict({k: v for k, v in loaded.model.items() if k != "strided"})
    assert fresh.head.weight is fresh.embed.weight and torch.equal(fresh.head.weight, model.head.weight)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_optimizer.load_state_dict(loaded.objects["optimizer"])
    for m, opt in ((model, optimizer), (fresh, fresh_optimizer)):
        opt.zero_grad()
        m.head(m.embed(torch.tensor([3]))).sum().backward()
        opt.step()
    assert torch.equal(fresh.embed.weight, model.embed.weight)  # resumed update == uninterrupted update


def test_rng_files_load_with_weights_only(tmp_path: Path) -> None:
    path = CheckpointManager(tmp_path).save(CheckpointState(step=1, model={}, rng=capture_rng_state()))
    expected = draws()
    assert draws() != expected
    state = load_checkpoint(path)
    restore_rng_state(state.rng)
    assert draws() == expected


def test_save_rejects_bad_state(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match=r"meta must be JSON-serialisable"):
        manager.save(CheckpointState(step=1, model={}, meta={"x": object()}))
    with pytest.raises(ValueError, match=r"step must be an int >= 0"):
        manager.save(CheckpointState(step=-1, model={}))
    with pytest.raises(TypeError, match=r"model\['w'\] is a list"):
        manager.save(CheckpointState(step=1, model={"w": [1.0]}))  # type: ignore[dict-item]
    assert manager.list() == []


# ---------------------------------------------------------------------------------------------- pruning, listing


def test_keep_last_k_pruning(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        manager.save(small_state(step))
    assert [p.name for p in manager.list()] == ["step_00000004", "step_00000005"]
    keep_all = CheckpointManager(tmp_path / "all", keep_last=None)
    for step in (1, 2, 3):
        keep_all.save(small_state(step))
    assert [p.name for p in keep_all.list()] == ["step_00000001", "step_00000002", "step_00000003"]
    with pytest.raises(ValueError, match=r"keep_last must be an int >= 1"):
        CheckpointManager(tmp_path, keep_last=0)


def test_older_step_is_kept_and_warned_about(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(small_state(10))
    manager.save(small_state(20))
    with pytest.warns(UserWarning, match=r"holds later checkpoints \['step_00000020'\]"):
        path = manager.save(small_state(15))
    assert manager.list() == [path, manager.path_for(20)]


def test_saving_same_step_replaces_it(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(small_state(3, value=1.0))
    manager.save(small_state(3, value=2.0))
    assert [p.name for p in manager.list()] == ["step_00000003"]
    assert torch.equal(manager.load(manager.path_for(3)).model["w"], torch.full((2,), 2.0))
    assert [p.name for p in manager.directory.iterdir()] == ["step_00000003"]


def test_latest_ignores_incomplete_and_temp_dirs_and_save_cleans_temp(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    assert manager.latest() is None
    first = manager.save(small_state(1))
    (manager.directory / "step_00000009").mkdir()  # no COMPLETE marker
    stray = manager.directory / ".tmp-step_00000008-999999999-deadbeef"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"partial")
    assert manager.latest() == first
    manager.save(small_state(2))
    assert not stray.exists()
    assert manager.latest() == manager.path_for(2)


# ---------------------------------------------------------------------------------------------- load errors


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda p: (p / "objects.pt").unlink(), r"checkpoint file missing: .*step_00000004/objects\.pt"),
        (lambda p: (p / COMPLETE).unlink(), r"incomplete checkpoint \(no COMPLETE marker\): .*step_00000004"),
        (lambda p: (p / COMPLETE).write_text("{"), r"checkpoint file corrupt: .*COMPLETE"),
        (
            lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-3]),
            r"model\.safetensors has \d+ bytes, expected \d+",
        ),
        (
            lambda p: (p / "model.safetensors").write_bytes(b"\xff" * (p / "model.safetensors").stat().st_size),
            r"checkpoint file corrupt: .*model\.safetensors: ",
        ),
        (
            lambda p: (p / "rng.pt").write_bytes(b"\x00" * (p / "rng.pt").stat().st_size),
            r"checkpoint file corrupt: .*rng\.pt: ",
        ),
    ],
)
def test_load_names_the_missing_or_corrupt_file(tmp_path: Path, damage: Any, pattern: str) -> None:
    manager = CheckpointManager(tmp_path)
    path = manager.save(CheckpointState(step=4, model={"w": torch.ones(8)}, rng=capture_rng_state()))
    damage(path)
    with pytest.raises(CheckpointError, match=pattern):
        manager.load(path)


# ---------------------------------------------------------------------------------------------- resume


def test_resolve_resume_modes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert resolve_resume("auto", run) is None
    assert resolve_resume("never", run) is None
    manager = CheckpointManager(run)
    first, second = manager.save(small_state(1)), manager.save(small_state(2))
    assert resolve_resume("auto", run) == second
    assert resolve_resume("never", run) is None
    assert resolve_resume(str(first), run) == first
    assert resolve_resume("step_00000001", run) == first
    assert resolve_resume(str(run), tmp_path / "other_run") == second
    with pytest.raises(CheckpointError, match=r"resume checkpoint not found: atuo; did you mean 'auto'\?"):
        resolve_resume("atuo", run)
    with pytest.raises(CheckpointError, match=r"resume checkpoint not found: .*missing"):
        resolve_resume(str(tmp_path / "missing"), run)
    (first / COMPLETE).unlink()
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint .*step_00000001"):
        resolve_resume(str(first), run)
    empty_run = tmp_path / "empty"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"has no complete checkpoint"):
        resolve_resume(str(empty_run), run)


# ---------------------------------------------------------------------------------------------- atomicity

_SLOW_SAVE_CHILD = """
    import io, os, sys, time
    import torch
    from toolkit.io.checkpoint import CheckpointManager, CheckpointState

    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print("HALF-WRITTEN", flush=True)
        time.sleep(60)

    torch.save = slow_save
    model = {"big": torch.randn(512, 1024), "w": torch.full((2,), 2.0)}
    optimizer = {"state": {0: {"exp_avg": torch.randn(512, 1024)}}}
    CheckpointManager(sys.argv[1]).save(CheckpointState(step=2, model=model, objects={"optimizer": optimizer}))
    print("FINISHED", flush=True)
"""


@pytest.mark.integration
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    first = manager.save(CheckpointState(step=1, model={"w": torch.full((2,), 1.0)}, objects={"n": 1}))
    child = run_child(_SLOW_SAVE_CHILD, str(tmp_path))
    try:
        wait_for_line(child, "HALF-WRITTEN")
        temps = [p for p in manager.directory.iterdir() if p.name.startswith(".tmp-step_00000002")]
        assert len(temps) == 1 and (temps[0] / "model.safetensors").stat().st_size > 2 * 2**20
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert temps[0].exists() and not manager.path_for(2).exists()
    assert manager.latest() == first and resolve_resume("auto", tmp_path) == first
    loaded = manager.load(first)
    assert torch.equal(loaded.model["w"], torch.full((2,), 1.0)) and loaded.objects == {"n": 1}
    manager.save(small_state(3))
    assert not temps[0].exists()


# ---------------------------------------------------------------------------------------------- signals

_LOOP_CHILD = """
    import sys, time
    import torch
    from toolkit.io.checkpoint import CheckpointManager, CheckpointState
    from toolkit.train.interrupt import GracefulInterrupt

    step = 0
    with GracefulInterrupt() as interrupt:
        print("READY", flush=True)
        while not interrupt.requested:
            step += 1
            time.sleep(0.01)
            if step == 1000 * 60:
                sys.exit(3)  # never signalled
        if sys.argv[2] == "wait-again":
            print("REQUESTED", flush=True)
            time.sleep(60)
        meta = {"signal": interrupt.received.name}
        CheckpointManager(sys.argv[1]).save(CheckpointState(step=step, model={"w": torch.zeros(1)}, meta=meta))
        print("SAVED", flush=True)
    sys.exit(0)
"""


@pytest.mark.integration
def test_graceful_interrupt_in_subprocess_saves_and_exits_zero_second_signal_kills(tmp_path: Path) -> None:
    graceful = run_child(_LOOP_CHILD, str(tmp_path / "graceful"), "save")
    stubborn = run_child(_LOOP_CHILD, str(tmp_path / "stubborn"), "wait-again")
    try:
        for child in (graceful, stubborn):
            wait_for_line(child, "READY")
            time.sleep(0.05)
            child.send_signal(signal.SIGTERM)
        wait_for_line(graceful, "SAVED")
        assert graceful.wait(timeout=30) == 0
        wait_for_line(stubborn, "REQUESTED")
        stubborn.send_signal(signal.SIGTERM)
        assert stubborn.wait(timeout=30) == -signal.SIGTERM
    finally:
        for child in (graceful, stubborn):
            child.kill()
            child.wait(timeout=30)
    saved = CheckpointManager(tmp_path / "graceful").latest()
    assert saved is not None
    state = load_checkpoint(saved)
    assert state.step > 0 and state.meta == {"signal": "SIGTERM"}
    assert json.loads((saved / "meta.json").read_text()) == {"signal": "SIGTERM"}
    assert CheckpointManager(tmp_path / "stubborn").latest() is None


def test_graceful_interrupt_in_process_flags_then_second_sigint_raises_and_restores() -> None:
    # Python's own SIGINT handler, whatever this process inherited: GracefulInterrupt leaves an ignored signal
    # ignored (tested below), and a runner started in the background can inherit SIGINT as ignored.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _flags_then_second_sigint_raises_and_restores()
    finally:
        signal.signal(signal.SIGINT, inherited)


def _flags_then_second_sigint_raises_and_restores() -> None:
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulInterrupt() as interrupt:
        assert signal.getsignal(signal.SIGTERM) is not before_term
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert interrupt.requested and interrupt.received is signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before_int
    assert signal.getsignal(signal.SIGTERM) is before_term


def test_graceful_interrupt_respects_ignored_signals_and_is_noop_off_main_thread() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with GracefulInterrupt():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    seen: list[Any] = []

    def worker() -> None:
        with GracefulInterrupt() as interrupt:
            seen.append((interrupt.requested, signal.getsignal(signal.SIGINT)))

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [(False, before)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_and_cuda_tensors_round_trip(tmp_path: Path) -> None:
    model = {"w": torch.randn(4, 4, device="cuda"), "tied": torch.randn(4, device="cuda")}
    model["view"] = model["w"][0]  # shares storage with w
    manager = CheckpointManager(tmp_path)
    path = manager.save(CheckpointState(step=1, model=model, rng=capture_rng_state()))
    expected = torch.rand(5, device="cuda").tolist()
    torch.rand(5, device="cuda")
    loaded = manager.load(path)
    restore_rng_state(loaded.rng)
    assert torch.rand(5, device="cuda").tolist() == expected
    assert len(loaded.rng["cuda"]) == torch.cuda.device_count()
    for name, tensor in model.items():
        assert loaded.model[name].device.type == "cpu" and torch.equal(loaded.model[name], tensor.cpu())


def test_write_json_atomic_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    from toolkit.io.atomic import write_json_atomic

    target = tmp_path / "deep" / "out.json"
    write_json_atomic(target, {"b": 1, "a": [1.5, None]})
    assert json.loads(target.read_text()) == {"b": 1, "a": [1.5, None]}
    assert target.read_text().index('"b"') < target.read_text().index('"a"')  # insertion order by default
    write_json_atomic(target, {"b": 2, "a": 0}, sort_keys=True)
    assert target.read_text().index('"a"') < target.read_text().index('"b"') and target.read_text().endswith("\n")
    assert json.loads(target.read_text()) == {"a": 0, "b": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"a": 0, "b": 2}  # a failed write keeps the old file
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
