"""The `server` engine's weight push with two trainer ranks (gloo, `accelerate launch`), under DDP and FSDP2 against
a loopback `PolicyServer` (tests/toolkit/engines/weight_push_ranks.py runs the ranks): one push per weights version
reaches the server, both ranks' rollouts come from the pushed weights, a server restart seen by one rank is
repaired by that rank alone, and a failing push makes both ranks raise the same error, in bounded time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modalities.text_agent.policy_server import PolicyServer
from modalities.text_agent.tools.retriever_server import BadRequest, serving
from tests.tiny import tiny_text_policy
from tests.toolkit.train.test_ddp import free_port
from toolkit.engines.weights import decode_weights

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "tests" / "toolkit" / "engines" / "weight_push_ranks.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
FAILING_VERSION = 4  # pushes of each engine's 4th version fail: 503 twice (retried), then 400 (refused)


class RecordingServer(PolicyServer):
    """serve-policy that records every weight push it takes (`pushes`) and fails those of a 4th version."""

    def __init__(self) -> None:
        super().__init__(tiny_text_policy(seed=1), ("127.0.0.1", 0))
        self.pushes: list[str] = []
        self.failed: list[tuple[str, int]] = []

    def load_weights(self, body: bytes) -> dict[str, Any]:
        version = decode_weights(body)[1]
        number = version.rsplit("-", 1)[-1]
        if number.isdigit() and int(number) >= FAILING_VERSION:
            status = 503 if len(self.failed) % 3 < 2 else 400
            self.failed.append((version, status))
            raise BadRequest(f"weights store unavailable (test) for {version}", status)
        answer = super().load_weights(body)
        self.pushes.append(version)
        return answer


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RecordingServer, list[dict[str, Any]]]]:
    out = tmp_path_factory.mktemp("ranks")
    with serving(RecordingServer()) as server:
        command = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_fsdp.yaml")]
        command += ["--main_process_port", str(free_port()), str(SCRIPT), server.url, str(out)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        reports = [json.loads((out / f"report-rank{rank}.json").read_text()) for rank in (0, 1)]
        yield server, reports


@dataclass
class Phase:
    """One phase's view: the recording server, the engines' session (its versions' prefix) and each rank's report."""

    server: RecordingServer
    session: str
    ranks: list[dict[str, Any]]  # rank order

    def version(self, number: int) -> str:
        return f"{self.session}-{number}"


@pytest.fixture(params=[0, 1], ids=["ddp", "fsdp"])
def phase(launched: tuple[RecordingServer, list[dict[str, Any]]], request: pytest.FixtureRequest) -> Phase:
    server, reports = launched
    ranks = [report["phases"][request.param] for report in reports]
    return Phase(server, ranks[0]["steps"][0]["version"].rsplit("-", 1)[0], ranks)


@pytest.mark.integration
def test_one_push_per_version_reaches_the_server_and_both_ranks_sample_from_it(phase: Phase) -> None:
    rank0, rank1 = phase.ranks
    assert [s["version"] for s in rank0["steps"]] == [phase.version(1), phase.version(2)]
    assert [s["version"] for s in rank1["steps"]] == [phase.version(1), phase.version(2)]
    for step in rank0["steps"] + rank1["steps"]:
        assert step["pushed"] == 1.0 and step["retries"] == 0.0
        assert step["mismatch"] < 1e-5, step  # each rank's rollout came from this step's pushed weights
        assert step["whole"]  # reading the weights left FSDP's gathered weights unsharded
    # One push per version (rank 0's), plus version 3 sent again by rank 1 alone after the restart it saw.
    pushed = [v for v in phase.server.pushes if v.startswith(phase.session)]
    assert pushed == [phase.version(n) for n in (1, 2, 3, 3)]
    assert rank0["pushes"] == 3 and rank1["pushes"] == 1


@pytest.mark.integration
def test_a_restart_seen_by_one_rank_is_repaired_by_that_rank_alone(phase: Phase) -> None:
    rank0, rank1 = (rank["repaired"] for rank in phase.ranks)
    assert rank1["retries"] == 1.0 and rank1["pushes"] == 1 and rank1["pushed"] == 0.0  # 409, resent, retried
    assert rank0["retries"] == 0.0 and rank0["pushes"] == 3  # the server had version 3 again: no 409 for rank 0
    assert rank0["version"] == rank1["version"] == phase.version(3)
    assert rank0["mismatch"] < 1e-5 and rank1["mismatch"] < 1e-5


@pytest.mark.integration
def test_a_failing_push_makes_every_rank_raise_the_same_error(phase: Phase) -> None:
    rank0, rank1 = (rank["failures"] for rank in phase.ranks)
    assert rank0 == [{**f, "seconds": r["seconds"]} for f, r in zip(rank1, rank0, strict=True)]  # same errors
    retried, refused = rank0
    assert retried["type"] == "EngineUnavailableError"
    assert "failed 2 attempts" in retried["error"] and "sent by rank 0 for all 2 ranks" in retried["error"]
    assert "HTTP 503" in retried["error"]
    assert refused["type"] == "ValueError" and "400" in refused["error"]
    assert all(f["seconds"] < 10 for f in rank0 + rank1)  # no rank waited on another
    failed = [status for version, status in phase.server.failed if version.startswith(phase.session)]
    assert failed == [503, 503, 400]  # rank 0 alone pushed: 2 attempts, then 1 (not 2 per rank)
