"""The package graph rules of STYLE.md, checked by parsing every module's imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "decord", "open_clip", "qwen_vl_utils")


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in `path` (including inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_there_are_files_to_check() -> None:
    assert python_files("toolkit") and python_files("rewards")


@pytest.mark.parametrize("path", python_files("rewards"), ids=str)
def test_rewards_is_a_leaf(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("toolkit", "modalities")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: rewards/ must not import toolkit or modalities"


@pytest.mark.parametrize("path", python_files("toolkit"), ids=str)
def test_toolkit_never_imports_a_modality(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] == "modalities"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", python_files("modalities"), ids=str)
def test_modalities_do_not_import_each_other(path: Path) -> None:
    parts = path.relative_to(ROOT / "modalities").parts
    if len(parts) < 2:
        return
    own = parts[0]
    bad = {m for m in imported_modules(path) if m.startswith("modalities.") and m.split(".")[1] != own}
    assert not bad, f"{path.relative_to(ROOT)} imports another modality: {sorted(bad)}"


def test_import_toolkit_stays_light() -> None:
    code = (
        "import sys, toolkit, toolkit.train.trainer, toolkit.train.runner, toolkit.cli, rewards.base\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"import toolkit pulled in heavy modules: {out.stdout.strip()}"


def test_rule_checker_sees_function_level_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    import modalities.text_agent\n    from toolkit import trainer\n")
    assert imported_modules(sample) == {"modalities.text_agent", "toolkit"}
