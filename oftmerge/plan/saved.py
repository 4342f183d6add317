"""What a merge does with the non-OFT tensors its inputs saved: classifier heads, trained biases.

PEFT saves, besides the OFT rotations, every module listed in ``modules_to_save`` (the head of
each ``SEQ_CLS`` adapter) and, with ``bias="oft_only"`` / ``"all"``, the trained biases
(:func:`oftmerge.formats.peft_oft.saved_tensors`). These are ordinary weights, not rotations:
there is nothing to merge on the orthogonal group, so the caller picks a policy
(``saved_modules=`` / ``--saved-modules``):

``identical`` (default)
    keep a tensor when every input that saved it saved the same bytes; otherwise refuse.
``mean``
    the ``|weight|``-weighted mean over the inputs that saved it (same shape needed).
``first``
    the tensor of the first input, in the order given, that saved it.
``drop``
    write none: the merged adapter uses the base model's tensors.

:func:`plan_saved` decides (and refuses) from the inputs alone; :func:`saved_values` computes the
tensors the output stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from oftmerge.config import SAVED_MODULES
from oftmerge.errors import IncompatibleAdaptersError, NumericalError
from oftmerge.formats.peft_oft import OftAdapter
from oftmerge.linalg import weight_unit

__all__ = ["SAVED_POLICIES", "SavedPlan", "plan_saved", "saved_values"]

SAVED_POLICIES = SAVED_MODULES  #: the policies, in the order the CLI lists them


@dataclass(frozen=True)
class SavedPlan:
    """What the output stores for one saved tensor (a model tensor name, e.g. ``classifier.weight``)."""

    name: str
    inputs: tuple[int, ...]  #: the inputs (canonical order) that saved it
    action: str  #: ``identical``, ``mean``, ``first`` or ``drop``
    source: int | None  #: for ``identical`` and ``first``: the input whose tensor is written

    def describe(self, paths: Sequence[str]) -> str:
        if self.action == "drop":
            return "dropped (the base model's tensor is used)"
        if self.action == "mean":
            return "|weight|-weighted mean of " + ", ".join(paths[i] for i in self.inputs)
        assert self.source is not None
        if self.action == "first":
            return f"taken from {paths[self.source]} (the first input that saved it)"
        return f"identical in {len(self.inputs)} input(s), kept" if len(self.inputs) > 1 else f"saved by {paths[self.source]} only, kept"


def _choices(policy: str) -> str:
    others = [p for p in SAVED_POLICIES if p != policy]
    return f"--saved-modules (saved_modules=) {', '.join(others[:-1])} or {others[-1]}"


def plan_saved(adapters: Sequence[OftAdapter], weights: Sequence[float], given_order: Sequence[int], policy: str) -> tuple[SavedPlan, ...]:
    """One :class:`SavedPlan` per saved tensor of any input (sorted by name); refuses what ``policy`` cannot do.

    ``given_order[i]`` is the position input ``i`` (canonical order) had in the order given, for ``first``.
    """
    if policy not in SAVED_POLICIES:
        raise IncompatibleAdaptersError(f"saved_modules={policy!r}: choose one of {', '.join(SAVED_POLICIES)}")
    names = sorted(set().union(*(a.saved for a in adapters)))
    plans = []
    for name in names:
        holders = tuple(i for i, a in enumerate(adapters) if name in a.saved)
        first = min(holders, key=lambda i: given_order[i])
        if policy == "drop":
            plans.append(SavedPlan(name, holders, "drop", None))
        elif policy == "first":
            plans.append(SavedPlan(name, holders, "first", first))
        elif policy == "mean":
            _check_mean(adapters, weights, name, holders)
            plans.append(SavedPlan(name, holders, "mean", None))
        else:
            ref = adapters[first].saved_tensor(name)
            differ = [i for i in holders if i != first and not _same_bytes(ref, adapters[i].saved_tensor(name))]
            if differ:
                raise IncompatibleAdaptersError(
                    f"saved tensor {name!r} differs between {adapters[first].path} and {adapters[differ[0]].path} "
                    f"(a modules_to_save head or a trained bias, not a rotation); choose what the merge keeps: {_choices(policy)}"
                )
            plans.append(SavedPlan(name, holders, "identical", first))
    return tuple(plans)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def _check_mean(adapters: Sequence[OftAdapter], weights: Sequence[float], name: str, holders: Sequence[int]) -> None:
    shapes = {i: adapters[i].saved_shape(name) for i in holders}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{adapters[i].path}: {list(s)}" for i, s in shapes.items())
        raise IncompatibleAdaptersError(
            f"saved tensor {name!r} has different shapes ({detail}), e.g. heads with different numbers of labels; "
            "they cannot be averaged: use --saved-modules first or drop"
        )
    dtypes = {adapters[i].saved_dtype(name) for i in holders}
    if not all(d.is_floating_point for d in dtypes):
        raise IncompatibleAdaptersError(f"saved tensor {name!r} is not floating point ({', '.join(map(str, dtypes))}); use --saved-modules identical or first")
    if sum(abs(weights[i]) for i in holders) == 0:
        raise IncompatibleAdaptersError(f"saved tensor {name!r}: the inputs that saved it all have weight 0; a mean needs a non-zero weight")


def saved_values(adapters: Sequence[OftAdapter], weights: Sequence[float], plans: Sequence[SavedPlan]) -> dict[str, torch.Tensor]:
    """Model tensor name -> the tensor the output stores (dropped ones omitted)."""
    out: dict[str, torch.Tensor] = {}
    for p in plans:
        if p.action == "drop":
            continue
        if p.action != "mean":
            assert p.source is not None
            out[p.name] = adapters[p.source].saved_tensor(p.name)
            continue
        tensors = [adapters[i].saved_tensor(p.name) for i in p.inputs]
        unit = weight_unit(torch.tensor([weights[i] for i in p.inputs], dtype=torch.float64))  # exact; 1e200 weights do not overflow
        w = [abs(weights[i]) / unit for i in p.inputs]
        acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
        for t, wi in zip(tensors, w):
            acc.add_(t.to(torch.float64), alpha=wi)
        dtypes = {t.dtype for t in tensors}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        out[p.name] = (acc / sum(w)).to(dtype)
        if out[p.name].is_floating_point() and not bool(torch.isfinite(out[p.name]).all()):
            raise NumericalError(f"saved tensor {p.name!r}: the weighted mean does not fit {str(dtype).removeprefix('torch.')}; nothing was written")
    return out
