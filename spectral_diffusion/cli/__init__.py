"""`spectral-diffusion` command line: one sub-command per module in this package.

Each sub-command module defines `register(subparsers)`, which adds its parser and sets `func(args) -> int | None`.
User mistakes raise `SpectralDiffusionError`; they are printed as one line and exit with status 2. A write that
fails after the checks (a disk that fills up) is one line too, with status 1; the trainer keeps its work first.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from safetensors import SafetensorError

from spectral_diffusion.errors import SpectralDiffusionError

# Sub-command modules, in the order `--help` lists them; each is named after its sub-command (`-` as `_`).
COMMANDS = ("train", "fuse", "generate", "export_lora", "app", "demo", "toyworld")


def build_parser() -> argparse.ArgumentParser:
    # transformers warns at import about optional image-processor backends (torchvision) the CLI never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(
        prog="spectral-diffusion",
        description="Train, fuse and generate with Spectral Adapter concepts for Stable Diffusion 1.x.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"spectral_diffusion.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"spectral_diffusion.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


class _MessageFormat(logging.Formatter):
    """Info lines as they are, warnings prefixed: what a user reads on the terminal, not a log.

    A record that carries an exception (`log.exception`: the app's failed jobs) is followed by its traceback, so the
    server's terminal says why a job failed while the page shows one line.
    """

    def format(self, record: logging.LogRecord) -> str:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        text = prefix + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from spectral_diffusion.progress import silence_library_progress

    silence_library_progress()  # loading bars are noise in a terminal and escape codes in a log
    logger = logging.getLogger("spectral_diffusion")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MessageFormat())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except SpectralDiffusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as exc:  # a disk that filled up or went read-only while writing
        print(f"error: could not complete: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
