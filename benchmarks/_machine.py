"""The machine, the date, the versions and the load a benchmark ran with."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

_REPO_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("ollama-pool", "langchain-ollama", "langchain-core", "ollama", "httpx")
_PEER_PACKAGES = ("litellm", "llama-cpp-python")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe() -> dict[str, Any]:
    """Return the facts every result file records."""
    memory = psutil.virtual_memory().total
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "src", "benchmarks")),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(memory / 2**30, 1),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in (*_PACKAGES, *_PEER_PACKAGES)},
        "load_average_at_start": list(os.getloadavg()),
    }


class MachineLoad:
    """CPU time the whole machine spent busy between `start()` and `stop()`.

    Read from /proc/stat, so it counts every process, including other users'
    work on a shared machine.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float] | None = None

    @staticmethod
    def _sample() -> tuple[float, float]:
        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        total = sum(times)
        return total - idle, total

    def start(self) -> None:
        self._start = self._sample()

    def busy_cores(self) -> float:
        """Return the average number of busy cores since `start()`."""
        if self._start is None:
            raise RuntimeError("call start() first")
        busy_before, total_before = self._start
        busy, total = self._sample()
        elapsed_cpu = total - total_before
        if elapsed_cpu <= 0:
            return 0.0
        return (busy - busy_before) / elapsed_cpu * (os.cpu_count() or 1)


# Seconds to wait at most for other work on the machine to calm down before each
# timed run; set by the --settle option. 0 starts at once.
settle_seconds = 0.0
# Busy cores (of the whole machine, over one second) below which it counts as quiet.
QUIET_BUSY_CORES = 0.3


def settle() -> float:
    """Wait until the machine is quiet or `settle_seconds` have passed.

    Returns the busy cores of the last one-second sample, so a result can show
    how loaded the machine was when its run started.
    """
    deadline = time.monotonic() + settle_seconds
    while True:
        load = MachineLoad()
        load.start()
        time.sleep(1.0)
        busy = load.busy_cores()
        if busy < QUIET_BUSY_CORES or time.monotonic() >= deadline:
            return busy
