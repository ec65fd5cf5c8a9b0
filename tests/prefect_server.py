"""A real `prefect server start` on a free loopback port, and the `prefect` CLI as a user types it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


@contextmanager
def prefect_server(tmp_path: Path, log):
    """Start `prefect server start`; yield the environment (PREFECT_API_URL, PATH) its clients use."""
    api = f"http://127.0.0.1:{free_port()}/api"
    env = dict(os.environ, PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               COLUMNS="250")  # the CLI's tables are cut to the terminal width
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    port = api.rsplit(":", 1)[1].split("/")[0]
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port, "--no-ui"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"{api}/health", 600)  # start-up takes minutes on a loaded machine
        yield env
    finally:
        stop([server])


def prefect(env: dict, *args: str, cwd: Path | None = None, timeout: float = 600) -> str:
    """One `prefect ...` command; its output, or an assertion error with it when it fails."""
    p = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"prefect {' '.join(args)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout
