"""Tests for toolkit.config: base inheritance, merge, overrides, provenance in errors, schema checks."""

from __future__ import annotations

import copy
import functools
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.config import (
    ConfigDict,
    ConfigError,
    apply_overrides,
    build_dataclass,
    check_keys,
    dump_config,
    format_config,
    import_object,
    instantiate,
    load_config,
    merge_configs,
    provenance,
    validate,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

CONFIGS = Path(__file__).resolve().parents[2] / "data" / "configs"
HERE = __name__


# ---------------------------------------------------------------------------------------------- test components


class Leaf:
    def __init__(self, value: int, scale: float = 1.0, mode: Literal["sum", "mean"] = "sum", name: str | None = None):
        self.value, self.scale, self.mode, self.name = value, scale, mode, name


class Tree:
    def __init__(self, left: Leaf, children: list[Leaf], weights: dict[str, float] | None = None) -> None:
        self.left, self.children, self.weights = left, children, weights


class Exploding:
    constructed = 0

    def __init__(self, size: int = 1) -> None:
        Exploding.constructed += 1
        raise RuntimeError("Exploding must not be constructed by validate")


class Picky:
    def __init__(self, mode: str = "fast") -> None:
        if mode not in ("fast", "slow"):
            raise ValueError(f"mode must be 'fast' or 'slow', got {mode!r}")
        self.mode = mode


class Flexible:
    def __init__(self, a: int, **extra: Any) -> None:
        self.a, self.extra = a, extra


class HiddenAnnotation:
    """One annotation names a TYPE_CHECKING-only import: it is skipped, the others are still checked."""

    def __init__(self, items: Sequence[int] = (), count: int = 0) -> None:
        self.items, self.count = items, count


class LegacyDefault:
    """`size: int = None` (implicit Optional, common in older code): an explicit null is accepted."""

    def __init__(self, size: int = None) -> None:  # type: ignore[assignment]
        self.size = size


def add(a: int, b: int = 2) -> int:
    return a + b


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class TrainerConfig:
    lr: float = 1e-5
    num_steps: int = 10
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class RequiredConfig:
    name: str
    size: int = 1


def node(component: str, **kwargs: Any) -> dict[str, Any]:
    return {"_component_": f"{HERE}.{component}", **kwargs}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- loading


def test_two_level_base_and_list_of_bases_with_relative_paths() -> None:
    config = load_config(CONFIGS / "sub" / "child.yaml")
    assert config == {
        "trainer": {"lr": 3e-4, "num_steps": 50, "mode": "a", "tags": ["z"]},
        "model": {"_component_": "torch.nn.Linear", "in_features": 4, "out_features": 2, "bias": False},
        "logging": {"every": 5},
    }
    sources = provenance(config)
    assert sources["trainer.num_steps"].endswith("mid.yaml:4")
    assert sources["trainer.lr"].endswith("extra.yaml:3")
    assert sources["trainer.mode"].endswith("root.yaml:5")
    assert sources["trainer.tags"].endswith("child.yaml:4")
    assert "base" not in config


def test_deep_merge_child_wins_lists_replace_and_new_component_replaces_node() -> None:
    base: dict[str, Any] = {"a": {"b": {"c": 1, "d": 2}, "keep": [1, 2]}, "m": {"_component_": "x.A", "alpha": 1}}
    child = {"a": {"b": {"c": 10}, "keep": [3]}, "m": {"_component_": "x.B", "beta": 2}}
    merged = merge_configs(base, child)
    assert merged == {"a": {"b": {"c": 10, "d": 2}, "keep": [3]}, "m": {"_component_": "x.B", "beta": 2}}
    assert base["a"]["b"] == {"c": 1, "d": 2}  # inputs untouched
    same = merge_configs(base, {"m": {"_component_": "x.A", "gamma": 3}})
    assert same["m"] == {"_component_": "x.A", "alpha": 1, "gamma": 3}


def test_overrides_nested_new_types_null_delete_and_list_index() -> None:
    overrides = [
        "trainer.num_steps=7",
        "trainer.lr=2e-5",
        "trainer.mode=null",
        "trainer.tags=[p, q]",
        "trainer.new_knob={x: 1}",
        "model.in_features=[1, 2]",
        "+extra.section.flag=true",
        "~logging.every",
        "trainer.tags.1=r",
    ]
    config = load_config(CONFIGS / "sub" / "child.yaml", overrides)
    assert config["trainer"] == {"lr": 2e-5, "num_steps": 7, "mode": None, "tags": ["p", "r"], "new_knob": {"x": 1}}
    assert config["model"]["in_features"] == [1, 2]
    with pytest.raises(ConfigError, match=r"base: parents are resolved when the file is read"):
        load_config(CONFIGS / "sub" / "child.yaml", ["base=x.yaml"])
    assert config["extra"] == {"section": {"flag": True}}
    assert config["logging"] == {}
    assert provenance(config)["trainer.num_steps"] == "command-line override 'trainer.num_steps=7'"


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("trainr.lr=1", r"trainr: no such section .*did you mean 'trainer'"),
        ("trainer.lr.x=1", r"trainer\.lr: cannot set a key inside float"),
        ("trainer.lr", r"expected key\.path=value"),
        ("trainer.lr=", r"empty override value"),
        ("~trainer.lrr", r"trainer\.lrr: cannot delete .*did you mean 'lr'"),
        ("trainer.tags.5=a", r"not an index of a list of 1 items"),
        ("trainer lr=1", r"bad override"),
        ("trainer.lr=[1, 2", r"malformed YAML"),
    ],
)
def test_bad_overrides(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "sub" / "child.yaml", [override])


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(alphabet=st.characters(codec="ascii", exclude_categories=["Cc"])),
    )
)
def test_override_value_round_trips_json_literals(value: Any) -> None:
    config = apply_overrides(ConfigDict(a=ConfigDict()), [f"a.v={json.dumps(value)}"])
    assert config["a"]["v"] == value and type(config["a"]["v"]) is type(value)


def test_exponent_floats_without_dot_are_floats(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "f.yaml", "eps: 1e-6\nbig: 2E+3\nname: 1e\n"))
    assert config == {"eps": 1e-6, "big": 2000.0, "name": "1e"}
    assert isinstance(config["eps"], float)


def test_malformed_yaml_names_file_and_line() -> None:
    with pytest.raises(ConfigError, match=r"malformed YAML at .*malformed\.yaml:4:.*line 3"):
        load_config(CONFIGS / "malformed.yaml")


def test_duplicate_key_names_both_lines() -> None:
    with pytest.raises(ConfigError, match=r"lr: duplicate key \(first set on line 2\) \(from .*duplicate\.yaml:3\)"):
        load_config(CONFIGS / "duplicate.yaml")


def test_missing_file_and_missing_base_name_the_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(
        ConfigError, match=r"base: config file not found: .*does_not_exist\.yaml .*missing_base\.yaml:1"
    ):
        load_config(CONFIGS / "missing_base.yaml")


def test_base_cycle_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"base cycle: .*cycle_a\.yaml -> .*cycle_b\.yaml -> .*cycle_a\.yaml"):
        load_config(CONFIGS / "cycle_a.yaml")


def test_bad_base_value_and_non_mapping_top_level(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"base: expected a path or a list of paths, got int 3"):
        load_config(write(tmp_path, "b.yaml", "base: 3\n"))
    with pytest.raises(ConfigError, match=r"top level of .* must be a mapping"):
        load_config(write(tmp_path, "l.yaml", "- 1\n- 2\n"))


def test_loaded_config_survives_copy_pickle_json_and_safe_dump() -> None:
    config = load_config(CONFIGS / "sub" / "child.yaml")
    for clone in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone == config and provenance(clone) == provenance(config)
    assert json.loads(json.dumps(config)) == config
    assert yaml.safe_load(yaml.safe_dump(config)) == config


def test_dump_config_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "sub" / "child.yaml")
    config["paths"] = {"out": Path("/tmp/x"), "pair": (1, 2)}
    target = tmp_path / "run" / "config.yaml"
    dump_config(config, target)
    assert load_config(target) == {**config, "paths": {"out": "/tmp/x", "pair": [1, 2]}}
    assert [p.name for p in target.parent.iterdir()] == ["config.yaml"]
    assert format_config({"a": 1e-6}) == "a: 1.0e-06\n"
    with pytest.raises(ConfigError, match=r"x\.y: cannot be written as YAML: object"):
        format_config({"x": {"y": object()}})


# ---------------------------------------------------------------------------------------------- dataclasses


def test_build_dataclass_nested_with_conversions() -> None:
    section = {"lr": 1, "mode": "b", "tags": ["t"], "out_dir": "runs/x", "optim": {"betas": [0.8, 0.9]}}
    built = build_dataclass(TrainerConfig, section, "trainer")
    assert built == TrainerConfig(
        lr=1.0, mode="b", tags=["t"], out_dir=Path("runs/x"), optim=OptimConfig(betas=(0.8, 0.9))
    )
    assert isinstance(built.lr, float) and isinstance(built.optim.betas, tuple)
    assert build_dataclass(TrainerConfig, None) == TrainerConfig()


@dataclass
class RunSpec:
    model: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


def test_sections_kept_by_build_dataclass_still_name_their_file() -> None:
    config = load_config(CONFIGS / "typo_component.yaml", ["trainer.num_steps=many"])
    spec = build_dataclass(RunSpec, config, "")
    assert spec.model is config["model"]
    with pytest.raises(ConfigError, match=r"model\.in_featurs: .*typo_component\.yaml:4"):
        validate(spec.model, "model")
    with pytest.raises(ConfigError, match=r"trainer\.num_steps: .*'trainer\.num_steps=many'"):
        build_dataclass(TrainerConfig, spec.trainer, "trainer")


def test_unknown_key_in_dataclass_names_key_file_and_closest() -> None:
    config = load_config(CONFIGS / "typo_trainer.yaml")
    with pytest.raises(ConfigError) as info:
        build_dataclass(TrainerConfig, config["trainer"], "trainer")
    message = str(info.value)
    assert message.startswith("trainer.num_stpes: unknown key for TrainerConfig")
    assert "typo_trainer.yaml:3" in message and "did you mean 'num_steps'?" in message


@pytest.mark.parametrize(
    ("section", "pattern"),
    [
        ({"num_steps": "ten"}, r"trainer\.num_steps: expected int, got str 'ten'"),
        ({"num_steps": 2.5}, r"trainer\.num_steps: expected int, got float 2\.5"),
        ({"num_steps": True}, r"trainer\.num_steps: expected int, got bool True"),
        ({"mode": "bb"}, r"trainer\.mode: expected one of 'a', 'b', got str 'bb'; did you mean 'b'\?"),
        ({"tags": "x"}, r"trainer\.tags: expected list\[str\], got str 'x'"),
        ({"tags": ["x", 3]}, r"trainer\.tags\.1: expected str, got int 3"),
        ({"optim": {"betas": [0.9]}}, r"trainer\.optim\.betas: expected tuple\[float, float\] \(2 items\)"),
        ({"optim": {"lrr": 1.0}}, r"trainer\.optim\.lrr: unknown key for OptimConfig.*did you mean 'lr'"),
        ({"optim": 3}, r"trainer\.optim: expected OptimConfig, got int 3"),
        ({"out_dir": 5}, r"trainer\.out_dir: expected Path \| None, got int 5"),
        ({"weights": {1: 0.5}}, r"trainer\.weights\.1: expected str, got int 1"),
        ({"weights": {"a": "x"}}, r"trainer\.weights\.a: expected float, got str 'x'"),
    ],
)
def test_dataclass_type_errors(section: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        build_dataclass(TrainerConfig, section, "trainer")


def test_dataclass_missing_required_field_and_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"req\.name: missing required field of RequiredConfig"):
        build_dataclass(RequiredConfig, {"size": 2}, "req")
    with pytest.raises(ConfigError, match=r"req: expected a mapping of RequiredConfig fields, got list"):
        build_dataclass(RequiredConfig, [1], "req")  # type: ignore[arg-type]


def test_check_keys_names_source_and_closest() -> None:
    config = load_config(CONFIGS / "sub" / "child.yaml", ["+trainr.x=1"])
    with pytest.raises(ConfigError, match=r"^trainr: unknown key for config .*'\+trainr\.x=1'.*did you mean 'trainer'"):
        check_keys(config, ["trainer", "model", "logging"])


# ---------------------------------------------------------------------------------------------- components


def test_unknown_key_in_component_names_key_file_and_closest() -> None:
    config = load_config(CONFIGS / "typo_component.yaml")
    with pytest.raises(ConfigError) as info:
        validate(config)
    message = str(info.value)
    assert message.startswith("model.in_featurs: unknown key for torch.nn.Linear")
    assert "typo_component.yaml:4" in message and "did you mean 'in_features'?" in message


def test_wrong_types_in_component_name_the_file() -> None:
    config = load_config(CONFIGS / "bad_types.yaml")
    with pytest.raises(
        ConfigError, match=r"model\.out_features: expected int, got str 'two' \(from .*bad_types\.yaml:5\)"
    ):
        validate(config["model"], "model")
    with pytest.raises(
        ConfigError, match=r"trainer\.num_steps: expected int, got str 'ten' \(from .*bad_types\.yaml:3\)"
    ):
        build_dataclass(TrainerConfig, config["trainer"], "trainer")


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        (node("Leaf", value="3"), r"leaf\.value: expected int, got str '3'"),
        (node("Leaf", value=1, scale="big"), r"leaf\.scale: expected float, got str 'big'"),
        (node("Leaf", value=1, mode="meen"), r"leaf\.mode: expected one of 'sum', 'mean'.*did you mean 'mean'"),
        (node("Leaf", value=1, name=3), r"leaf\.name: expected str \| None, got int 3"),
        (node("Leaf", value=1, valeu=2), r"leaf\.valeu: unknown key for .*Leaf; did you mean 'value'"),
        (node("Leaf", scale=1.0), r"leaf\.value: missing required argument 'value'"),
        (node("Leaf", value=1, _partal_=True), r"leaf\._partal_: unknown reserved key; did you mean '_partial_'"),
        (node("Leaf", value=1, _partial_="yes"), r"leaf\._partial_: expected bool, got str 'yes'"),
        ({"x": {"_partial_": True, "a": 1}}, r"leaf\.x\._partial_: _partial_ without _component_"),
        (node("Tree", left=node("Leaf", value=1), children=[node("Leaf", value="x")]), r"leaf\.children\.0\.value"),
        (
            node("Tree", left=node("Leaf", value=1), children=[], weights={"a": "x"}),
            r"leaf\.weights: entry 'a': expected float, got str 'x'",
        ),
        (node("HiddenAnnotation", count="x"), r"leaf\.count: expected int"),
        (
            {"_component_": "torch.optim.AdamW", "params": [], "lr": "fast"},
            r"leaf\.lr: expected float \| Tensor, got str 'fast'",
        ),
    ],
)
def test_component_validation_errors(config: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        validate(config, "leaf")


def test_missing_module_or_attribute_in_component() -> None:
    config = load_config(CONFIGS / "bad_component.yaml")
    with pytest.raises(ConfigError) as info:
        validate(config["model"], "model")
    assert re.search(r"^model\._component_: 'torch\.nn' has no attribute 'Lineer'", str(info.value))
    assert "bad_component.yaml:2" in str(info.value) and "did you mean 'Linear'?" in str(info.value)
    with pytest.raises(ConfigError, match=r"optimizer\._component_: 'torch' has no attribute 'optimm'.*'optim'"):
        validate(config["optimizer"], "optimizer")
    with pytest.raises(ConfigError, match=r"no module named 'torhc'.*did you mean 'torch'"):
        import_object("torhc.nn.Linear")


def test_import_object_reports_broken_modules_and_non_callables() -> None:
    assert import_object("torch.nn.Linear") is torch.nn.Linear
    assert import_object(f"{HERE}.Tree.__init__") is Tree.__init__
    with pytest.raises(ConfigError, match=r"expected a dotted import path"):
        import_object("")
    with pytest.raises(ConfigError, match=r"x\._component_: 'math\.pi' is not callable"):
        validate({"_component_": "math.pi"}, "x")


def test_instantiate_nested_components_and_lists() -> None:
    config = {
        "tree": node(
            "Tree", left=node("Leaf", value=1), children=[node("Leaf", value=2, scale=3), node("Leaf", value=4)]
        ),
        "plain": [node("Leaf", value=5), {"k": node("add", a=1)}],
    }
    built = instantiate(config)
    tree = built["tree"]
    assert isinstance(tree, Tree) and tree.left.value == 1
    assert [(c.value, c.scale) for c in tree.children] == [(2, 3), (4, 1.0)]
    assert built["plain"][0].value == 5 and built["plain"][1] == {"k": 3}


def test_partial_returns_functools_partial_and_may_leave_required_args() -> None:
    made = instantiate(node("add", b=10, _partial_=True), "fn")
    assert isinstance(made, functools.partial) and made(a=1) == 11
    factory = instantiate({"make": node("Leaf", scale=0.5, _partial_=True)})["make"]
    leaf = factory(value=3)
    assert isinstance(leaf, Leaf) and (leaf.value, leaf.scale) == (3, 0.5)
    with pytest.raises(ConfigError, match=r"fn\.c: unknown key"):
        instantiate(node("add", c=1, _partial_=True), "fn")


def test_runtime_kwargs_count_as_given() -> None:
    config = {"_component_": "torch.optim.AdamW", "lr": 0.01, "betas": [0.8, 0.9]}
    with pytest.raises(ConfigError, match=r"optim\.params: missing required argument 'params'"):
        validate(config, "optim")
    validate({"optim": config}, runtime_kwargs={"optim": ["params"]})
    with pytest.raises(ConfigError, match=r"optim\.betas: expected tuple\[float \| Tensor, float \| Tensor\]"):
        validate({**config, "betas": [0.9]}, "optim", runtime_kwargs={"optim": ["params"]})
    leaf = instantiate(node("Leaf", scale=2.0), "leaf", value=7, scale=3.0)
    assert (leaf.value, leaf.scale) == (7, 3.0)
    with pytest.raises(ConfigError, match=r"runtime arguments \['value'\] given but the node has no _component_"):
        instantiate({"a": 1}, "x", value=7)


def test_validate_does_not_construct_and_instantiate_checks_everything_first() -> None:
    Exploding.constructed = 0
    validate({"a": node("Exploding", size=2), "b": [node("Exploding")]})
    assert Exploding.constructed == 0
    with pytest.raises(ConfigError, match=r"b\.0\.value: missing required argument"):
        instantiate({"a": node("Exploding"), "b": [node("Leaf")]})
    assert Exploding.constructed == 0
    with pytest.raises(RuntimeError, match="must not be constructed"):
        instantiate(node("Exploding"))


def test_constructor_value_error_becomes_config_error_with_path() -> None:
    with pytest.raises(ConfigError, match=r"picky: .*Picky rejected its arguments: mode must be 'fast' or 'slow'"):
        instantiate(node("Picky", mode="medium"), "picky")


def test_implicit_optional_default_accepts_null_only() -> None:
    validate(node("LegacyDefault", size=None), "x")
    with pytest.raises(ConfigError, match=r"x\.size: expected int, got str 'a'"):
        validate(node("LegacyDefault", size="a"), "x")


def test_var_kwargs_targets_accept_extra_keys() -> None:
    built = instantiate(node("Flexible", a=1, anything=[1, 2]))
    assert built.a == 1 and built.extra == {"anything": [1, 2]}
    with pytest.raises(ConfigError, match=r"f\.a: expected int"):
        validate(node("Flexible", a="x", anything=1), "f")


def test_loaded_component_instantiates(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", f"leaf:\n  _component_: {HERE}.Leaf\n  value: 2\n  scale: 1e-3\n")
    config = load_config(path, ["leaf.mode=mean"])
    leaf = instantiate(config["leaf"], "leaf")
    assert (leaf.value, leaf.mode) == (2, "mean") and math.isclose(leaf.scale, 1e-3)
    bad = load_config(path, ["leaf.mode=median"])
    with pytest.raises(ConfigError, match=r"leaf\.mode: expected one of .*'leaf\.mode=median'"):
        instantiate(bad["leaf"], "leaf")
