"""Run the ollama-pool command line and write its peak RSS to a file at exit.

Usage: `python -m benchmarks._peak_rss PEAK_FILE ARGS...`, where ARGS are those
of `ollama-pool`. PEAK_FILE receives the VmHWM value of /proc/self/status in
KiB: the high-water mark of this process's own memory since its exec.
"""

from __future__ import annotations

import atexit
import re
import sys
from pathlib import Path


def _write_peak(path: Path) -> None:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    path.write_text(match.group(1) if match else "")


def main() -> None:
    peak_path = Path(sys.argv.pop(1))
    atexit.register(_write_peak, peak_path)
    from ollama_pool.cli import main as cli_main

    cli_main(prog_name="ollama-pool")


if __name__ == "__main__":
    main()
