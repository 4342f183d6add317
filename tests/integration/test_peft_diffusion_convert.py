"""PEFT OFT adapters into diffusion formats, where exact: the golden fixtures of PEFT 0.13.2 and 0.21.2 are the oracle.

PEFT 0.7-0.13 rotates the output side with the exact Cayley map, as LyCORIS does: converted to a
LyCORIS file, LyCORIS's own loader gives PEFT 0.13.2's ``merge_and_unload`` weights. PEFT >= 0.14
rotates the input side, as OneTrainer does: with the same 5-term series the OneTrainer file folds
to PEFT 0.21.2's weights; other pairs are refused with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oftmerge.errors import IncompatibleAdaptersError
from oftmerge.formats.diffusion import read_diffusion_adapter
from oftmerge.kernels.fold import fold_rescaled
from oftmerge.ops.diffusion import convert_diffusion

from helpers import GOLDEN, golden_model

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def _expected(case: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("merged."): v for k, v in load_file(str(case / "expected.safetensors")).items()}


def _fold(path: Path, case: Path, prefix: str) -> dict[str, torch.Tensor]:
    a = read_diffusion_adapter(path)
    base = load_file(str(case / "base.safetensors"))
    out = {}
    for name, mod in a.modules.items():
        key = name.removeprefix(prefix) + ".weight"
        out[key] = fold_rescaled(base[key], a.rotation_map.rotation(a.generator(name)), mod.spec(a.side), a.rescale(name))
    return out


def test_peft_013_to_lycoris_is_what_peft_013_merges(tmp_path: Path) -> None:
    case = GOLDEN / "peft-0.13.2" / "conv"
    out = convert_diffusion(case / "adapter", tmp_path / "conv.safetensors", to="lycoris").saved_to
    assert out is not None
    expected = _expected(case)
    for key, w in _fold(out, case, "lora_unet_").items():
        assert float((w - expected[key]).abs().max()) < 1e-6
    # LyCORIS's own loader, on the golden model (its generic wrapper names modules lycoris_<path>)
    renamed = tmp_path / "lycoris.safetensors"
    save_file({k.replace("lora_unet_", "lycoris_", 1): v for k, v in load_file(str(out)).items()}, str(renamed))
    model = golden_model().make_model()
    model.load_state_dict(load_file(str(case / "base.safetensors")))
    net, _ = lycoris.create_lycoris_from_weights(1.0, str(renamed), model)
    assert len(net.loras) == 1
    net.merge_to()
    assert float((model.state_dict()["conv.weight"] - expected["conv.weight"]).abs().max()) < 1e-5


def test_peft_013_blocks_lycoris_cannot_load_are_refused(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleAdaptersError):  # `wide` pads 10 rows to 12; `tall` has 4 blocks of 6 (LyCORIS needs b <= blocks)
        convert_diffusion(GOLDEN / "peft-0.13.2" / "exact_r4" / "adapter", tmp_path / "x.safetensors", to="lycoris")
    assert not (tmp_path / "x.safetensors").exists()


def test_peft_021_neumann_to_onetrainer_is_what_peft_021_merges(tmp_path: Path) -> None:
    case = GOLDEN / "peft-0.21.2" / "neumann5_bs8"
    out = convert_diffusion(case / "adapter", tmp_path / "ot.safetensors", to="onetrainer").saved_to
    assert out is not None and read_diffusion_adapter(out).format == "onetrainer"
    expected = _expected(case)
    folded = _fold(out, case, "lora_unet_")
    assert set(folded) == {"sq.weight", "tall.weight", "wide.weight", "head.weight"}
    for key, w in folded.items():
        assert float((w - expected[key]).abs().max()) < 1e-6


@pytest.mark.parametrize(("case", "to", "needle"), [
    ("exact_bs4", "onetrainer", "--approximate"),
    ("exact_bs4", "lycoris", "input side"),
    ("neumann5_bs8", "kohya", "input side"),
])  # fmt: skip
def test_inexact_conversions_are_refused(tmp_path: Path, case: str, to: str, needle: str) -> None:
    with pytest.raises(IncompatibleAdaptersError, match=needle):
        convert_diffusion(GOLDEN / "peft-0.21.2" / case / "adapter", tmp_path / "x.safetensors", to=to)
    assert not (tmp_path / "x.safetensors").exists()
