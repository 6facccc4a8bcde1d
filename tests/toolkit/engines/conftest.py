"""A `renorm serve-policy` server on a loopback thread, serving a tiny policy whose weights differ from the test's
(seed 1) until the `server` engine pushes them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from modalities.text_agent.policy_server import PolicyServer
from modalities.text_agent.tools.retriever_server import serving
from tests.tiny import tiny_text_policy


@pytest.fixture(scope="module")
def policy_server() -> Iterator[PolicyServer]:
    with serving(PolicyServer(tiny_text_policy(seed=1), ("127.0.0.1", 0))) as server:
        yield server
