"""The demo's output is its table: third-party chatter (progress bars, info logs, known warnings) is muted.

:func:`quiet_libraries` wraps the demo's own calls into ``transformers``, ``diffusers``, ``peft``
and LyCORIS, and restores every setting it changed on leaving:

* ``transformers``' "Loading weights" bar and info/warning logs (``set_verbosity_error``,
  ``disable_progress_bar``), ``diffusers``' logs and bars;
* the warnings in :data:`KNOWN_WARNINGS`, which the demo cannot fix at their cause (they are
  raised by one library about another's use of it), each by category, module and message.

LyCORIS sets its logger to INFO when imported: :func:`logger_level` mutes it around the demo's
LyCORIS calls, after the import. Everything else is shown as usual; a warning the demo itself causes is fixed where it is caused
(:func:`oftmerge.demo.evaluate.greedy_answers` passes the KV cache as ``cache`` on transformers 5).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["KNOWN_WARNINGS", "logger_level", "quiet_libraries"]

#: (category, module that warns, message regex, why it cannot be fixed here)
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (
        FutureWarning,
        r"transformers\.modeling_utils",
        r"`is_gradient_checkpointing` is deprecated",
        "peft's PeftModel.__init__ reads model.is_gradient_checkpointing, deprecated in transformers 5",
    ),
)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Mute the third-party output listed in the module docstring inside the block; restore it after."""
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        for category, module, message, _why in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        for name in ("transformers", "diffusers"):
            stack.enter_context(_library_logging(name))
        yield


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """Logger ``name`` at ``level`` at least inside the block; its level restored after."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def _library_logging(package: str) -> Iterator[None]:
    """``package.utils.logging`` (transformers, diffusers) at error level, its progress bars off; restored after."""
    try:
        hf_logging = importlib.import_module(f"{package}.utils.logging")
    except ImportError:
        yield
        return
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(max(verbosity, hf_logging.ERROR))
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
