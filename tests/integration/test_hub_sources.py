"""Inputs given as Hub ids (``ns/name[@revision]``), resolved from a Hub cache built in a temporary directory.

The cache has the layout huggingface_hub writes (``models--ns--name/{blobs,refs,snapshots/<commit>}``,
snapshot files linked to blobs) and every test runs with ``HF_HUB_OFFLINE=1``: nothing is downloaded.
The Hub's own answers for the cases a cache cannot show (no such repo, no such revision, gated) are
raised by a stand-in ``snapshot_download``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import oftmerge
from oftmerge.cli import main
from oftmerge.errors import AdapterFormatError, OftMergeError
from oftmerge.formats.sources import ResolvedSource, is_hub_id, parse_hub_id, resolve_source
from oftmerge.ops.inspect import inspect_adapters

from helpers import make_oft_adapter, save_lora_expert

hub_errors = pytest.importorskip("huggingface_hub.errors")


def commit_of(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def add_snapshot(cache: Path, repo_id: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of ``src`` in ``cache`` as huggingface_hub does: blobs by hash, the snapshot's files link to them."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def with_base_name(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = name
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def hub(llama, tmp_path_factory):
    """A Hub cache: ns/base (the f32 Llama), ns/oft-a (main, and v2 another adapter), ns/oft-b, ns/oft-hubbase (its
    config names ns/base), ns/oft-lost (names ns/missing-base), ns/lora (a LoRA expert of the base)."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    ad, base = llama["adapters"], llama["bases"]["f32"]
    snaps = {
        "base": add_snapshot(cache, "ns/base", base, commit_of("base")),
        "a": add_snapshot(cache, "ns/oft-a", ad["neumann"], commit_of("a1")),
        "a2": add_snapshot(cache, "ns/oft-a", ad["exact"], commit_of("a2"), refs=("v2",)),
        "b": add_snapshot(cache, "ns/oft-b", ad["neumann-b"], commit_of("b")),
        "hubbase": add_snapshot(cache, "ns/oft-hubbase", with_base_name(ad["neumann"], root / "hubbase", "ns/base"), commit_of("hb")),
        "lost": add_snapshot(cache, "ns/oft-lost", with_base_name(ad["neumann"], root / "lost", "ns/missing-base"), commit_of("l")),
        "lora": add_snapshot(cache, "ns/lora", save_lora_expert(root / "lora", base, seed=5), commit_of("lora")),
    }
    return {"cache": cache, "snaps": snaps, "root": root, "local": {**ad, "base": base, "lora": root / "lora"}}


@pytest.fixture(autouse=True)
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def provenance(out: Path) -> dict:
    return json.loads((out / "oftmerge.json").read_text())


def hub_record(repo_id: str, commit_name: str, revision: str | None = None) -> dict:
    return {"repo_id": repo_id, "revision": revision, "commit": commit_of(commit_name)}


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("oftmerge: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# -- what reads as a Hub id -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("ns/name", ("ns/name", None)),
        ("gpt2", ("gpt2", None)),
        ("ns/name@v1.0", ("ns/name", "v1.0")),
        ("ns/name@refs/pr/1", ("ns/name", "refs/pr/1")),
        ("my-org/Llama_3.1-8B@" + "a" * 40, ("my-org/Llama_3.1-8B", "a" * 40)),
        ("./ns/name", None),
        ("/abs/path", None),
        ("~/models/x", None),
        ("a/b/c", None),
        ("ns\\name", None),
        ("ns/na--me", None),
        ("ns/.hidden", None),
        ("ns/name@", None),
        ("", None),
    ],
)
def test_what_reads_as_a_hub_id(spec, parsed):
    assert parse_hub_id(spec) == parsed
    assert is_hub_id(spec) is (parsed is not None)


def test_resolution_is_offline_from_the_environment_cache(hub):
    src = resolve_source("ns/oft-a", "adapter")
    assert src == ResolvedSource(hub["snaps"]["a"], "ns/oft-a", None, commit_of("a1"))
    assert resolve_source(src, "adapter") is src  # resolved once per run
    assert resolve_source("ns/oft-a@v2", "adapter").path == hub["snaps"]["a2"]
    assert resolve_source(f"ns/oft-a@{commit_of('a2')}", "adapter").commit == commit_of("a2")
    not_hub = resolve_source("/nowhere/adapter", "adapter")  # the reader says what is missing there
    assert not_hub == ResolvedSource(Path("/nowhere/adapter"))


def test_a_local_directory_named_like_a_hub_id_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_oft_adapter(tmp_path / "ns" / "oft-a", seed=1)
    assert resolve_source("ns/oft-a", "adapter") == ResolvedSource(Path("ns/oft-a"))
    report = inspect_adapters(["ns/oft-a"])
    assert report["adapters"][0]["path"] == "ns/oft-a" and "hub" not in report["adapters"][0]
    result = oftmerge.merge_adapters(["ns/oft-a"], out_dir=tmp_path / "m")
    assert "hub" not in provenance(tmp_path / "m")["inputs"][0] and result.inputs[0].hub is None


# -- the commands -------------------------------------------------------------------------------------


def test_merge_of_two_hub_adapters_api_and_cli(hub, tmp_path, capsys):
    local = oftmerge.merge_adapters([hub["local"]["neumann"], hub["local"]["neumann-b"]], out_dir=tmp_path / "local")
    result = oftmerge.merge_adapters(["ns/oft-a", "ns/oft-b"], out_dir=tmp_path / "api")
    assert main(["merge", "ns/oft-a", "ns/oft-b", "-o", str(tmp_path / "cli"), "-q"]) == 0
    weights = (tmp_path / "local" / "adapter_model.safetensors").read_bytes()
    for out in ("api", "cli"):
        assert (tmp_path / out / "adapter_model.safetensors").read_bytes() == weights
        inputs = sorted(provenance(tmp_path / out)["inputs"], key=lambda i: i["hub"]["repo_id"])
        assert [i["hub"] for i in inputs] == [hub_record("ns/oft-a", "a1"), hub_record("ns/oft-b", "b")]
        assert [i["path"] for i in inputs] == [str(hub["snaps"]["a"]), str(hub["snaps"]["b"])]
        assert [i["sha256"] for i in inputs] == [i.sha256 for i in sorted(local.inputs, key=lambda i: i.path.endswith("-b"))]
    # the adapters name the local f32 base: used for the shape checks, and said so
    assert provenance(tmp_path / "api")["base"] == {"path": str(hub["local"]["base"].absolute()), "from": "adapter config"}
    assert "ns/oft-a (commit " in result.summary() and "base_model_name_or_path" in result.summary()


def test_revision_by_ref_and_by_commit(hub, tmp_path):
    local = oftmerge.merge_adapters([hub["local"]["exact"]])
    for spec, revision in (("ns/oft-a@v2", "v2"), (f"ns/oft-a@{commit_of('a2')}", commit_of("a2"))):
        result = oftmerge.merge_adapters([spec])
        assert result.inputs[0].hub == hub_record("ns/oft-a", "a2", revision)
        assert result.inputs[0].sha256 == local.inputs[0].sha256
        assert all(t.equal(local.tensors[k]) for k, t in result.tensors.items())


def test_fold_with_a_hub_base(hub, tmp_path, capsys):
    oftmerge.fold_adapter(hub["local"]["neumann"], hub["local"]["base"], tmp_path / "local")
    assert main(["fold", "ns/oft-a", "--base", "ns/base", "-o", str(tmp_path / "cli")]) == 0
    assert "into ns/base (commit " in capsys.readouterr().out
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
    prov = provenance(tmp_path / "cli")
    assert prov["base"]["hub"] == hub_record("ns/base", "base") and prov["base"]["path"] == str(hub["snaps"]["base"])
    assert prov["source"]["hub"] == hub_record("ns/oft-a", "a1")
    assert (tmp_path / "cli" / "config.json").read_bytes() == (hub["local"]["base"] / "config.json").read_bytes()


def test_merge_fold_into_a_hub_base(hub, tmp_path):
    oftmerge.merge_adapters([hub["local"]["neumann"], hub["local"]["neumann-b"]], base=hub["local"]["base"], output="model",
                            out_dir=tmp_path / "local")  # fmt: skip
    assert main(["merge", "ns/oft-a", "ns/oft-b", "--fold-into", "ns/base", "-o", str(tmp_path / "cli"), "-q"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
    prov = provenance(tmp_path / "cli")
    assert prov["base"]["hub"] == hub_record("ns/base", "base")
    assert prov["source"]["base"] == {"path": str(hub["snaps"]["base"]), "from": "given", "hub": hub_record("ns/base", "base")}
    assert {i["hub"]["repo_id"] for i in prov["source"]["inputs"]} == {"ns/oft-a", "ns/oft-b"}


def test_fold_base_defaults_to_the_one_the_adapter_names(hub, tmp_path, capsys):
    assert main(["fold", "ns/oft-hubbase", "-o", str(tmp_path / "cli")]) == 0
    assert "base: the one the adapter's config names" in capsys.readouterr().out
    result = oftmerge.fold_adapter("ns/oft-hubbase", out_dir=tmp_path / "api")
    assert result.base == hub["snaps"]["base"]
    for out in ("cli", "api"):
        assert provenance(tmp_path / out)["base"]["hub"] == hub_record("ns/base", "base")
    oftmerge.fold_adapter(hub["local"]["neumann"], out_dir=tmp_path / "local")  # names the local base directory
    assert (tmp_path / "local" / "model.safetensors").read_bytes() == (tmp_path / "api" / "model.safetensors").read_bytes()


def test_fold_without_a_base_that_resolves_says_what_was_tried(hub, tmp_path, capsys):
    one_line_error(capsys, ["fold", "ns/oft-lost", "-o", str(tmp_path / "o")],
                   "no base model given", "Hub repo ns/missing-base is not in the Hub cache", str(hub["cache"]), "--base")  # fmt: skip
    make_oft_adapter(tmp_path / "tiny", seed=1)  # TinyNet: the config names no base
    with pytest.raises(AdapterFormatError, match=r"tiny: no base model given, and the adapter's config names none.*--base"):
        oftmerge.fold_adapter(tmp_path / "tiny", out_dir=tmp_path / "o")


def test_merge_and_inspect_use_a_named_base_only_when_at_hand(hub, tmp_path):
    result = oftmerge.merge_adapters(["ns/oft-hubbase"], dry_run=True)  # ns/base is in the cache
    assert result.base == {"path": str(hub["snaps"]["base"]), "from": "adapter config", "hub": hub_record("ns/base", "base")}
    assert oftmerge.merge_adapters(["ns/oft-lost"], dry_run=True).base is None  # not cached: no base, no error
    report = inspect_adapters(["ns/oft-hubbase"])
    assert report["base"]["hub"] == hub_record("ns/base", "base") and report["adapters"][0]["hub"] == hub_record("ns/oft-hubbase", "hb")
    assert inspect_adapters(["ns/oft-lost"])["base"] is None


def test_decouple_with_a_hub_lora_expert(hub, tmp_path):
    local = oftmerge.decouple_merge(hub["local"]["base"], [hub["local"]["lora"]], out_dir=tmp_path / "local", threads=1)
    result = oftmerge.decouple_merge("ns/base", ["ns/lora"], out_dir=tmp_path / "hub", threads=1)
    assert (tmp_path / "hub" / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
    prov = provenance(tmp_path / "hub")
    assert prov["base"] == str(hub["snaps"]["base"]) and prov["base_hub"] == hub_record("ns/base", "base")
    assert prov["experts"][0]["hub"] == hub_record("ns/lora", "lora") and prov["experts"][0]["sha256"] == local.experts[0].sha256
    assert "ns/lora (commit " in result.summary()


def test_an_output_over_a_snapshot_is_refused(hub, capsys):
    one_line_error(capsys, ["fold", "ns/oft-a", "--base", "ns/base", "-o", str(hub["snaps"]["a"]), "--overwrite"],
                   "the output would replace the adapter")  # fmt: skip


# -- failed resolutions: one line, what was looked for and where ----------------------------------------


def test_offline_misses(hub, tmp_path, capsys):
    cache = str(hub["cache"])
    one_line_error(capsys, ["merge", "ns/nothere", "-o", str(tmp_path / "m")],
                   "ns/nothere: no such adapter directory", "Hub repo ns/nothere is not in the Hub cache", cache,
                   "HF_HUB_OFFLINE=1")  # fmt: skip
    one_line_error(capsys, ["merge", "ns/oft-a@nope", "-o", str(tmp_path / "m")],
                   "revision nope of Hub repo ns/oft-a (cached: main, v2, ", commit_of("a1")[:12], commit_of("a2")[:12], cache)  # fmt: skip
    one_line_error(capsys, ["fold", "ns/oft-a", "--base", "ns/other-base", "-o", str(tmp_path / "m")],
                   "ns/other-base: no such base model directory", "Hub repo ns/other-base is not in the Hub cache")  # fmt: skip
    one_line_error(capsys, ["decouple", "--base", "ns/base", "ns/lora@main", "ns/lora-2", "-o", str(tmp_path / "m")],
                   "ns/lora-2: no such expert directory")  # fmt: skip
    one_line_error(capsys, ["inspect", "ns/oft-a", "--base", "ns/nope"], "ns/nope: no such base model directory")


def _hub_error(cls):
    exc = cls.__new__(cls)  # the Hub's answer, without an HTTP response to build it from
    Exception.__init__(exc, "404 Client Error")
    return exc


@pytest.mark.parametrize(
    "error, needles",
    [
        (hub_errors.RepositoryNotFoundError, ("ns/x: no such adapter directory, and no Hub repo ns/x", "HF_TOKEN")),
        (hub_errors.RevisionNotFoundError, ("ns/x@v9: Hub repo ns/x has no revision 'v9'",)),
        (hub_errors.GatedRepoError, ("Hub repo ns/x at revision v9 is gated", "https://huggingface.co/ns/x", "HF_TOKEN")),
        (hub_errors.LocalEntryNotFoundError, ("Hub repo ns/x is not in the Hub cache", "the Hub could not be reached")),
        (ConnectionResetError, ("downloading Hub repo ns/x at revision v9", "failed: ConnectionResetError")),
    ],
)
def test_online_answers_of_the_hub(error, needles, hub, monkeypatch, tmp_path, capsys):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        raise _hub_error(error) if issubclass(error, hub_errors.HfHubHTTPError) else error("boom")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    spec = "ns/x" if error is hub_errors.RepositoryNotFoundError or error is hub_errors.LocalEntryNotFoundError else "ns/x@v9"
    one_line_error(capsys, ["merge", spec, "-o", str(tmp_path / "m")], *needles)
    repo_id, kw = calls[0]
    assert repo_id == "ns/x" and kw["local_files_only"] is False and kw["cache_dir"] == hub["cache"]
    assert "*.safetensors" in kw["allow_patterns"] and "*.bin" not in kw["allow_patterns"] and kw["ignore_patterns"] == ["*/*"]


def test_without_huggingface_hub(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(OftMergeError, match=r"ns/oft-a: no such adapter directory; to read it as a Hub id, install huggingface_hub"):
        oftmerge.merge_adapters(["ns/oft-a"])


def test_a_fold_config_records_hub_inputs_by_commit(hub, tmp_path):
    from oftmerge.config import FoldConfig
    from oftmerge.plan.fold import fold_base, plan_fold

    config = FoldConfig(*fold_base("ns/oft-hubbase"))
    data = config.to_dict()
    assert (data["adapter"], data["base"]) == (f"ns/oft-hubbase@{commit_of('hb')}", f"ns/base@{commit_of('base')}")
    again = plan_fold(FoldConfig.from_dict(data), dry_run=True)  # the recipe reads the same snapshots again
    assert again.base == hub["snaps"]["base"] and again.source["hub"]["revision"] == commit_of("hb")


def test_convert_a_hub_adapter(hub, tmp_path, capsys):
    assert main(["convert", "ns/oft-a@v2", "-o", str(tmp_path / "c"), "-q"]) == 0
    assert provenance(tmp_path / "c")["inputs"][0]["hub"] == hub_record("ns/oft-a", "a2", "v2")
