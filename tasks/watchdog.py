"""Ends every process a pics driver started once the driver is gone, however it ended (SIGKILL too).

Prefect's temporary API server (a uvicorn subprocess stopped by an ``atexit`` hook) and Ray's
agents outlive a driver killed with SIGKILL. :func:`tasks.runtime.start_watchdog` runs this file as
``python -I -S watchdog.py DRIVER_PID TOKEN``, standard library only, in a session of its own (a
Ctrl-C or a signal to the driver's process group leaves it running). While the driver lives, it
records the driver's descendants every SCAN_S; once its parent is no longer the driver (checked
every POLL_S), it sends SIGTERM to every recorded process still alive (same pid and start time),
their descendants and every process whose environment carries ``PICS_RUN_TOKEN=TOKEN`` (a child
started and orphaned between two scans; Ray's process titles overwrite the environment, hence the
scans), then SIGKILL to whatever is left after GRACE_S, and exits.
"""
import os
import signal
import sys
import time

TOKEN_VAR = "PICS_RUN_TOKEN"
POLL_S = 0.1  # a getppid() call
SCAN_S = 1.0  # a read of every /proc/PID/stat: about 4 ms of CPU for 140 processes
# A child born and orphaned (and renamed, which wipes its environ) between two scans escapes: scan
# faster while the driver is young, when Prefect and Ray start their processes.
STARTUP_SCAN_S, STARTUP_S = 0.2, 120.0
GRACE_S = 3.0


def scan() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every live process (zombies left out)."""
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
        if fields[0] != b"Z":
            procs[int(name)] = (int(fields[1]), fields[19].decode())
    return procs


def descendants(roots: set[int], procs: dict[int, tuple[int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def carrying(token: str, pids) -> set[int]:
    """Those of ``pids`` started with the token in their environment (readable for our own processes)."""
    needle = f"\0{TOKEN_VAR}={token}\0".encode()
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in b"\0" + f.read():
                    found.add(pid)
        except OSError:
            continue
    return found


def main(driver: int, token: str) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # this process must outlive the driver's own shutdown
    me = os.getpid()
    known: dict[int, str] = {}  # pid -> start time of the driver's descendants seen so far
    next_scan = 0.0
    started = time.monotonic()
    while os.getppid() == driver:
        if time.monotonic() >= next_scan:
            procs = scan()
            known.update({p: procs[p][1] for p in descendants({driver}, procs) if p != me})
            young = time.monotonic() - started < STARTUP_S
            next_scan = time.monotonic() + (STARTUP_SCAN_S if young else SCAN_S)
        time.sleep(POLL_S)

    def left() -> set[int]:
        procs = scan()
        alive = {p for p, start in known.items() if procs.get(p, (0, ""))[1] == start}
        alive |= descendants(alive, procs) | carrying(token, procs)
        alive.discard(me)
        known.update({p: procs[p][1] for p in alive if p in procs})
        return alive

    signalled: set[int] = set()
    deadline = time.monotonic() + GRACE_S
    while (pids := left()) and time.monotonic() < deadline:
        for pid in pids - signalled:  # SIGTERM first: Ray and uvicorn then remove their sockets and files
            _kill(pid, signal.SIGTERM)
        signalled |= pids
        time.sleep(0.1)
    for _ in range(3):  # processes spawned while the others were ending
        for pid in left():
            _kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:  # ended meanwhile
        pass


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
