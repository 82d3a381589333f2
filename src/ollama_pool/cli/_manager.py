"""Commands that start, stop and inspect local Ollama instances.

They replace the usual folder of shell scripts (start, stop, status, pull, ...).
The logic lives in `ollama_pool._manager.InstanceManager`; this module parses
options, prints and turns `OllamaPoolError` into a message and exit code 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from ollama_pool._errors import OllamaPoolError
from ollama_pool._manager import (
    DEFAULT_COUNT,
    DEFAULT_HOST,
    DEFAULT_LOG_DIR,
    DEFAULT_MODEL,
    DEFAULT_PORT,
    DEFAULT_STATE_DIR,
    OLLAMA_BIN_ENV,
    InstanceManager,
    InstanceRecord,
    InstanceStatus,
    ManagerError,
    PullProgress,
    check_instances_config,
    follow_log,
    read_last_lines,
    send_test_chat,
)
from ollama_pool.cli import main

F = TypeVar("F", bound=Callable[..., Any])

_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
_DEFAULT_PROMPT = "Why is the sky blue? Answer in two sentences."


# -- shared options and helpers ---------------------------------------------


def _state_options(func: F) -> F:
    """Add --state-dir and --log-dir, which every command shares."""
    func = click.option(
        "--log-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_LOG_DIR,
        show_default=True,
        envvar="OLLAMA_POOL_LOG_DIR",
        help="Folder of the instance logs, one ollama_PORT.log each.",
    )(func)
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_STATE_DIR,
        show_default=True,
        envvar="OLLAMA_POOL_STATE_DIR",
        help="Folder of the state file that records the started PIDs.",
    )(func)


def _binary_option(func: F) -> F:
    return click.option(
        "--ollama-bin",
        default=None,
        envvar=OLLAMA_BIN_ENV,
        help=f"Ollama executable, run as 'BIN serve' [default: ollama on PATH; "
        f"env {OLLAMA_BIN_ENV}].",
    )(func)


def _start_options(*, defaults: bool) -> Callable[[F], F]:
    """Add the options of start; restart leaves them unset to keep recorded values."""

    def default(value: Any) -> Any:
        return value if defaults else None

    options = [
        click.option(
            "--port",
            type=click.IntRange(1, 65535),
            default=default(DEFAULT_PORT),
            show_default=defaults,
            help="Port of the first instance; instance i listens on PORT+i.",
        ),
        click.option(
            "--model",
            default=default(DEFAULT_MODEL),
            show_default=defaults,
            help="Model recorded for the instances and written by --write-config. "
            "Starting does not pull it: run 'ollama-pool pull'.",
        ),
        click.option(
            "--host",
            default=default(DEFAULT_HOST),
            show_default=defaults,
            help="Address the instances listen on (OLLAMA_HOST).",
        ),
        click.option(
            "--gpus",
            default=None,
            help="Comma-separated GPU ids, e.g. 0,1. Instance i sees only GPU "
            "i modulo their number (CUDA_VISIBLE_DEVICES).",
        ),
        click.option(
            "--models-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Models folder (OLLAMA_MODELS) that all instances share "
            "[default: OLLAMA_MODELS of this shell, else Ollama's default].",
        ),
        click.option(
            "--write-config",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="YAML config whose llm.ollama.multiple_instances to set to the "
            "running instances; other keys are kept.",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0),
            default=60.0,
            show_default=True,
            help="Seconds to wait for each instance to respond to GET /api/version.",
        ),
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _reports_errors(func: F) -> F:
    """Turn library errors into a ClickException: the message and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OllamaPoolError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def _manager(
    state_dir: Path, log_dir: Path, ollama_bin: str | None = None
) -> InstanceManager:
    return InstanceManager(state_dir=state_dir, ollama_bin=ollama_bin, log_dir=log_dir)


def _parse_gpus(gpus: str | None) -> list[str] | None:
    if gpus is None:
        return None
    return gpus.split(",")


def _print_started(
    manager: InstanceManager, records: list[InstanceRecord], write_config: Path | None
) -> None:
    for record in records:
        gpu = f", GPU {record.gpu}" if record.gpu is not None else ""
        click.echo(
            f"port {record.port}: PID {record.pid}, {record.base_url}{gpu}, "
            f"log {record.log_path}"
        )
    click.echo(f"Started {len(records)} instances; state in {manager.state_file}")
    host = records[0].host
    if host not in _LOOPBACK_HOSTS:
        click.echo(
            f"Warning: the instances listen on {host}, so other hosts can reach "
            "them; Ollama has no authentication.",
            err=True,
        )
    if write_config is not None:
        written = manager.write_config(write_config)
        click.echo(f"Wrote {len(written)} instances to {write_config}")


# -- start, stop, restart ---------------------------------------------------


@main.command()
@click.argument(
    "count", type=click.IntRange(min=1), default=DEFAULT_COUNT, required=False
)
@_start_options(defaults=True)
@_binary_option
@_state_options
@_reports_errors
def start(
    count: int,
    port: int,
    model: str,
    host: str,
    gpus: str | None,
    models_dir: Path | None,
    write_config: Path | None,
    timeout: float,
    ollama_bin: str | None,
    state_dir: Path,
    log_dir: Path,
) -> None:
    """Start COUNT Ollama instances (default 4) on consecutive ports.

    Every port is checked before anything starts. If one instance does not
    respond in time, the ones already started are stopped again.
    """
    manager = _manager(state_dir, log_dir, ollama_bin)
    if write_config is not None:
        check_instances_config(write_config)
    records = manager.start(
        count,
        port=port,
        host=host,
        model=model,
        gpus=_parse_gpus(gpus) or (),
        models_dir=models_dir,
        timeout=timeout,
    )
    _print_started(manager, records, write_config)


@main.command()
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Stop only the instance on this port [default: all recorded].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL.",
)
@_state_options
@_reports_errors
def stop(port: int | None, timeout: float, state_dir: Path, log_dir: Path) -> None:
    """Stop the instances that ollama-pool started.

    Only the recorded processes are signalled, and only while their PID still
    belongs to the process that was started (same creation time and command line).
    """
    outcomes = _manager(state_dir, log_dir).stop(port, grace=timeout)
    for outcome in outcomes:
        click.echo(f"port {outcome.port}: PID {outcome.pid} {outcome.result}")


@main.command()
@click.argument("count", type=click.IntRange(min=1), default=None, required=False)
@_start_options(defaults=False)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL when stopping.",
)
@_binary_option
@_state_options
@_reports_errors
def restart(
    count: int | None,
    port: int | None,
    model: str | None,
    host: str | None,
    gpus: str | None,
    models_dir: Path | None,
    write_config: Path | None,
    timeout: float,
    grace: float,
    ollama_bin: str | None,
    state_dir: Path,
    log_dir: Path,
) -> None:
    """Stop all recorded instances and start COUNT again (default: as many).

    Options left out keep the settings of the recorded instances.
    """
    manager = _manager(state_dir, log_dir, ollama_bin)
    if write_config is not None:
        check_instances_config(write_config)
    records = manager.restart(
        count,
        grace=grace,
        timeout=timeout,
        port=port,
        host=host,
        model=model,
        gpus=_parse_gpus(gpus),
        models_dir=models_dir,
    )
    _print_started(manager, records, write_config)


# -- status -----------------------------------------------------------------


@main.command()
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON list instead of a table."
)
@_state_options
@_reports_errors
def status(as_json: bool, state_dir: Path, log_dir: Path) -> None:
    """Show port, PID, state, version, models, CPU and memory of each instance."""
    rows = _manager(state_dir, log_dir).status()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(row) for row in rows], indent=2))
        return
    Console().print(_status_table(rows))
    up = sum(row.state == "up" for row in rows)
    click.echo(f"{up} of {len(rows)} instances up")


def _status_table(rows: list[InstanceStatus]) -> Table:
    table = Table(title="Ollama instances")
    for column in (
        "Port",
        "PID",
        "State",
        "Version",
        "Models",
        "Loaded",
        "CPU %",
        "Memory",
        "Log",
    ):
        table.add_column(column, overflow="fold")
    styles = {"up": "green", "down": "red", "unresponsive": "yellow"}
    for row in rows:
        state = Text(row.state, style=styles[row.state])
        if row.detail:
            state.append(f"\n{row.detail}")
        # Text cells: model names and paths are data, not rich markup.
        table.add_row(
            str(row.port),
            str(row.pid),
            state,
            Text(row.version or "-"),
            Text("\n".join(row.models) or "-"),
            Text("\n".join(row.loaded) or "-"),
            "-" if row.cpu_percent is None else f"{row.cpu_percent:.1f}",
            _format_bytes(row.memory_bytes),
            Text(row.log_path),
        )
    return table


def _format_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


# -- pull -------------------------------------------------------------------


class _PullDisplay:
    """Rich progress bars, one per instance, fed by the /api/pull stream lines.

    When the output is not a terminal, status changes are also printed as lines,
    so that a log of the command shows the progress.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
        )
        self._tasks: dict[int, TaskID] = {}
        self._last_status: dict[int, str] = {}
        self._lock = threading.Lock()

    def __call__(self, event: PullProgress) -> None:
        with self._lock:
            task = self._tasks.get(event.port)
            if task is None:
                task = self._tasks[event.port] = self.progress.add_task(
                    f"port {event.port}", total=None
                )
            changed = self._last_status.get(event.port) != event.status
            self._last_status[event.port] = event.status
        description = f"port {event.port}: {event.status}"
        if event.total:
            self.progress.update(
                task,
                description=description,
                total=event.total,
                completed=event.completed or 0,
            )
        elif event.status == "success":
            total = self.progress.tasks[self._index(task)].total or 1
            self.progress.update(
                task, description=description, total=total, completed=total
            )
        else:
            self.progress.update(task, description=description)
        if changed and not self.console.is_terminal:
            self.console.print(
                description, highlight=False, markup=False, soft_wrap=True
            )

    def _index(self, task: TaskID) -> int:
        return next(i for i, item in enumerate(self.progress.tasks) if item.id == task)


@main.command()
@click.argument("model", required=False)
@click.option(
    "--parallel",
    is_flag=True,
    help="Pull through all instances at once when they do not share a models folder.",
)
@_state_options
@_reports_errors
def pull(model: str | None, parallel: bool, state_dir: Path, log_dir: Path) -> None:
    """Pull MODEL (default: the model recorded at start) for every instance.

    Instances that share a models folder need one pull, checked afterwards
    through the /api/tags of each. Otherwise each instance pulls.
    """
    manager = _manager(state_dir, log_dir)
    if model is None:
        records = manager.instances()
        model = records[0].model if records else DEFAULT_MODEL
    console = Console()
    display = _PullDisplay(console)
    with display.progress:
        report = manager.pull(model, parallel=parallel, on_progress=display)
    ports = ", ".join(str(port) for port in report.verified_on)
    if report.shared_models_dir and len(report.pulled_on) == 1:
        pull_summary = (
            f"pulled once through port {report.pulled_on[0]} into the shared "
            "models folder"
        )
    else:
        pull_summary = "pulled through ports " + ", ".join(
            str(p) for p in report.pulled_on
        )
    click.echo(f"Model {model!r} is listed by ports {ports} ({pull_summary})")


# -- test, logs, cleanup ----------------------------------------------------


@main.command("test")
@click.argument("port", type=click.IntRange(1, 65535))
@click.argument("model", required=False)
@click.option(
    "--prompt", default=_DEFAULT_PROMPT, show_default=True, help="User message to send."
)
@click.option(
    "--host",
    default=DEFAULT_HOST,
    show_default=True,
    help="Address of the instance when PORT is not recorded.",
)
@_state_options
@_reports_errors
def test_instance(
    port: int,
    model: str | None,
    prompt: str,
    host: str,
    state_dir: Path,
    log_dir: Path,
) -> None:
    """Send one chat request to the instance on PORT and time it.

    The reply is printed as it streams. MODEL defaults to the model recorded
    for PORT. Tokens per second come from eval_count and eval_duration of the
    last stream line.
    """
    manager = _manager(state_dir, log_dir)
    if model is None:
        recorded = [r.model for r in manager.instances() if r.port == port]
        model = recorded[0] if recorded else DEFAULT_MODEL
    base_url = manager.base_url(port, host)
    click.echo(f"{model} on {base_url}:")
    timing = send_test_chat(
        base_url, model, prompt, on_text=lambda text: click.echo(text, nl=False)
    )
    click.echo()
    first = (
        "-"
        if timing.first_token_seconds is None
        else f"{timing.first_token_seconds:.2f} s"
    )
    rate = timing.tokens_per_second
    tokens = (
        f"{timing.eval_count} tokens at {rate:.1f} tokens/s"
        if rate is not None
        else "tokens/s not reported by the server"
    )
    click.echo(
        f"time to first token: {first}, total: {timing.total_seconds:.2f} s, {tokens}"
    )


@main.command()
@click.argument("port", type=click.IntRange(1, 65535))
@click.option(
    "-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C."
)
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Number of last lines to print first.",
)
@_state_options
@_reports_errors
def logs(port: int, follow: bool, lines: int, state_dir: Path, log_dir: Path) -> None:
    """Print the end of the log of the instance on PORT."""
    path = _manager(state_dir, log_dir).log_path(port)
    if not path.is_file():
        raise ManagerError(f"no log for port {port} at {path}; check --log-dir")
    for line in read_last_lines(path, lines):
        click.echo(line)
    if not follow:
        return
    try:
        for line in follow_log(path):
            click.echo(line)
    except KeyboardInterrupt:
        return


@main.command()
@_state_options
@_reports_errors
def cleanup(state_dir: Path, log_dir: Path) -> None:
    """Forget exited instances and delete the logs of instances not running."""
    report = _manager(state_dir, log_dir).cleanup()
    for port in report.removed_ports:
        click.echo(f"forgot exited instance on port {port}")
    for path in report.removed_logs:
        click.echo(f"deleted {path}")
    running = ", ".join(str(port) for port in report.running_ports) or "none"
    click.echo(f"Running instances kept: {running}")
