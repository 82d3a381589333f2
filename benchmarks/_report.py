"""Result files: one JSON document and one Markdown page per run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(" --- " for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine_section(machine: dict[str, Any], command: str) -> str:
    packages = ", ".join(
        f"{name} {version}"
        for name, version in machine["packages"].items()
        if version is not None
    )
    load = ", ".join(f"{value:.2f}" for value in machine["load_average_at_start"])
    dirty = " (with uncommitted changes)" if machine["git_dirty"] else ""
    return (
        f"- Command: `{command}`\n"
        f"- Date: {machine['date']}\n"
        f"- Commit: {machine['git_commit']}{dirty}\n"
        f"- Machine: {machine['nproc']} cores ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, {machine['platform']}, "
        f"Python {machine['python']}\n"
        f"- Packages: {packages}\n"
        f"- Load average when the run started (1, 5, 15 min): {load}\n"
    )


def write(
    results: dict[str, Any], sections: Sequence[tuple[str, str]], output: Path
) -> tuple[Path, Path]:
    """Write `output`.json and `output`.md; return both paths."""
    output.parent.mkdir(parents=True, exist_ok=True)
    json_path = output.with_suffix(".json")
    markdown_path = output.with_suffix(".md")
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    parts = [machine_section(results["machine"], results["command"])]
    for title, text in sections:
        parts.append(f"\n### {title}\n\n{text}")
    markdown_path.write_text("".join(parts))
    return json_path, markdown_path


def traffic_section(results: dict[str, Any]) -> str:
    """Compare the requests each LiteLLM run sent with those the stand-ins served."""
    lines = []
    for name, result in results["benchmarks"].items():
        for row in result.get("rows", []):
            if "served" not in row or not row["client"].startswith("LiteLLM"):
                continue
            served = row["served"]
            lines.append(
                f"- {name}, {row['client']}"
                + (f", N={row['instances']}" if "instances" in row else "")
                + f": sent {row['requests']}, served {served['chat_requests']} by "
                f"stand-ins on {', '.join(served['hosts'])}, paths {served['paths']}"
            )
    blocked = results["network_guard"]["blocked_attempts"]
    lines.append(
        f"- Connection or name lookup attempts to hosts other than loopback, "
        f"blocked by the audit hook: {len(blocked)}"
        + (f" ({'; '.join(blocked[:5])})" if blocked else "")
    )
    return "\n".join(lines) + "\n"
