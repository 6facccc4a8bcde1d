"""`${...}` interpolation: references (typed when whole), `${env:...}`, `${config_dir}`, `$${` escapes, errors that
name the key and its line, redaction of env-read secrets, and the shipped recipes that use it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolkit.config import ConfigError, dump_config, format_config, load_config, resolve_interpolations
from toolkit.config.interpolation import escape
from toolkit.io import redaction
from toolkit.io.redaction import REDACTED, redact, register_secrets

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def fresh_env_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets noted by one test's `${env:...}` must not leak into other tests' redaction."""
    monkeypatch.setattr(redaction, "_ENV_SECRETS", set())
    monkeypatch.setattr(redaction, "_SECRETS", set())


# ---------------------------------------------------------------------------------------------- references


def test_references_embedded_and_whole_keep_types(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.yaml",
        "trainer: {run_dir: runs/x, num_steps: 3, lr: 1.0e-5, flag: true, dims: [4, 8], opt: {name: adam}}\n"
        "out:\n"
        "  dir: ${trainer.run_dir}/eval\n"
        "  steps: ${trainer.num_steps}\n"
        "  lr: ${trainer.lr}\n"
        "  flag: ${trainer.flag}\n"
        "  dims: ${trainer.dims}\n"
        "  second: ${trainer.dims.1}\n"
        "  opt: ${trainer.opt}\n"
        "  text: 'step ${trainer.num_steps} of ${trainer.run_dir}, flag ${trainer.flag}, lr ${trainer.lr}'\n"
        "  chain: ${out.dir}/best\n",
    )
    out = load_config(config)["out"]
    assert out["dir"] == "runs/x/eval" and out["chain"] == "runs/x/eval/best"
    assert out["steps"] == 3 and isinstance(out["steps"], int)
    assert out["lr"] == 1e-5 and out["flag"] is True
    assert out["dims"] == [4, 8] and out["second"] == 8 and out["opt"] == {"name": "adam"}
    assert out["text"] == "step 3 of runs/x, flag true, lr 1e-05"


def test_a_whole_section_reference_is_a_copy() -> None:
    config = resolve_interpolations({"a": {"b": [1, 2]}, "c": "${a}"})
    config["c"]["b"].append(3)
    assert config["a"] == {"b": [1, 2]} and config["c"] == {"b": [1, 2, 3]}


def test_a_reference_inside_its_own_section_is_not_a_cycle() -> None:
    config = resolve_interpolations({"a": {"b": 1, "c": "${a.b}", "d": {"e": "${a.c}"}}})
    assert config == {"a": {"b": 1, "c": 1, "d": {"e": 1}}}


def test_interpolation_follows_overrides_and_bases(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "trainer: {run_dir: runs/base}\neval: {out: '${trainer.run_dir}/eval'}\n")
    child = write(tmp_path / "child.yaml", f"base: {base.name}\ntrainer: {{run_dir: runs/child}}\n")
    assert load_config(base)["eval"]["out"] == "runs/base/eval"
    assert load_config(child)["eval"]["out"] == "runs/child/eval"  # the child's run dir, not the base's
    assert load_config(child, ["trainer.run_dir=/tmp/r"])["eval"]["out"] == "/tmp/r/eval"
    overridden = load_config(child, ["eval.out=${trainer.run_dir}/other"])
    assert overridden["eval"]["out"] == "runs/child/other"


# ---------------------------------------------------------------------------------------------- environment


def test_env_variables_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RENORM_TEST_DATA", "/data/here")
    monkeypatch.delenv("RENORM_TEST_UNSET", raising=False)
    config = write(
        tmp_path / "c.yaml",
        "a: ${env:RENORM_TEST_DATA}/train.jsonl\n"
        "b: ${env:RENORM_TEST_UNSET,fallback}\n"
        "c: ${env:RENORM_TEST_UNSET, a,b }\n"
        "d: ${env:RENORM_TEST_UNSET,}\n"
        "e: ${ env:RENORM_TEST_DATA }\n",
    )
    assert load_config(config) == {
        "a": "/data/here/train.jsonl",
        "b": "fallback",
        "c": "a,b",
        "d": "",
        "e": "/data/here",
    }
    assert "${env:RENORM_TEST_DATA}" in config.read_text()  # the file itself is never rewritten


def test_unset_env_variable_names_key_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RENORM_TEST_UNSET", raising=False)
    config = write(tmp_path / "c.yaml", "judge:\n  url: http://x\n  key: ${env:RENORM_TEST_UNSET}\n")
    with pytest.raises(ConfigError, match=r"judge\.key: environment variable RENORM_TEST_UNSET is not set") as err:
        load_config(config)
    assert "c.yaml:3" in str(err.value) and "${env:RENORM_TEST_UNSET,default}" in str(err.value)


def test_env_read_secret_is_redacted_wherever_it_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret, plain = "sk-env-read-0123456789", "/not/a/secret/path"
    monkeypatch.setenv("RENORM_TEST_API_KEY", secret)
    monkeypatch.setenv("RENORM_TEST_DATA_DIR", plain)
    config = write(
        tmp_path / "c.yaml",
        "judge:\n"
        "  base_url: https://judge.local/v1?key=${env:RENORM_TEST_API_KEY}\n"
        "  headers: {X-Key: '${env:RENORM_TEST_API_KEY}'}\n"
        "data: {path: '${env:RENORM_TEST_DATA_DIR}/train.jsonl'}\n",
    )
    loaded = load_config(config)
    assert loaded["judge"]["headers"]["X-Key"] == secret  # the component gets the real value
    safe = redact(loaded)
    assert safe["judge"] == {"base_url": f"https://judge.local/v1?key={REDACTED}", "headers": {"X-Key": REDACTED}}
    assert safe["data"]["path"] == f"{plain}/train.jsonl"  # a variable whose name says nothing secret stays
    dump_config(safe, tmp_path / "run" / "config.yaml")
    assert secret not in (tmp_path / "run" / "config.yaml").read_text()
    register_secrets(loaded)
    with caplog.at_level(logging.INFO):
        logging.getLogger("tests.judge").info("calling with %s", secret)
    assert secret not in caplog.text and REDACTED in caplog.text


# ---------------------------------------------------------------------------------------------- ${config_dir}


def test_config_dir_is_the_folder_of_the_file_that_writes_it(tmp_path: Path) -> None:
    base = write(tmp_path / "shared" / "configs" / "base.yaml", "data: {path: '${config_dir}/../data/a.jsonl'}\n")
    child = write(
        tmp_path / "mine" / "run.yaml", f"base: {base}\nother: '${{config_dir}}/b.jsonl'\nref: ${{data.path}}\n"
    )
    config = load_config(child, ["extra=${config_dir}/c.jsonl"])
    assert config["data"]["path"] == str(tmp_path.resolve() / "shared" / "data" / "a.jsonl")  # `..` climbed, not kept
    assert config["other"] == str(tmp_path.resolve() / "mine" / "b.jsonl")
    assert config["ref"] == config["data"]["path"]  # a reference keeps the folder of the file that wrote the value
    assert config["extra"] == str(tmp_path.resolve() / "mine" / "c.jsonl")  # an override: the named config's folder


def test_config_dir_follows_symlinks_to_the_real_file(tmp_path: Path) -> None:
    real = write(tmp_path / "real" / "c.yaml", "path: ${config_dir}/x.jsonl\n")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "c.yaml").symlink_to(real)
    assert load_config(tmp_path / "links" / "c.yaml")["path"] == str(real.resolve().parent / "x.jsonl")


def test_config_dir_outside_a_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"a: \$\{config_dir\} is only known in a YAML file"):
        resolve_interpolations({"a": "${config_dir}/x"})


def test_shipped_tiny_configs_read_their_data_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("demo/tiny_grpo.yaml", "text_reasoning/tiny.yaml", "text_agent/tiny.yaml", "text_to_image/tiny.yaml"):
        config = load_config(CONFIGS / name)
        paths = [v for v in _strings(config) if v.endswith(".jsonl")]
        assert paths, name
        for path in paths:
            assert Path(path).is_absolute() and Path(path).is_file() and ".." not in Path(path).parts, (name, path)


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [node] if isinstance(node, str) else []


# ---------------------------------------------------------------------------------------------- escapes


def test_escape_is_literal_and_survives_format_and_reload(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "a: 1\nshell: echo $${HOME} and $${a}\nmixed: $${a}=${a}\n")
    loaded = load_config(config)
    assert loaded["shell"] == "echo ${HOME} and ${a}" and loaded["mixed"] == "${a}=1"
    text = format_config(loaded)
    assert "echo $${HOME} and $${a}" in text
    dump_config(loaded, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == loaded


@given(st.text(alphabet="${}ab.: ", max_size=20))
def test_escaped_text_resolves_to_itself(text: str) -> None:
    assert resolve_interpolations({"k": escape(text)}) == {"k": text}


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_key_names_the_key_the_line_and_the_closest_name(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "trainer:\n  run_dir: runs/x\neval:\n  out: ${trainer.run_dri}/eval\n")
    with pytest.raises(ConfigError, match=r"eval\.out: \$\{trainer\.run_dri\}: no key 'trainer\.run_dri'") as err:
        load_config(config)
    assert "c.yaml:4" in str(err.value) and err.value.suggestion == "run_dir"


def test_unknown_key_from_an_override_names_the_override(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "trainer: {run_dir: r}\n")
    with pytest.raises(ConfigError, match=r"x: .*no key 'nope' .*command-line override '\+x=\$\{nope\.y\}'"):
        load_config(config, ["+x=${nope.y}"])


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("a: ${a}\n", r"a: interpolation cycle: a -> a \(from .*c\.yaml:1\)"),
        ("a: ${b}\nb: x${a}\n", r"a: interpolation cycle: a -> b -> a \(from .*c\.yaml:1\)"),
        ("s:\n  k: ${s}\n", r"interpolation cycle: s -> s\.k -> s"),
        ("l: [1, '${l}']\n", r"l: interpolation cycle: l -> l\.1 -> l"),
    ],
)
def test_cycles_name_the_chain_and_the_line(tmp_path: Path, body: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path / "c.yaml", body))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("'${a'", r"unterminated or nested"),
        ("'${}'", r"empty interpolation"),
        ("'${a b}'", r"bad interpolation \$\{a b\}"),
        ("'${oc.env:HOME}'", r"unknown resolver in \$\{oc\.env:HOME\}"),
        ("'${env:1BAD}'", r"bad environment variable name '1BAD'"),
        ("'x${sec}'", r"\$\{sec\} is a section, which cannot be written inside a string"),
        ("'x${nothing}'", r"\$\{nothing\} is null"),
        ("'${sec.k.deeper}'", r"'sec\.k' holds int 1, not a section"),
        ("'${lst.5}'", r"'5' is not an index of the 2 items of 'lst'"),
    ],
)
def test_malformed_interpolations_name_the_key(tmp_path: Path, value: str, match: str) -> None:
    config = write(tmp_path / "c.yaml", f"sec: {{k: 1}}\nlst: [1, 2]\nnothing: null\nbad: {value}\n")
    with pytest.raises(ConfigError, match=match) as err:
        load_config(config)
    assert err.value.key == "bad" and "c.yaml:4" in str(err.value)


def test_schema_errors_after_interpolation_still_name_the_line(tmp_path: Path) -> None:
    from toolkit.config import build_dataclass
    from toolkit.train.trainer_config import TrainerConfig

    config = write(tmp_path / "c.yaml", "steps: many\ntrainer:\n  num_steps: ${steps}\n")
    with pytest.raises(ConfigError, match=r"trainer\.num_steps: expected int, got str 'many' \(from .*c\.yaml:3\)"):
        build_dataclass(TrainerConfig, load_config(config)["trainer"], where="trainer")


# ---------------------------------------------------------------------------------------------- shipped recipes


def test_no_recipe_hard_codes_its_eval_dir_under_runs() -> None:
    found = 0
    for path in sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts):
        config = load_config(path, ["+trainer.run_dir=/elsewhere/run"])
        evaluator = (config.get("eval") or {}).get("evaluator") or {}
        if "output_dir" in evaluator:
            found += 1
            assert evaluator["output_dir"] == "/elsewhere/run/eval", path
    assert found >= 7, "the text-reasoning recipes write their eval results under the run dir"


def test_env_default_keeps_relative_paths_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RENORM_TEST_RUNS", raising=False)
    config = write(tmp_path / "c.yaml", "trainer: {run_dir: '${env:RENORM_TEST_RUNS,runs}/x'}\n")
    assert load_config(config)["trainer"]["run_dir"] == "runs/x"
    monkeypatch.setenv("RENORM_TEST_RUNS", os.fspath(tmp_path))
    assert load_config(config)["trainer"]["run_dir"] == f"{tmp_path}/x"
