"""The ``oftmerge`` command line (:func:`main`); one module per group of subcommands, shared helpers in :mod:`~oftmerge.cli.common`."""

from oftmerge.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
