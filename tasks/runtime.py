"""Process-wide settings that keep Prefect, Ray and DVC offline, quiet and inside the project.

Call :func:`configure_environment` before Prefect, Ray or OpenGL is imported (``flows/__init__``
does). Values the user already exported win: everything here is a default.
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tasks.params import project_root


def configure_environment(root: Path | None = None) -> None:
    root = Path(root or project_root())
    defaults = {
        # Prefect: project-local home, no telemetry, patient start-up of the temporary server.
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
        # Ray: no usage stats, no auth token in ~/.ray, socket paths short enough (< 107 bytes).
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": str(Path(tempfile.gettempdir()) / f"pics-ray-{os.getuid()}"),
        "RAY_DEDUP_LOGS": "0",
        # DVC: no analytics process phoning home.
        "DVC_NO_ANALYTICS": "1",
        # Headless GL: EGL works on Mesa llvmpipe and on NVIDIA; pyglet has no display here.
        "PYOPENGL_PLATFORM": "egl",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)


_watchdog_pid: int | None = None


def start_watchdog() -> int | None:
    """Start, once per process, the watchdog (``tasks/watchdog.py``) that ends everything this
    process starts (Prefect's temporary server, Ray, DVC...) when this process ends, even by SIGKILL,
    which no ``atexit`` hook sees. Returns its pid; None where there is no ``/proc`` (not Linux).
    """
    global _watchdog_pid
    if _watchdog_pid is not None or not Path("/proc/self/stat").exists():
        return _watchdog_pid
    import uuid

    from tasks import watchdog

    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != watchdog.TOKEN_VAR}
    # Inherited by every process started from now on: a fresh token per driver, so a driver that a
    # driver started (DVC stages of `pics pipeline`) answers to a watchdog of its own.
    os.environ[watchdog.TOKEN_VAR] = token
    devnull = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    # posix_spawn, not subprocess: no Popen object that warns at exit about a child still running;
    # /dev/null for stdio so that a reader of this process's output is not kept waiting by it.
    _watchdog_pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", watchdog.__file__,
                                                    str(os.getpid()), token], env,
                                   file_actions=devnull, setsid=True)
    return _watchdog_pid


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int = 500):
    """Connect to ``address`` (a cluster) or start a local Ray once per process; returns ray."""
    import ray

    if ray.is_initialized():
        return ray
    configure_environment()
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "ignore_reinit_error": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus
        kwargs["object_store_memory"] = object_store_mb * 1024 * 1024
        kwargs["_temp_dir"] = os.environ["RAY_TMPDIR"]
    ray.init(**kwargs)
    return ray


@contextmanager
def shared_prefect_server() -> Iterator[str]:
    """One temporary Prefect server for every process started inside (exported as
    ``PREFECT_API_URL``): ``dvc repro`` runs each stage in a process of its own, which would
    otherwise start and stop a server of its own (about 20-30 s a stage on 2 cores). A server the
    user already configured wins. Yields the API URL."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    configure_environment()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
