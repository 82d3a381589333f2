"""The ``ollama-pool`` command line."""

from __future__ import annotations

import logging

import click


@click.group()
@click.version_option(package_name="ollama-pool")
def main() -> None:
    """Run a pool of Ollama instances and jobs on it."""
    # The library logs instance state changes and retries; show warnings and
    # errors on stderr in a readable form unless the caller set up logging.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")


# Each module registers its commands on ``main`` when imported.
from ollama_pool.cli import _batch, _manager  # noqa: E402, F401
