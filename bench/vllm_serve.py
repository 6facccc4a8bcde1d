"""A `vllm serve` subprocess on loopback for the benches: its command line, started in its own process group, ready
when GET /health answers 200, and stopped (the whole group: the API server and its engine core) when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # loopback only


def vllm_launcher() -> list[str]:
    """The `vllm` command beside this interpreter, else vLLM's CLI module run by it."""
    script = Path(sys.executable).with_name("vllm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def vllm_serve_command(launcher: list[str], model: str, port: int, options: Mapping[str, Any]) -> list[str]:
    """`<launcher> serve MODEL --host 127.0.0.1 --port PORT --<option> <value> ...` (a True value is a bare flag).

    Raises:
        ValueError: an option that would bind elsewhere than loopback (`host`, `port` are set here).
    """
    taken = sorted({"host", "port"} & set(options))
    if taken:
        raise ValueError(f"options {taken} are set by vllm_serve_command (loopback, the chosen port)")
    command = [*launcher, "serve", model, "--host", HOST, "--port", str(port)]
    for name, value in options.items():
        command += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return command


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def vllm_server(model: str, options: Mapping[str, Any], log: Path, timeout_s: float = 300.0) -> Iterator[str]:
    """Serve `model` with `options` while the block runs; yields the API root (`http://127.0.0.1:PORT/v1`).

    Raises:
        RuntimeError: the server exited or was not healthy after `timeout_s` (the log's last lines are named).
    """
    port = free_port()
    with log.open("w") as sink:
        command = vllm_serve_command(vllm_launcher(), model, port, options)
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://{HOST}:{port}", server, timeout_s, log)
        yield f"http://{HOST}:{port}/v1"
    finally:
        stop(server)


def wait_healthy(root: str, server: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    """Poll GET {root}/health until it answers 200; RuntimeError with the log's tail if the server exits first or
    `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{root}/health", timeout=5) as response:  # noqa: S310
            if response.status == 200:
                return
        time.sleep(1.0)
    state = f"exited with {server.returncode}" if server.poll() is not None else f"not healthy after {timeout_s:.0f} s"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise RuntimeError(f"vllm serve {state} (log {log}):\n{tail}")


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, SIGKILL it after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
