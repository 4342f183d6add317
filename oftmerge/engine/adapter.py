"""The adapter writer: one merged adapter directory, committed atomically, written by the main process only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from oftmerge.engine.commit import Inputs, output_directory
from oftmerge.engine.distributed import Group, process_group
from oftmerge.engine.guard import check_nonempty, check_output, check_replaceable
from oftmerge.formats.base import AdapterFormat

__all__ = ["write_adapter"]


def write_adapter(
    out: str | os.PathLike[str],
    fmt: AdapterFormat,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    extra_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
    inputs: Inputs = (),
    group: Group | None = None,
) -> Path:
    """Write an adapter of format ``fmt`` to ``out`` through :func:`~oftmerge.engine.commit.output_directory`.

    Under ``accelerate launch`` only the main process writes (one adapter file); every process
    returns once it exists, or raises if writing failed. Returns ``out`` made absolute.
    """
    group = group or process_group()
    target = Path(check_nonempty(out)).absolute()
    inputs = list(inputs)  # read twice: by the replace check and by the commit

    def write() -> None:
        if overwrite:  # only an earlier output is replaced, never someone's data
            check_replaceable(check_output(target, inputs))
        with output_directory(target, overwrite=overwrite, inputs=inputs) as tmp:
            fmt.write(tmp, tensors, config, dict(extra_files or {}))

    group.on_main(write)
    return target
