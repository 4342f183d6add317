"""Helpers shared by the tests: ``from helpers import ...`` (conftest.py holds only fixtures).

* tiny models and real PEFT OFT adapters with non-trivial generators (:class:`TinyNet`,
  :func:`make_oft_adapter`, :func:`load_peft`) and tiny Llama checkpoints (:func:`save_llama`, ...);
* the golden fixtures made by old PEFT releases (:data:`GOLDEN`, :func:`golden_model`);
* independent references for the OFT math, written from PEFT's source and the paper, never through
  oftmerge: :func:`read_full_generator` reads an adapter directory with nothing but json + safetensors,
  :func:`orthomerge_generator` is Eq. 7-8, :func:`peft_cayley` / :func:`peft_neumann` are the maps PEFT
  applies. A test compares oftmerge's output with them through PEFT's own forward or merge.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "adapters"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = FIXTURES / "golden"
F64 = torch.float64


# -- random matrices ---------------------------------------------------------------------------------


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded standard normal float64 entries times ``scale``."""
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale


def rotation(d: int, seed: int, size: float = 0.1) -> torch.Tensor:
    """A seeded ``d x d`` rotation ``exp(A - A^T)`` near the identity (``size`` scales ``A``)."""
    a = rand(d, d, seed=seed, scale=size)
    return torch.linalg.matrix_exp(a - a.T)


# -- golden fixtures ----------------------------------------------------------------------------------


@functools.cache
def golden_model() -> ModuleType:
    """``tests/fixtures/golden/golden_model.py``, loaded by path (it imports nothing but torch)."""
    spec = importlib.util.spec_from_file_location("golden_model", GOLDEN / "golden_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- TinyNet and its PEFT adapters --------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    """Linear layers of several shapes (square, wide, tall), an embedding and a 3x3 conv."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(20, 16)
        self.lin_sq = torch.nn.Linear(16, 16)
        self.lin_wide = torch.nn.Linear(16, 24)  # in 16 -> out 24
        self.lin_tall = torch.nn.Linear(24, 8)
        self.conv = torch.nn.Conv2d(2, 4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, ids: torch.Tensor, img: torch.Tensor | None = None) -> torch.Tensor:
        h = self.emb(ids)
        h = torch.tanh(self.lin_sq(h))
        h = torch.tanh(self.lin_wide(h))
        out = self.lin_tall(h)
        if img is not None:
            out = out + self.conv(img).mean((1, 2, 3)).view(-1, 1, 1)
        return out


def make_oft_adapter(
    path: Path,
    *,
    seed: int,
    targets: Sequence[str] = ("lin_sq", "lin_wide", "lin_tall"),
    std: float = 0.05,
    model_seed: int = 0,
    **config,
) -> torch.nn.Module:
    """Create a PEFT (installed release) OFT adapter with random generators, save it, return the PeftModel."""
    from peft import OFTConfig, get_peft_model

    config.setdefault("oft_block_size", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(TinyNet(model_seed), OFTConfig(target_modules=list(targets), **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(str(path))
    model.eval()
    return model


def load_peft(path: Path, model_seed: int = 0):
    from peft import PeftModel

    return PeftModel.from_pretrained(TinyNet(model_seed), str(path)).eval()


# -- tiny Llama checkpoints (folding) -----------------------------------------------------------------

#: a tiny diffusers UNet2DConditionModel: Linear attention layers, 1x1 proj_in/proj_out and 3x3 resnet convs
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]
LLAMA_IDS = torch.tensor([[1, 5, 77, 299, 3, 150, 42, 8], [9, 0, 250, 13, 64, 199, 7, 101]])


def llama_config(**kw):
    from transformers import LlamaConfig

    # GQA: 4 query heads, 2 key/value heads, so k_proj/v_proj are (32, 64) while q_proj is (64, 64)
    args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=300, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    return LlamaConfig(**{**args, **kw})


def save_llama(path: Path, *, dtype=torch.float32, seed=0, **kw) -> Path:
    """A randomly initialised tiny Llama saved with ``save_pretrained`` (``max_shard_size`` passed through)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**{k: v for k, v in kw.items() if k != "max_shard_size"})).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": kw["max_shard_size"]} if "max_shard_size" in kw else {}))
    return path


def load_llama(path: Path, dtype=None):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype else {})).eval()


def make_llama_adapter(path: Path, base: Path, *, seed: int, targets=LLAMA_TARGETS, std=0.05, **config) -> Path:
    """A PEFT OFT adapter with seeded random generators (no training); base weights are not saved in it."""
    from peft import OFTConfig, get_peft_model

    config.setdefault("oft_block_size", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_llama(base), OFTConfig(target_modules=list(targets), **config))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "oft_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        model.save_pretrained(path, save_embedding_layers=False)
    return path


def peft_llama(base: Path, adapter: Path, dtype=None):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load_llama(base, dtype), str(adapter)).eval()


def digests(path: Path) -> dict[str, str]:
    """SHA-256 of every file directly under ``path``, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


# -- independent references for the OFT math ----------------------------------------------------------
#
# Conventions, from peft/tuners/oft/layer.py (0.18+) and checked there:
# * a stored row of b(b-1)/2 numbers is the upper triangle of a block, Q = U - U^T (_pytorch_skew_symmetric);
# * exact map (use_cayley_neumann=False): R = solve(I + Q, I - Q, left=False) = (I - Q)(I + Q)^-1;
# * Cayley-Neumann series: R = I + 2Q + 2Q^2 + ... ~ (I + Q)(I - Q)^-1, the exact map of -Q;
# * a Linear layer computes (x R) W^T: the merged weight is W R^T.
# "Canonical sign" is the generator whose exact map is the rotation meant: +Q for exact, -Q for Neumann.


def skew_from_triangles(rows: torch.Tensor, b: int) -> torch.Tensor:
    """``(n, b(b-1)/2)`` upper triangles -> ``(n, b, b)`` skew-symmetric blocks, in float64."""
    r, c = torch.triu_indices(b, b, 1)
    q = torch.zeros(rows.shape[0], b, b, dtype=F64)
    q[:, r, c] = rows.double()
    return q - q.transpose(-1, -2)


def peft_cayley(q: torch.Tensor) -> torch.Tensor:
    """PEFT's exact Cayley map of skew ``q`` (``(..., d, d)``): ``(I - Q)(I + Q)^-1``."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def peft_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT >= 0.18's truncated series, transcribed from ``_cayley_batch`` line by line."""
    r = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q).clone()
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            power = q @ q
            r = r + 2.0 * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2.0 * power
            power = power @ q
            r = r + power
    return r


def read_full_generator(adapter_dir: Path, name: str, width: int) -> torch.Tensor:
    """The whole ``(width, width)`` block-diagonal generator of module ``name`` in canonical sign.

    Read from the directory with json + safetensors only (PEFT >= 0.16 packed layout, no COFT):
    ``block_share`` blocks are repeated to the width, the sign follows ``use_cayley_neumann``.
    """
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    assert not config.get("coft"), "the independent generator does not re-implement COFT"
    tensors = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    (key,) = [k for k in (f"base_model.model.{name}.oft_R.weight", f"base_model.model.{name}.oft_embedding_R.weight") if k in tensors]
    stored = tensors[key]
    b = next(b for b in range(2, width + 1) if b * (b - 1) // 2 == stored.shape[1])
    blocks = skew_from_triangles(stored, b)
    if config.get("block_share"):
        assert blocks.shape[0] == 1
        blocks = blocks.expand(width // b, b, b)
    assert blocks.shape[0] * b == width, (name, blocks.shape, width)
    sign = -1.0 if config.get("use_cayley_neumann", True) else 1.0
    return sign * torch.block_diag(*blocks)


def orthomerge_generator(qs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """OrthoMerge (paper Eq. 7-8) over whole modules: ``Q_m = m S / ||S||_F``.

    ``S = sum_i w_i Q_i`` and ``m = sum_i |w_i| ||Q_i||_F / sum_i |w_i|`` (the merged generator keeps the
    inputs' mean norm); ``qs`` are canonical-sign generators of one module.
    """
    s = sum(w * q for w, q in zip(weights, qs))
    m = sum(abs(w) * q.norm() for w, q in zip(weights, qs)) / sum(abs(w) for w in weights)
    return m * s / s.norm()


def peft_rotation(q: torch.Tensor, neumann_terms: int | None = None) -> torch.Tensor:
    """The rotation PEFT applies for canonical generator ``q`` written exact (``None``) or as an n-term series."""
    return peft_cayley(q) if neumann_terms is None else peft_neumann(-q, neumann_terms)


def rotated_copy(model: torch.nn.Module, rotations: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``model`` with each named Linear's weight replaced by ``W R^T`` (float64 product, stored in the weight's dtype)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, r in rotations.items():
            w = modules[name].weight
            w.copy_((w.double() @ r.T).to(w.dtype))
    return model


# -- decoupling experts of a base model directory (as scripts/reference_outputs.py makes them) --------


def save_lora_expert(path: Path, base: Path, *, seed: int, targets: Sequence[str] = ("q_proj", "v_proj", "down_proj"), r: int = 4) -> Path:
    """A PEFT LoRA adapter of the ``transformers`` model in ``base`` with seeded random A and B (no training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(str(path))
    return path


def save_full_expert(path: Path, base: Path, *, seed: int, std: float = 0.01) -> Path:
    """A "full finetune" of the one-file model in ``base``: every floating tensor plus seeded noise, other files copied."""
    import shutil

    from safetensors.torch import load_file, save_file

    path.mkdir(parents=True)
    for f in Path(base).iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copyfile(f, path / f.name)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(Path(base) / "model.safetensors"))
    out = {k: (t + std * torch.randn(t.shape, generator=g).to(t.dtype)) if t.is_floating_point() else t for k, t in sorted(tensors.items())}
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


# -- every generator of an adapter directory (the architecture matrix) --------------------------------


def stored_generators(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Module name -> its whole canonical-sign generator (:func:`read_full_generator`), for every OFT module stored.

    The width is read off the stored tensor (blocks x block size; PEFT >= 0.16 packed layout, no ``block_share``).
    """
    from safetensors import safe_open

    shapes = {}
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            for suffix in (".oft_R.weight", ".oft_embedding_R.weight"):
                if key.endswith(suffix):
                    shapes[key.removeprefix("base_model.model.").removesuffix(suffix)] = f.get_slice(key).get_shape()
    out = {}
    for name, (rows, n) in sorted(shapes.items()):
        b = next(b for b in range(2, 4 * n + 2) if b * (b - 1) // 2 == n)
        out[name] = read_full_generator(adapter_dir, name, rows * b)
    return out


# -- PyTorch .bin bases (as transformers 4 saved them) --------------------------------------------------


def save_bin(src: Path, dst: Path, *, shards: int = 1, legacy: bool = False) -> Path:
    """The safetensors model directory ``src`` re-saved as ``.bin``, the way ``transformers`` 4 wrote it.

    ``torch.save`` of the state dict (checkpoint names, file order) to ``pytorch_model.bin``, or cut into
    ``shards`` files ``pytorch_model-0000i-of-0000n.bin`` of about equal bytes with the index
    ``pytorch_model.bin.index.json`` (``metadata.total_size``, ``weight_map`` sorted by name); ``legacy``:
    the pre-1.6 non-zip pickle format. Other files (config.json, ...) are copied.
    """
    import shutil

    from safetensors import safe_open

    dst.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(src).iterdir()):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as sf:
                tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
        elif f.is_file() and not f.name.endswith(".index.json"):
            shutil.copyfile(f, dst / f.name)
    if shards == 1:
        torch.save(tensors, dst / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return dst
    total = sum(t.nbytes for t in tensors.values())
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        if parts[-1] and size + t.nbytes > total * len(parts) / shards and len(parts) < shards:
            parts.append({})
        parts[-1][k] = t
        size += t.nbytes
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin"
        torch.save(part, dst / name, _use_new_zipfile_serialization=not legacy)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return dst


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (safetensors or .bin, sharded or not), by its checkpoint name."""
    from oftmerge.formats.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    return {k: ckpt.read(k) for k in ckpt.keys()}


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest ``max |a - b| / max |b|`` over the tensors of two state dicts with the same names."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:6]
    return max(float((a[k].double() - b[k].double()).abs().max()) / max(float(b[k].double().abs().max()), 1e-30) for k in b)
