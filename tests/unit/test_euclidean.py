"""Euclidean merge methods (TA, TIES, DARE, TSV-M) as pure functions, against literal transcriptions."""

from __future__ import annotations

import pytest
import torch

from oftmerge.errors import OftMergeError
from oftmerge.methods import available_methods
from oftmerge.methods.euclidean import TensorContext, euclidean_methods, get_euclidean_method, trim_magnitudes

from helpers import F64, rand

CTX = TensorContext("model.layers.0.mlp.down_proj.weight")


def ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=F64)


def run(name: str, taus, w=None, ctx=CTX, **options):
    return get_euclidean_method(name)(taus, ones(taus.shape[0]) if w is None else w, context=ctx, **options)[0]


def test_registry_is_separate_from_the_oft_methods():
    assert list(euclidean_methods()) == ["ta", "ties", "dare", "tsv"]
    assert "ties" not in available_methods() and "orthomerge" in available_methods()
    for m in euclidean_methods().values():
        assert m.reference and m.summary and "scale" in m.option_defaults()
    with pytest.raises(OftMergeError, match="unknown Euclidean merge method 'slerp'; choose one of: ta, ties, dare, tsv"):
        get_euclidean_method("slerp")
    with pytest.raises(OftMergeError, match="method 'ties' has no option 'p'"):
        get_euclidean_method("ties").resolve_options({"p": 0.5})
    with pytest.raises(OftMergeError, match="option 'density' of method 'ties' expects float, got 'lots'"):
        get_euclidean_method("ties").resolve_options({"density": "lots"})


def test_task_arithmetic_is_the_scaled_weighted_sum():
    taus = rand(3, 5, 4, seed=0)
    w = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    assert torch.allclose(run("ta", taus, w, scale=0.3), 0.3 * (taus[0] - 0.5 * taus[1] + 2 * taus[2]), atol=1e-15)


def literal_ties(taus: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023), written out: trim, elect, disjoint mean."""
    n = taus.shape[0]
    flat = taus.reshape(n, -1)
    k = int(density * flat.shape[1])
    trimmed = torch.zeros_like(flat)
    for i in range(n):
        idx = flat[i].abs().argsort(descending=True)[:k]
        trimmed[i, idx] = flat[i, idx]
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    out = torch.zeros(flat.shape[1], dtype=F64)
    for j in range(flat.shape[1]):
        agree = [float(trimmed[i, j]) for i in range(n) if trimmed[i, j] != 0 and torch.sign(trimmed[i, j]) == sign[j]]
        out[j] = sum(agree) / len(agree) if agree else 0.0
    return out.reshape(taus.shape[1:])


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_its_definition_and_peft(density):
    from peft.utils.merge_utils import ties as peft_ties

    taus = rand(3, 6, 7, seed=1)
    got = run("ties", taus, density=density)
    assert torch.allclose(got, literal_ties(taus, density), atol=1e-15)
    if density < 1:
        assert torch.allclose(got, peft_ties(list(taus), ones(3), density), atol=1e-15)
    assert torch.allclose(run("ties", taus, density=density, scale=2.0), 2 * got, atol=1e-15)


def test_ties_on_agreeing_experts_is_their_mean():
    base = rand(4, 4, seed=2).abs()
    taus = torch.stack([base, 2 * base, 3 * base])
    assert torch.allclose(run("ties", taus, density=1.0), 2 * base, atol=1e-15)


def test_ties_model_wide_thresholds():
    taus = rand(2, 10, 10, seed=3)
    ctx = TensorContext("x", thresholds=(1.0, 0.5))
    trimmed = trim_magnitudes(taus, 0.2, ctx.thresholds)
    assert bool(((trimmed[0] != 0) == (taus[0].abs() >= 1.0)).all())
    assert bool(((trimmed[1] != 0) == (taus[1].abs() >= 0.5)).all())
    got = run("ties", taus, ctx=ctx, trim="model")
    assert torch.allclose(got, literal_ties(trimmed, 1.0), atol=1e-15)
    with pytest.raises(OftMergeError, match="TIES trim must be 'tensor' or 'model', got 'layer'"):
        run("ties", taus, trim="layer")
    with pytest.raises(OftMergeError, match=r"TIES density must be in \(0, 1\], got 1.5"):
        run("ties", taus, density=1.5)


def test_dare_is_seeded_per_tensor_name_and_expert():
    taus = rand(2, 64, 64, seed=4)
    a = run("dare", taus, p=0.5)
    assert torch.equal(a, run("dare", taus, p=0.5))  # deterministic
    assert not torch.equal(a, run("dare", taus, ctx=TensorContext("other.weight"), p=0.5))
    assert not torch.equal(a, run("dare", taus, p=0.5, seed=1))
    # an expert's mask depends on its global index, not on which other experts change the tensor
    alone = run("dare", taus[1:], ctx=TensorContext(CTX.name, experts=(1,)), p=0.5)
    both = run("dare", taus, ctx=TensorContext(CTX.name, experts=(0, 1)), p=0.5)
    first = run("dare", taus[:1], ctx=TensorContext(CTX.name, experts=(0,)), p=0.5)
    assert torch.allclose(both, first + alone, atol=1e-14)
    # each kept entry is rescaled by 1 / (1 - p); about 1 - p of them are kept
    kept = first != 0
    assert torch.allclose(first[kept], taus[0][kept] / 0.5, atol=1e-14)
    assert 0.45 < float(kept.double().mean()) < 0.55
    assert torch.equal(run("dare", taus, p=0.0), run("ta", taus))
    with pytest.raises(OftMergeError, match=r"DARE drop probability p must be in \[0, 1\), got 1.0"):
        run("dare", taus, p=1.0)


def test_dare_is_unbiased():
    taus = torch.full((1, 200, 200), 0.7, dtype=F64)
    assert float(run("dare", taus, p=0.9).mean()) == pytest.approx(0.7, rel=0.05)


def test_tsv_definition():
    """TSV-M (Gargiulo et al. 2025): top rank/N triplets per task, U and V orthogonalised, reconstructed."""
    taus = rand(3, 9, 12, seed=5)
    n, k = 3, 9 // 3
    us, ss, vs = [], [], []
    for t in taus:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    pu, _, qu = torch.linalg.svd(u, full_matrices=False)
    pv, _, qv = torch.linalg.svd(v, full_matrices=False)
    want = (pu @ qu) @ torch.diag(s) @ (pv @ qv).T
    assert torch.allclose(run("tsv", taus), want, atol=1e-12)
    assert n * k <= 9


def test_tsv_on_orthogonal_low_rank_tasks_is_their_sum():
    q, _ = torch.linalg.qr(rand(8, 8, seed=6))
    p, _ = torch.linalg.qr(rand(10, 10, seed=7))
    taus = torch.stack([3.0 * torch.outer(q[:, 0], p[:, 0]) + torch.outer(q[:, 1], p[:, 1]),
                        2.0 * torch.outer(q[:, 2], p[:, 2]) + 0.5 * torch.outer(q[:, 3], p[:, 3])])
    assert torch.allclose(run("tsv", taus), taus.sum(0), atol=1e-12)  # disjoint singular spaces: nothing to fix


def test_tsv_averages_tensors_that_are_not_matrices():
    taus = rand(4, 7, seed=8)
    assert torch.allclose(run("tsv", taus), taus.mean(0), atol=1e-15)
    with pytest.raises(OftMergeError, match="keeps 3x4 > rank 9 singular vectors"):
        run("tsv", rand(3, 9, 12, seed=9), fraction=0.5)


@pytest.mark.parametrize("data", ["random", "discrete", "adversarial"])
def test_kth_largest_is_exact_whatever_the_sample_says(monkeypatch, data):
    import oftmerge.methods.euclidean as E

    monkeypatch.setattr(E, "_BRACKET_MIN", 1000)
    monkeypatch.setattr(E, "_SAMPLE", 64)
    g = torch.Generator().manual_seed(5)
    n = 5003
    if data == "random":
        a = torch.rand(n, dtype=F64, generator=g)
    elif data == "discrete":  # bf16-like deltas: few distinct magnitudes, many ties
        a = torch.randint(0, 7, (n,), generator=g).to(F64) / 4
    else:  # the strided sample sees only zeros: the bracket misses and the plain selection runs
        a = torch.zeros(n, dtype=F64)
        a[torch.arange(n) % (n // 64) != 0] = torch.rand(n - 65, dtype=F64, generator=g) + 1
    for k in (1, 2, 17, n // 5, n // 2, n - 1, n):
        assert float(E._kth_largest(a, k)) == float(torch.kthvalue(a, n - k + 1).values), k


def test_ties_trim_keeps_exactly_k_with_tied_magnitudes():
    """Many equal magnitudes at the cut (as bf16 task vectors have): exactly int(density * numel)
    entries stay, the lowest indices among the tied ones, the same magnitudes PEFT keeps."""
    from peft.utils.merge_utils import magnitude_based_pruning

    g = torch.Generator().manual_seed(6)
    taus = (torch.randint(-3, 4, (2, 40, 30), generator=g) / 8).to(F64)
    trimmed = trim_magnitudes(taus, 0.3)
    k = int(0.3 * 1200)
    for t, mine in zip(taus, trimmed):
        assert int(torch.count_nonzero(mine)) == k == int(torch.count_nonzero(magnitude_based_pruning(t, 0.3)))
        kept = mine.abs().flatten()[mine.flatten() != 0].sort().values
        theirs = magnitude_based_pruning(t, 0.3)
        assert torch.equal(kept, theirs.abs().flatten()[theirs.flatten() != 0].sort().values)
        cut = float(kept.min())
        tied = torch.nonzero(t.abs().flatten() == cut).flatten()
        chosen = torch.nonzero((mine.flatten() != 0) & (t.abs().flatten() == cut)).flatten()
        assert torch.equal(chosen, tied[: chosen.numel()])  # lowest indices first
        assert torch.equal(mine[mine != 0], t[mine != 0])  # kept entries unchanged
