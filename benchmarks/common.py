"""Helpers the benchmarks share (imported as ``benchmarks.common``: each benchmark puts the
repository on ``sys.path`` first). Run on its own, this file does nothing."""
from __future__ import annotations

import time


class Clock:
    """Wall and CPU time (all threads of this process, llvmpipe's included) of one section."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c
