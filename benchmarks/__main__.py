"""Command line: `python -m benchmarks NAME` runs one benchmark, `all` runs them all.

Each run writes a JSON result file and a Markdown page (machine, command, date,
commit and one table per benchmark) to benchmarks/results/.
"""

from __future__ import annotations

import datetime
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from benchmarks import (
    _machine,
    _netguard,
    failure,
    memory,
    mixed,
    overhead,
    real_model,
    scaling,
)
from benchmarks._report import traffic_section, write

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Benchmark name, its module and the options of a short smoke run (--quick).
BENCHMARKS: dict[str, tuple[ModuleType, dict[str, Any]]] = {
    "scaling": (
        scaling,
        {"instance_counts": (1, 4), "per_instance": 20, "max_requests": 100},
    ),
    "mixed": (mixed, {"requests": 80}),
    "failure": (failure, {"requests": 240, "strategies": ("round_robin",)}),
    "overhead": (overhead, {"requests_per_round": 20, "rounds": 2, "peer_rounds": 1}),
    "memory": (memory, {"record_counts": (200, 1000)}),
    "real-model": (real_model, {"questions": 4}),
}
PEERS = {"scaling", "mixed", "overhead"}


def _options(name: str, quick: bool, peers: bool) -> dict[str, Any]:
    options = dict(BENCHMARKS[name][1]) if quick else {}
    if name in PEERS:
        options["peers"] = peers
    return options


def _run_one(
    name: str, quick: bool, peers: bool
) -> tuple[dict[str, Any], str, _netguard.ForeignHostError | None]:
    """Run one benchmark; return its result, its Markdown and any network stop."""
    module = BENCHMARKS[name][0]
    click.echo(f"== {name}", err=True)
    started = time.perf_counter()
    stopped = None
    try:
        result = module.main(**_options(name, quick, peers))
        text = module.markdown(result)
    except _netguard.ForeignHostError as exc:
        # Stop at once: a client tried to reach another host.
        stopped = exc
        result = {"name": name, "error": str(exc)}
        text = f"Stopped: {exc}\n"
    except Exception as exc:  # Record the failure and go on with the others.
        traceback.print_exc()
        result = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        text = f"Failed: {result['error']}\n"
    result["seconds"] = time.perf_counter() - started
    click.echo(text, err=True)
    return result, text, stopped


def _run(
    names: list[str], quick: bool, peers: bool, output: Path | None, settle: float
) -> None:
    _netguard.install()
    _machine.settle_seconds = settle
    command = "python -m benchmarks " + shlex.join(sys.argv[1:])
    results: dict[str, Any] = {
        "command": command,
        "machine": _machine.describe(),
        "benchmarks": {},
    }
    sections = []
    stopped = None
    for name in names:
        result, text, stopped = _run_one(name, quick, peers)
        results["benchmarks"][name] = result
        sections.append((f"{name} ({result['seconds']:.0f} s)", text))
        if stopped is not None:
            break

    results["network_guard"] = {"blocked_attempts": _netguard.violations()}
    sections.append(("Network check", traffic_section(results)))
    if output is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        label = "all" if len(names) > 1 else names[0]
        output = RESULTS_DIR / f"{label}-{stamp}"
    json_path, markdown_path = write(results, sections, output)
    click.echo(f"wrote {json_path} and {markdown_path}", err=True)

    if stopped is not None or _netguard.violations():
        raise click.ClickException(
            "a client tried to reach a host other than 127.0.0.1; see the "
            "Network check section of the results"
        )


_quick = click.option(
    "--quick", is_flag=True, help="Run a short smoke version with few requests."
)
_peers = click.option(
    "--peers/--no-peers",
    default=True,
    show_default=True,
    help="Also measure LiteLLM's Router where the benchmark has peers.",
)
_settle = click.option(
    "--settle",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds to wait at most, before each timed run, for the machine to be "
    "quiet (under 0.3 busy cores); for shared machines.",
)
_output = click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Result path without suffix; .json and .md are added. "
    "[default: benchmarks/results/NAME-DATE-TIME]",
)


@click.group()
def main() -> None:
    """Benchmarks of ollama-pool against the ideal and against LiteLLM's Router.

    Every server runs on 127.0.0.1 in a child process, and every process a
    benchmark starts is stopped before it returns.
    """


def _command(name: str) -> Callable[..., None]:
    module = BENCHMARKS[name][0]

    @_quick
    @_peers
    @_settle
    @_output
    def command(quick: bool, peers: bool, settle: float, output: Path | None) -> None:
        _run([name], quick, peers, output, settle)

    command.__doc__ = (module.__doc__ or "").split("\n")[0]
    return main.command(name)(command)


for _name in BENCHMARKS:
    _command(_name)


@main.command("all")
@_quick
@_peers
@_settle
@_output
@click.option(
    "--skip",
    multiple=True,
    type=click.Choice(list(BENCHMARKS)),
    help="Leave out this benchmark; repeat for several.",
)
def run_all(
    quick: bool,
    peers: bool,
    settle: float,
    output: Path | None,
    skip: tuple[str, ...],
) -> None:
    """Run every benchmark and write one result file for all of them."""
    names = [name for name in BENCHMARKS if name not in skip]
    _run(names, quick, peers, output, settle)


if __name__ == "__main__":
    main()
