"""A stand-in for W&B (not installed here) that accelerate builds for the "wandb" tracker, shared by the tests.

`StandInWandB` records its init kwargs, stored config, `define_metric` calls and logs, and follows W&B's step
rule; the `fake_wandb` fixture installs it with a `wandb` module whose `Table` keeps its columns and data.
"""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

import toolkit.io.trackers as trackers


class StandInWandB:
    """Records what accelerate's init_trackers builds a wandb tracker with, and what is logged to it.

    Logging follows W&B: a call with `step=` below the run's next step is dropped; without `step=` it is
    recorded at the next step. `server` keeps each run id's next step and history across trackers (resumes).
    """

    name = "wandb"
    requires_logging_directory = False
    main_process_only = False
    built: list[StandInWandB] = []
    server: dict[str, dict[str, Any]] = {}

    def __init__(self, run_name: str, **kwargs: Any) -> None:
        self.run_name, self.init_kwargs = run_name, kwargs
        self.config: dict[str, Any] = {}
        self.logged: list[tuple[int | None, dict[str, Any]]] = []
        self.dropped: list[tuple[int, dict[str, Any]]] = []
        self.step_metrics: list[tuple[str, dict[str, Any]]] = []
        self.run = SimpleNamespace(define_metric=lambda name, **kw: self.step_metrics.append((name, kw)))
        self.finished = False
        StandInWandB.built.append(self)

    def start(self) -> None:
        pass

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self.config = values

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        state = StandInWandB.server.setdefault(str(self.init_kwargs.get("id")), {"next": 0, "history": []})
        at = state["next"] if step is None else step
        if at < state["next"]:
            self.dropped.append((at, values))
            return
        self.logged.append((step, values))
        state["history"].append(values)
        state["next"] = at + 1

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> type[StandInWandB]:
    """Installs the stand-in: a `wandb` module, accelerate building StandInWandB for "wandb", no runs yet."""
    import accelerate.accelerator
    import accelerate.tracking

    module = ModuleType("wandb")
    module.Table = lambda columns, data: SimpleNamespace(columns=columns, data=data)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setitem(accelerate.accelerator.LOGGER_TYPE_TO_CLASS, "wandb", StandInWandB)
    monkeypatch.setattr(accelerate.tracking, "filter_trackers", lambda names, logging_dir=None: list(names))
    monkeypatch.setattr(trackers, "_has_module", lambda module: True)
    monkeypatch.setattr(StandInWandB, "built", [])
    monkeypatch.setattr(StandInWandB, "server", {})
    return StandInWandB
