"""oftmerge.formats.base: the adapter-format registry (PEFT OFT first), detection by directory or file, one-line
errors for what is not an OFT adapter, and a toy format plugged in through register_format."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

import oftmerge.formats.base as fbase
from oftmerge.errors import AdapterFormatError
from oftmerge.formats import PEFT_OFT, available_formats, detect_format, get_format, read_adapter, read_oft_adapter, register_format
from oftmerge.formats.peft_oft import OftAdapter

from helpers import ADAPTERS, TinyNet

UPPER = ADAPTERS / "oft-upper"


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, msg
    return msg


def test_peft_oft_is_the_first_format():
    fmts = available_formats()
    assert next(iter(fmts)) == "peft-oft"
    assert fmts["peft-oft"] is PEFT_OFT and get_format("peft-oft") is PEFT_OFT
    fmts.pop("peft-oft")  # a copy: the registry is not changed through it
    assert "peft-oft" in available_formats()


def test_get_format_unknown_lists_the_formats():
    with pytest.raises(AdapterFormatError) as info:
        get_format("gguf")
    msg = one_line(info.value)
    assert "'gguf'" in msg and "peft-oft" in msg


@pytest.mark.parametrize("where", ["dir", "config", "weights"])
def test_detect_format_of_an_adapter_by_dir_config_or_weights(where):
    path = {"dir": UPPER, "config": UPPER / "adapter_config.json", "weights": UPPER / "adapter_model.safetensors"}[where]
    assert detect_format(path) is PEFT_OFT
    assert detect_format(str(path)) is PEFT_OFT
    read = read_oft_adapter(path)
    assert isinstance(read, OftAdapter) and read.path == UPPER
    assert set(read.modules) == set(read_adapter(UPPER).modules)


def _lora_dir(path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(TinyNet(0), LoraConfig(r=2, target_modules=["lin_sq"])).save_pretrained(str(path))
    return path


def test_a_lora_adapter_is_not_detected(tmp_path):
    lora = _lora_dir(tmp_path / "lora")
    assert not PEFT_OFT.detect(lora)
    for path in (lora, lora / "adapter_config.json", lora / "adapter_model.safetensors"):
        with pytest.raises(AdapterFormatError) as info:
            detect_format(path)
        msg = one_line(info.value)
        assert "LORA" in msg and "decouple" in msg
        with pytest.raises(AdapterFormatError):
            read_oft_adapter(path)


@pytest.mark.parametrize("case", ["empty", "model", "broken-json", "missing"])
def test_a_non_adapter_path_raises_one_line(tmp_path, case):
    path = tmp_path / "thing"
    if case == "empty":
        path.mkdir()
    elif case == "model":
        shutil.copytree(ADAPTERS / "base", path)
    elif case == "broken-json":
        path.mkdir()
        (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError) as info:
        detect_format(path)
    assert str(path) in one_line(info.value)


# -- a toy format -----------------------------------------------------------------------------------------

MARKER = "toy-format.json"


class ToyFormat:
    """A directory with a marker file and, under ``payload/``, a PEFT OFT adapter it stands for."""

    name = "toy-test-format"

    def __init__(self) -> None:
        self.reads: list[tuple[Path, dict[str, Any]]] = []

    def detect(self, path: Path) -> bool:
        return (Path(path) / MARKER).is_file()

    def read(self, path: Path, **options: Any) -> OftAdapter:
        self.reads.append((Path(path), options))
        return read_adapter(Path(path) / json.loads((Path(path) / MARKER).read_text())["payload"], **options)

    def write(self, directory, tensors, config, extra_files) -> None:  # pragma: no cover - not used here
        raise NotImplementedError


@pytest.fixture
def toy():
    fmt = ToyFormat()
    register_format(fmt)
    try:
        yield fmt
    finally:
        fbase._FORMATS.pop(fmt.name, None)


@pytest.fixture
def toy_dir(tmp_path):
    path = tmp_path / "toy"
    shutil.copytree(UPPER, path / "payload")
    (path / MARKER).write_text(json.dumps({"payload": "payload"}))
    return path


def test_a_registered_format_is_detected_and_read(toy, toy_dir):
    assert list(available_formats())[-1] == toy.name and list(available_formats())[0] == "peft-oft"
    assert detect_format(toy_dir) is toy
    assert detect_format(toy_dir / "payload") is PEFT_OFT  # the first format that says yes
    read = read_oft_adapter(toy_dir, peft_release="0.18")
    assert toy.reads == [(toy_dir, {"peft_release": "0.18"})]
    direct = read_adapter(UPPER)
    assert isinstance(read, OftAdapter) and set(read.modules) == set(direct.modules)
    assert read.content_hash() == direct.content_hash()
    assert read_oft_adapter(toy_dir, format=toy.name).content_hash() == direct.content_hash()
    assert len(toy.reads) == 2


def test_without_the_toy_format_the_toy_dir_is_not_an_adapter(toy_dir):
    assert ToyFormat.name not in available_formats()
    with pytest.raises(AdapterFormatError):
        detect_format(toy_dir)


def test_registering_a_name_twice_raises(toy):
    with pytest.raises(RuntimeError, match="registered twice"):
        register_format(ToyFormat())
    with pytest.raises(RuntimeError, match="'peft-oft' registered twice"):
        register_format(PEFT_OFT)
    assert available_formats()[toy.name] is toy  # the first registration stands
