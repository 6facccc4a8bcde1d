"""`renorm serve-policy` on the fast demo config for the tests that train through it: as a loopback subprocess
(start it, kill it as a crash would), and its server brought back on the same port in this process (`Restart`), as
a server restarted where a trainer already points.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from modalities.text_agent.policy_server import PolicyServer
from tests.demo_run import DEMO, FAST, ROOT
from toolkit.config import instantiate, load_config


def start_server(log: Path) -> tuple[subprocess.Popen[str], str]:
    """`serve-policy` on the demo config, as a subprocess on a free loopback port; (process, API url)."""
    threads = f"trainer.num_threads={torch.get_num_threads()}"  # the trainer's thread count: bitwise-equal math
    command = [sys.executable, "-m", "modalities.text_agent.serve_policy", str(DEMO), *FAST, threads, "--port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as stderr:  # the child keeps its own handle on the file
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()  # "serving ... at http://127.0.0.1:PORT/v1", once it listens
    match = re.search(r"at (http://127\.0\.0\.1:\d+/v1)$", line.strip())
    if match is None:
        stop_server(process)
        raise AssertionError(f"serve-policy did not start: {line!r}\n{log.read_text()}")
    return process, match.group(1)


def stop_server(process: subprocess.Popen[str]) -> None:
    """Kill the server (SIGKILL: no clean shutdown, as a crash) and reap it; a no-op when it is gone already."""
    process.kill()
    process.wait(timeout=30)
    if process.stdout is not None:
        process.stdout.close()


def port_of(url: str) -> int:
    """The port of a server's API url."""
    port = urlsplit(url).port
    assert port is not None, url
    return port


def demo_policy() -> Any:
    """A fresh copy of the policy `serve-policy` serves for the demo config, with its initial weights."""
    return instantiate(load_config(DEMO, FAST)["policy"], where="policy")


class Restart:
    """serve-policy's server brought back on `port`, `delay_s` after `begin()`, serving its initial weights (as a
    restarted process does) — in this process, on a daemon thread: a new serve-policy process costs ~4 s of CPU.

    The policy is built here, before any trainer (building it later could race a training step for torch's RNG).
    """

    def __init__(self, port: int, delay_s: float = 0.3) -> None:
        self.port, self.delay_s = port, delay_s
        self.policy = demo_policy()
        self.server: PolicyServer | None = None
        self._timer: threading.Timer | None = None

    def begin(self) -> None:
        """Start the countdown (the old server must be gone by the time it ends: the port is bound then)."""
        self._timer = threading.Timer(self.delay_s, self.serve)
        self._timer.start()

    def serve(self) -> None:
        """Bind the port and serve now."""
        self.server = PolicyServer(self.policy, ("127.0.0.1", self.port))
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        """Cancel the countdown, or shut the restarted server down."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
