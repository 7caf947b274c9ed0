"""What every command group shares: the parser class, the prompt options, checks on flags."""

from __future__ import annotations

import argparse
import os

from dsi_mpi.backends import ENGINES
from dsi_mpi.config import ConfigError


class Parser(argparse.ArgumentParser):
    """A usage error is a :class:`ConfigError` (exit 2 through the one exit path), not argparse's
    own ``sys.exit``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see {self.prog} --help)")


Subparsers = argparse._SubParsersAction  # what add_subparsers returns


def add_prompt_options(p: argparse.ArgumentParser, file_help: str) -> None:
    """Where the prompts come from (exactly one of three), and how they are taken."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt as text")
    src.add_argument("--prompt-file", help=file_help)
    src.add_argument("--prompt-ids", help="one prompt as comma-separated token ids")
    p.add_argument("--chat", action="store_true",
                   help="wrap each text prompt in the tokenizer's chat template (instruct models)")
    p.add_argument("--num-prompts", type=int, help="take the first N prompts")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """How model ranks run their forwards (dsi_mpi/backends/engine.py)."""
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="eager (dynamic KV cache), static (one static KV cache per rank), "
                        "cudagraph (static cache, short forwards replayed as CUDA graphs; "
                        "CUDA only); auto: cudagraph on CUDA, eager on a CPU")
    p.add_argument("--graph-segments", type=int, default=1,
                   help="cudagraph: graphs per forward, CANCEL probed between them "
                        "(1: the whole forward in one graph; >1: Llama-layout models)")


def positive(args: argparse.Namespace, *names: str) -> None:
    """Each named integer flag is >= 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def writable(path: str, flag: str) -> None:
    """The folder ``path`` goes into exists."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"{flag}: directory {out_dir!r} does not exist")


def need_matplotlib(command: str) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(f"dsi-mpi {command} draws with matplotlib: pip install matplotlib "
                          "(or dsi_mpi[plot])")
