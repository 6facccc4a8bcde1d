"""The wheel carries `configs/` and the data its tiny configs read (under `<prefix>/share/renorm/`, in the
repository's layout), and an installed wheel trains the demo config from another directory.

The wheel is built offline from a copy of the sources (no build isolation: the venv's setuptools), so the working
tree gets no `build/` or `*.egg-info`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from toolkit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["toolkit", "modalities", "rewards", "configs", "data", "pyproject.toml", "README.md", "LICENSE"]
SHARE = "share/renorm"
TINY = ["demo/tiny_grpo.yaml", "text_reasoning/tiny.yaml", "text_agent/tiny.yaml", "text_to_image/tiny.yaml"]


def offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", ".", "-w"]
    done = subprocess.run([*command, str(out)], cwd=source, env=offline_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = out.glob("renorm-*.whl")
    return built


def shared_files(wheel: Path) -> set[str]:
    """Paths under share/renorm/ in the wheel, relative to it (`configs/demo/tiny_grpo.yaml`)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    prefix = f"renorm-{wheel.name.split('-')[1]}.data/data/{SHARE}/"
    return {name.removeprefix(prefix) for name in names if name.startswith(prefix)}


def test_wheel_carries_every_config(wheel: Path) -> None:
    shipped = shared_files(wheel)
    configs = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")}
    assert len(configs) > 30 and not configs - shipped, sorted(configs - shipped)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "toolkit/cli.py" in names and not any(n.startswith("tests/") for n in names)


def test_wheel_carries_the_files_the_tiny_configs_read(wheel: Path) -> None:
    shipped = shared_files(wheel)
    for name in TINY:
        read = [Path(v) for v in strings(load_config(ROOT / "configs" / name)) if v.startswith(str(ROOT))]
        assert read, name
        for path in read:
            assert path.is_file() and str(path.relative_to(ROOT)) in shipped, (name, path)


def strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return [node] if isinstance(node, str) else []


@pytest.mark.slow
@pytest.mark.integration
def test_installed_wheel_trains_the_demo_from_another_directory(wheel: Path, tmp_path: Path) -> None:
    """`pip install` the wheel into a fresh venv (the current one's packages, torch included, reached through a
    `.pth` line instead of reinstalled), then `renorm train $VENV/share/renorm/configs/demo/tiny_grpo.yaml` in an
    empty directory."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "outer_packages.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    env = offline_env()
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", str(wheel)], env=env, capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr[-3000:]
    config = venv / SHARE / "configs" / "demo" / "tiny_grpo.yaml"
    work = tmp_path / "elsewhere"
    work.mkdir()
    fast = ["trainer.prompts_per_step=2", "trainer.group_size=2", "sampler.max_new_tokens=2", "trainer.num_steps=1"]
    command = [
        str(venv / "bin" / "renorm"),
        "train",
        str(config),
        *fast,
        "trainer.progress=false",
        "trainer.run_dir=run",
    ]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (work / "run" / "metrics.jsonl").is_file()
    saved = (work / "run" / "config.yaml").read_text(encoding="utf-8")
    assert str(venv / SHARE / "data" / "demo" / "letters.jsonl") in saved  # the installed copy of the data
    where = subprocess.run(
        [str(python), "-c", "import toolkit; print(toolkit.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(site), where.stdout  # the wheel's code, not the working tree's
