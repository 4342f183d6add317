"""Typed reads of ``adapter_config.json`` values: a wrong type or range is one line naming the file, the key and the value.

PEFT writes its config dataclass with ``json.dump``, so a value of the wrong type is a hand edit or a
broken export; read as it is, it fails far from the file (``int("sixteen")`` in the middle of a
merge). Every reader gets its values through these getters, which say what is expected:

>>> config_int({"r": 8}, "r", 0, where="a/adapter_config.json")
8
>>> config_int({"r": None}, "r", 0, where="a/adapter_config.json")   # null: the default, as PEFT's dataclass
0
>>> config_int({"oft_block_size": "sixteen"}, "oft_block_size", 0, where="a/adapter_config.json", example="32")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
oftmerge.errors.AdapterFormatError: a/adapter_config.json: oft_block_size is 'sixteen'; expected a whole number >= 0 (e.g. "oft_block_size": 32); ...
>>> config_float({"eps": 6e-5}, "eps", 6e-5, where="a/adapter_config.json", positive=True)
6e-05
>>> config_bool({"coft": "yes"}, "coft", False, where="a/adapter_config.json")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
oftmerge.errors.AdapterFormatError: a/adapter_config.json: coft is 'yes'; expected true or false (e.g. "coft": false); ...

A JSON ``null`` reads as the default (PEFT's dataclass default for that field). Whole numbers
written as ``8.0`` are accepted; ``true``/``false`` are not numbers here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oftmerge.errors import AdapterFormatError

__all__ = ["config_bool", "config_float", "config_int", "config_path"]

_FIX = "fix it in the file, or save the adapter again with PEFT"


def config_path(adapter: str | os.PathLike[str]) -> str:
    """How messages name the config of the adapter at ``adapter`` (a directory, or a label such as a live model's)."""
    path = Path(adapter)
    return str(path / "adapter_config.json") if path.is_dir() else str(path)


def _refuse(where: str, key: str, value: Any, expected: str, example: str) -> AdapterFormatError:
    return AdapterFormatError(f"{where}: {key} is {value!r}; expected {expected} (e.g. \"{key}\": {example}); {_FIX}")


def config_int(config: Mapping[str, Any], key: str, default: int, *, where: str, minimum: int = 0, example: str = "") -> int:
    """``config[key]`` as an ``int >= minimum`` (``default`` when absent or null)."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _refuse(where, key, value, f"a whole number >= {minimum}", example or str(max(minimum, default)))
    return value


def config_float(
    config: Mapping[str, Any], key: str, default: float, *, where: str, positive: bool = False, example: str = ""
) -> float:
    """``config[key]`` as a finite ``float`` (``> 0`` with ``positive``; ``default`` when absent or null)."""
    value = config.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (not positive or value > 0)
    if not ok:
        raise _refuse(where, key, value, "a finite number" + (" > 0" if positive else ""), example or repr(default))
    return float(value)


def config_bool(config: Mapping[str, Any], key: str, default: bool, *, where: str) -> bool:
    """``config[key]`` as a ``bool``: JSON ``true``/``false`` (``default`` when absent or null)."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _refuse(where, key, value, "true or false", "true" if default else "false")
    return value
