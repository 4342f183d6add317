"""Recipes: one YAML file that describes a merge, a fold, a merge folded into a base, or a decoupled merge, and runs it again.

>>> from oftmerge.ops.recipe import load_recipe
>>> from oftmerge.ops.run_recipe import run_recipe
>>> recipe = load_recipe("merge.yaml")                        # doctest: +SKIP
>>> run_recipe(recipe, "merged", overwrite=True)              # doctest: +SKIP

A recipe is the command's configuration object (:mod:`oftmerge.config`) in its ``to_dict`` form,
plus how it runs and what its inputs were::

    oftmerge: 1                  # the recipe format's version
    command: merge               # merge | fold | decouple   (a merge with output: model is a merge folded into base)
    config:                      # MergeConfig / FoldConfig / DecoupleConfig keys
      adapters: [adapters/oft-upper, adapters/oft-reverse]
      weights: [1, 0.5]
      method: orthomerge
    run: {shard_size: 5GB, threads: 1}
    output: merged               # optional: the output path when `oftmerge run` is given no -o
    inputs:                      # optional: SHA-256 of each input's weight files, checked before running
      adapters/oft-upper: 3f1c...

Every key is checked when the file is read: an unknown or ill-typed key is one error naming the
key and its line. Paths are taken as written (relative ones from the working directory, as on the
command line). :func:`recipe_for` builds the recipe a command ran, which the command writes into
its output as ``oftmerge.yaml`` beside ``oftmerge.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oftmerge.config import DecoupleConfig, FoldConfig, MergeConfig, RunOptions
from oftmerge.errors import OftMergeError

__all__ = ["RECIPE_VERSION", "Recipe", "check_inputs", "fingerprint", "load_recipe", "recipe_for", "recipe_from_dict"]

RECIPE_VERSION = 1
COMMANDS: dict[str, type[MergeConfig] | type[FoldConfig] | type[DecoupleConfig]] = {"merge": MergeConfig, "fold": FoldConfig, "decouple": DecoupleConfig}
#: the keys of ``run:`` (RunOptions that change nothing a command computes beyond decoupling's thread count)
RUN_KEYS = ("threads", "shard_size")
_TOP = ("oftmerge", "command", "config", "run", "output", "inputs")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (see the module docstring)."""

    command: str
    config: MergeConfig | FoldConfig | DecoupleConfig
    run: Mapping[str, Any] = field(default_factory=dict)
    output: str | None = None
    inputs: Mapping[str, str] = field(default_factory=dict)
    source: str = "<recipe>"  #: where it was read from, for messages

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"oftmerge": RECIPE_VERSION, "command": self.command, "config": self.config.to_dict(), "run": dict(self.run)}
        if self.output is not None:
            out["output"] = self.output
        if self.inputs:
            out["inputs"] = dict(self.inputs)
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def input_paths(self) -> list[str]:
        """The inputs whose weight files a re-run checks: adapters, the adapter of a fold, experts (the base is not hashed)."""
        c = self.config
        if isinstance(c, MergeConfig):
            items = list(c.adapters)
        elif isinstance(c, FoldConfig):
            items = [c.adapter]
        else:
            items = list(c.experts)
        return [os.fspath(p) for p in items if isinstance(p, (str, os.PathLike))]


def fingerprint(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 over the weight files (``*.safetensors``, ``*.bin``) of an input directory, names and bytes; None when it has none."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES) if p.is_dir() else ([p] if p.is_file() else [])
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def recipe_for(command: str, config: MergeConfig | FoldConfig | DecoupleConfig, run: RunOptions, output: str | os.PathLike[str] | None = None) -> Recipe:
    """The recipe of a command that ran: its config, ``run`` options, and the inputs' fingerprints."""
    recipe = Recipe(command, config, {k: getattr(run, k) for k in RUN_KEYS}, None if output is None else os.fspath(output))
    inputs = {p: h for p in recipe.input_paths() if (h := fingerprint(p)) is not None}
    return dataclasses.replace(recipe, inputs=inputs)


def _lines(text: str) -> dict[tuple[str, ...], int]:
    """Line (1-based) of every mapping key in the YAML document, by its key path."""
    import yaml

    out: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (str(k.value),)
                out[key] = k.start_mark.line + 1
                walk(v, key)

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass
    return out


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate the recipe at ``path`` (one line per error, naming the key and its line)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OftMergeError(f"{p}: recipe not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OftMergeError(f"{p}: cannot read the recipe ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise OftMergeError(f"{p}: not valid YAML{where} ({getattr(exc, 'problem', None) or exc})") from None
    return recipe_from_dict(data, source=str(p), lines=_lines(text))


def recipe_from_dict(data: Any, *, source: str = "<recipe>", lines: Mapping[tuple[str, ...], int] | None = None) -> Recipe:
    """Validate a recipe given as a mapping (what :func:`load_recipe` parsed)."""
    lines = lines or {}

    def at(*key: str) -> str:
        line = lines.get(key)
        return f"{source}: key {'.'.join(key)}" + (f" (line {line})" if line else "")

    if not isinstance(data, Mapping):
        raise OftMergeError(f"{source}: a recipe is a mapping with the keys {', '.join(_TOP)}; got {type(data).__name__}")
    unknown = [k for k in data if k not in _TOP]
    if unknown:
        raise OftMergeError(f"{at(str(unknown[0]))}: unknown key; a recipe has {', '.join(_TOP)}")
    version = data.get("oftmerge", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise OftMergeError(f"{at('oftmerge')}: recipe version {version!r}; this oftmerge reads version {RECIPE_VERSION}")
    command = data.get("command")
    if command not in COMMANDS:
        raise OftMergeError(f"{at('command')}: {command!r} is not a command a recipe runs; choose one of {', '.join(COMMANDS)}")
    config_data = data.get("config")
    if not isinstance(config_data, Mapping):
        raise OftMergeError(f"{at('config')}: expected the {COMMANDS[command].__name__} keys as a mapping, got {type(config_data).__name__}")
    cls = COMMANDS[command]
    names = {f for f in cls.__dataclass_fields__ if cls.__dataclass_fields__[f].init}
    for key in config_data:
        if key not in names:
            raise OftMergeError(f"{at('config', str(key))}: unknown key for {command}; known: {', '.join(sorted(names))}")
    try:
        config = cls.from_dict(dict(config_data))
    except OftMergeError as exc:
        raise OftMergeError(f"{at('config')}: {exc}") from None
    except TypeError as exc:
        raise OftMergeError(f"{at('config')}: {exc}") from None
    run = data.get("run") or {}
    if not isinstance(run, Mapping):
        raise OftMergeError(f"{at('run')}: expected a mapping of {', '.join(RUN_KEYS)}")
    for key in run:
        if key not in RUN_KEYS:
            raise OftMergeError(f"{at('run', str(key))}: unknown key; run: has {', '.join(RUN_KEYS)}")
    try:
        RunOptions(**dict(run))
    except OftMergeError as exc:
        raise OftMergeError(f"{at('run')}: {exc}") from None
    output = data.get("output")
    if output is not None and not isinstance(output, str):
        raise OftMergeError(f"{at('output')}: expected a path, got {output!r}")
    inputs = data.get("inputs") or {}
    if not isinstance(inputs, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in inputs.items()):
        raise OftMergeError(f"{at('inputs')}: expected a mapping of input path -> SHA-256")
    return Recipe(command, config, dict(run), output, dict(inputs), source)


def check_inputs(recipe: Recipe, *, on_changed: str = "error") -> list[str]:
    """Compare each input's fingerprint with the recipe's; ``on_changed`` ``error`` raises, ``warn`` returns the messages."""
    if on_changed not in ("error", "warn"):
        raise OftMergeError(f"on_changed must be 'error' or 'warn', got {on_changed!r}")
    notes = []
    for path, want in recipe.inputs.items():
        got = fingerprint(path) if os.path.exists(path) else None
        if got != want:
            what = "is missing" if got is None else f"changed (SHA-256 {got[:12]}..., the recipe recorded {want[:12]}...)"
            message = f"{recipe.source}: input {path} {what}; the result would not be the recorded one"
            if on_changed == "error":
                raise OftMergeError(message + " (pass --on-changed warn to run anyway)")
            notes.append(message)
    return notes
