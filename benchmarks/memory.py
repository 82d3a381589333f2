"""Memory: peak RSS of the batch command as its input grows.

The `ollama-pool batch` command runs as a child process against fast stand-ins
(no delay) in another child process. Its peak RSS is the VmHWM line of
/proc/self/status, which the child writes to a file as it exits
(`benchmarks/_peak_rss.py`). The child's
`ru_maxrss` (from `os.wait4`) is not used: on Linux it also counts the peak RSS
of the parent at the time of the fork, here the benchmark process with LiteLLM
loaded, and so it hides the child's own peak. Each record carries a filler
field, so an input held in memory whole would show up in the peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks._clients import MODEL
from benchmarks._fleet import FleetProcess
from benchmarks._report import fmt, table

NAME = "memory"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_CHAIN = "benchmarks._chains:question_chain"
# Seconds one batch run may take before it is killed.
_RUN_TIMEOUT = 600


def write_input(path: Path, count: int, filler_bytes: int) -> None:
    filler = "x" * filler_bytes
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            record = {
                "id": f"r{index}",
                "question": f"What is {index} plus one?",
                "context": filler,
            }
            handle.write(json.dumps(record) + "\n")


def write_config(path: Path, urls: Sequence[str], workers: int) -> None:
    config = {
        "llm": {
            "ollama": {
                "model": MODEL,
                "multiple_instances": {
                    "enabled": True,
                    "load_balancing": "least_active",
                    "instances": [{"base_url": url, "model": MODEL} for url in urls],
                },
            }
        },
        "performance": {"num_workers": workers},
    }
    path.write_text(yaml.safe_dump(config))


def run_batch(workdir: Path, count: int, config: Path) -> dict[str, Any]:
    """Run the batch command on `count` records; return its peak RSS and time."""
    input_path = workdir / f"input-{count}.jsonl"
    output_path = workdir / f"output-{count}.jsonl"
    summary_path = workdir / f"summary-{count}.json"
    peak_path = workdir / f"peak-{count}.txt"
    command = [
        sys.executable,
        "-m",
        "benchmarks._peak_rss",
        str(peak_path),
        "batch",
        str(input_path),
        str(output_path),
        "--config",
        str(config),
        "--chain",
        _CHAIN,
        "--no-progress",
        "--summary-json",
        str(summary_path),
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=_REPO_ROOT, stdout=subprocess.DEVNULL)
    killer = threading.Timer(_RUN_TIMEOUT, process.kill)
    killer.start()
    try:
        # wait4 reaps the child and returns its resource usage, peak RSS included.
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        killer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    with output_path.open(encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle if line.strip()]
    errors = sum(1 for line in lines if line.get("error"))
    return {
        "records": count,
        "input_mib": input_path.stat().st_size / 2**20,
        "exit_code": process.returncode,
        "output_lines": len(lines),
        "error_lines": errors,
        "wall_seconds": wall,
        "records_per_second": count / wall,
        "peak_rss_mib": int(peak_path.read_text()) / 1024,
        # Polluted by the parent's peak at fork time; kept to show the difference.
        "ru_maxrss_mib": usage.ru_maxrss / 1024,
        "child_cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


def run(
    record_counts: Sequence[int] = (1000, 10000),
    instances: int = 4,
    filler_bytes: int = 2048,
    workers: int = 8,
) -> dict[str, Any]:
    rows = []
    with (
        FleetProcess([{"first_token_delay": 0.0}] * instances) as fleet,
        tempfile.TemporaryDirectory(prefix="ollama-pool-memory-") as tmp,
    ):
        workdir = Path(tmp)
        config = workdir / "config.yaml"
        write_config(config, fleet.urls, workers)
        for count in record_counts:
            write_input(workdir / f"input-{count}.jsonl", count, filler_bytes)
            row = run_batch(workdir, count, config)
            rows.append(row)
            print(
                f"  {count} records: peak RSS {row['peak_rss_mib']:.1f} MiB, "
                f"{row['records_per_second']:.0f} records/s, exit {row['exit_code']}",
                flush=True,
            )
        served = sum(server["chat_requests"] for server in fleet.stats()["servers"])
    smallest, largest = rows[0], rows[-1]
    return {
        "name": NAME,
        "params": {
            "record_counts": list(record_counts),
            "instances": instances,
            "filler_bytes": filler_bytes,
            "workers": workers,
            "chain": _CHAIN,
            "target": "peak RSS flat as the input grows",
        },
        "rows": rows,
        "chat_requests_served": served,
        "peak_rss_growth_mib": largest["peak_rss_mib"] - smallest["peak_rss_mib"],
        "peak_rss_ratio": largest["peak_rss_mib"] / smallest["peak_rss_mib"],
    }


def markdown(result: dict[str, Any]) -> str:
    headers = [
        "records",
        "input MiB",
        "peak RSS MiB",
        "records/s",
        "output lines",
        "error lines",
        "exit code",
    ]
    body = [
        [
            row["records"],
            fmt(row["input_mib"], 1),
            fmt(row["peak_rss_mib"], 1),
            fmt(row["records_per_second"], 0),
            row["output_lines"],
            row["error_lines"],
            row["exit_code"],
        ]
        for row in result["rows"]
    ]
    note = (
        f"Peak RSS grew by {result['peak_rss_growth_mib']:.1f} MiB "
        f"({result['peak_rss_ratio']:.3f}x) from the smallest to the largest input.\n\n"
    )
    return note + table(headers, body)


def main(**options: Any) -> dict[str, Any]:
    return run(**options)
