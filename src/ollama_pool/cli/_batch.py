"""The batch command: a JSONL file of questions through a chain on the pool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ollama_pool import ConfigError, load_config
from ollama_pool.batch import DEFAULT_CHAIN, BatchError
from ollama_pool.cli import main

# The command imports LangChain and rich only when it runs, so that the other
# commands and --help start fast.
if TYPE_CHECKING:
    from rich.console import Console

    from ollama_pool import PooledChatOllama
    from ollama_pool.batch import (
        BatchOptions,
        BatchSummary,
        ChainFactory,
        NoProgress,
        RichProgress,
    )

    LlmFactory = Callable[[], PooledChatOllama]

# Exit status when records failed or the output still contains error lines.
EXIT_FAILED_RECORDS = 1


@main.command()
@click.argument(
    "input_path",
    metavar="INPUT.jsonl",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.argument(
    "output_path",
    metavar="OUTPUT.jsonl",
    type=click.Path(dir_okay=False, path_type=Path),
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("config.yaml"),
    show_default=True,
    help="Config file that names the Ollama instances. Not read with --local.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Records run at once. [default: performance.num_workers of the config, "
    "else twice the number of healthy instances]",
)
@click.option(
    "--chain",
    "chain_spec",
    default=DEFAULT_CHAIN,
    show_default=True,
    help="'module:function' that takes the chat model and returns a Runnable "
    "from a record dict to an answer string or message.",
)
@click.option(
    "--retry-errors",
    is_flag=True,
    help="Run again the records whose line in OUTPUT is an error line.",
)
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the summary to this file as JSON.",
)
@click.option(
    "--local",
    "local_count",
    type=click.IntRange(min=1),
    help="Start this many local model instances (llama.cpp stand-ins, extra "
    "'local'), run against them instead of --config, and stop them at the end.",
)
@click.option(
    "--threads-per-instance",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="CPU threads of each --local instance.",
)
@click.option("--id-field", default="id", show_default=True, help="Record id key.")
@click.option(
    "--question-field",
    default="question",
    show_default=True,
    help="Key that a record must have, with a non-empty string.",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Show a progress bar on stderr.",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log more: -v for INFO, -vv for DEBUG. [default: WARNING]",
)
def batch(
    input_path: Path,
    output_path: Path,
    config_path: Path,
    workers: int | None,
    chain_spec: str,
    retry_errors: bool,
    summary_json: Path | None,
    local_count: int | None,
    threads_per_instance: int,
    id_field: str,
    question_field: str,
    progress: bool,
    verbose: int,
) -> None:
    """Answer each record of INPUT.jsonl with a chain on the pool.

    Appends one JSON line per record to OUTPUT.jsonl: the id, the answer, the
    instance that served it, latency and tokens, or the error. Running the same
    command again skips the ids already in OUTPUT, so a stopped or killed run
    resumes where it ended. Exits 1 when a record failed, and 130 after Ctrl+C.
    """
    from rich.console import Console

    from ollama_pool.batch import BatchOptions, NoProgress, RichProgress

    console = Console(stderr=True)
    _configure_logging(console, verbose)
    _check_paths(input_path, output_path)
    factory = _load_factory(chain_spec)

    with contextlib.ExitStack() as stack:
        if local_count:
            make_llm, configured_workers = _local_llm(
                stack, local_count, threads_per_instance
            )
        else:
            make_llm, configured_workers = _configured_llm(config_path)

        def make_options(default: int) -> BatchOptions:
            return BatchOptions(
                input_path=input_path,
                output_path=output_path,
                workers=workers or default,
                retry_errors=retry_errors,
                id_field=id_field,
                question_field=question_field,
            )

        reporter = RichProgress(console) if progress else NoProgress()
        try:
            summary = asyncio.run(
                _run(make_llm, factory, make_options, configured_workers, reporter)
            )
        except (BatchError, ConfigError) as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:
            raise click.ClickException(f"batch failed: {exc}") from exc

    _report(summary, summary_json)


def _configure_logging(console: Console, verbose: int) -> None:
    """Send log records to stderr above the progress bar, unless logging is set up."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    if root.handlers:
        return
    root.addHandler(RichHandler(console=console, show_path=False))
    root.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)])


def _check_paths(input_path: Path, output_path: Path) -> None:
    if not output_path.parent.is_dir():
        raise click.BadParameter(
            f"directory {str(output_path.parent)!r} not found; create it first",
            param_hint="OUTPUT.jsonl",
        )
    if output_path.exists() and output_path.samefile(input_path):
        raise click.BadParameter(
            "OUTPUT.jsonl is the input file; choose another output file",
            param_hint="OUTPUT.jsonl",
        )


def _load_factory(chain_spec: str) -> ChainFactory:
    from ollama_pool.batch import load_chain_factory

    try:
        return load_chain_factory(chain_spec)
    except BatchError as exc:
        raise click.BadParameter(str(exc), param_hint="--chain") from exc


def _configured_llm(config_path: Path) -> tuple[LlmFactory, int | None]:
    if not config_path.exists():
        raise click.BadParameter(
            f"config file {str(config_path)!r} not found; pass --config PATH, or "
            f"--local N to start local model instances",
            param_hint="--config",
        )
    from ollama_pool import PooledChatOllama

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    return (lambda: PooledChatOllama.from_config(config_path)), config.num_workers


def _local_llm(
    stack: contextlib.ExitStack, count: int, threads: int
) -> tuple[LlmFactory, int | None]:
    from ollama_pool import PooledChatOllama

    try:
        from ollama_pool.local import LocalFleet, LocalModelError
    except ImportError as exc:
        raise click.ClickException(
            f"--local needs the 'local' extra: pip install 'ollama-pool[local]' ({exc})"
        ) from exc
    try:
        fleet = stack.enter_context(LocalFleet(count, threads))
    except LocalModelError as exc:
        raise click.ClickException(f"cannot start the local model: {exc}") from exc
    urls, model = list(fleet.urls), fleet.model

    def make_llm() -> PooledChatOllama:
        # The chain asks for a short answer; a cap of 32 tokens keeps the small
        # pretrained model from generating until its default limit.
        return PooledChatOllama(
            base_urls=urls, model=model, temperature=0, seed=0, num_predict=32
        )

    return make_llm, None


async def _run(
    make_llm: LlmFactory,
    factory: ChainFactory,
    make_options: Callable[[int], BatchOptions],
    configured_workers: int | None,
    reporter: RichProgress | NoProgress,
) -> BatchSummary:
    from ollama_pool.batch import arun_batch, build_chain, default_workers

    llm = make_llm()
    try:
        chain = build_chain(factory, llm)
        options = make_options(default_workers(llm.pool, configured_workers))
        return await arun_batch(chain, options, pool=llm.pool, progress=reporter)
    finally:
        await llm.aclose()


def _report(summary: BatchSummary, summary_json: Path | None) -> None:
    """Print the summary, write it as JSON if asked, and exit with its status."""
    click.echo(summary.format_text())
    if summary_json is not None:
        summary_json.write_text(
            json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )

    if summary.interrupted:
        signum = signal.Signals[summary.signal_name or "SIGINT"]
        click.echo(
            f"Stopped by {signum.name}; run the same command again to finish "
            f"the remaining records.",
            err=True,
        )
        sys.exit(128 + signum.value)
    reason = summary.failure_reason()
    if reason is not None:
        click.echo(f"Error: {reason}", err=True)
        sys.exit(EXIT_FAILED_RECORDS)
    earlier = summary.output_totals.failed
    if earlier:
        click.echo(
            f"Error: {summary.output_path} still has {earlier} error lines from "
            f"an earlier run; add --retry-errors to run those records again.",
            err=True,
        )
        sys.exit(EXIT_FAILED_RECORDS)
