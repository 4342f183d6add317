"""The merge methods as pure functions: formulas, invariances, degenerate inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from oftmerge.errors import OftMergeError
from oftmerge.linalg import cayley, polar
from oftmerge.methods import available_methods, get_method

from helpers import orthomerge_generator


def skew_stack(n: int, blocks: int, b: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    a = torch.randn(n, blocks, b, b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return a - a.transpose(-1, -2)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_orthomerge_matches_the_paper_formula(n):
    qs = skew_stack(n, 3, 4, seed=n)
    ones = torch.ones(n, dtype=torch.float64)
    q, stats = get_method("orthomerge")(qs, ones)
    s = qs.sum(0)
    c = sum(float(x.norm()) for x in qs) / float(s.norm())
    assert torch.allclose(q, c * s / n, atol=1e-14)  # Eq. 7-8: c * S / N
    assert stats["c"] == pytest.approx(c)
    assert torch.allclose(q, orthomerge_generator(qs, ones.tolist()), atol=1e-14)
    # the merged norm is the mean input norm
    assert float(q.norm()) == pytest.approx(sum(float(x.norm()) for x in qs) / n)


def test_orthomerge_weights_scale_free_and_negation():
    qs = skew_stack(3, 2, 4, seed=1)
    m = get_method("orthomerge")
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    q1, _ = m(qs, w)
    q2, _ = m(qs, 10 * w)
    assert torch.allclose(q1, q2, atol=1e-14)
    assert torch.allclose(q1, orthomerge_generator(qs, w.tolist()), atol=1e-14)
    neg = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(m(qs, neg)[0], orthomerge_generator(qs, neg.tolist()), atol=1e-14)
    # negating one input of a pair is the same as merging with its inverse rotation (-Q)
    flipped = qs.clone()
    flipped[1] = -flipped[1]
    assert torch.allclose(m(qs, neg)[0], m(flipped, torch.ones(3, dtype=torch.float64))[0], atol=1e-14)


def test_orthomerge_per_block_norms():
    qs = skew_stack(2, 3, 4, seed=2)
    q, _ = get_method("orthomerge")(qs, torch.ones(2, dtype=torch.float64), per_block=True)
    for k in range(3):
        expected = orthomerge_generator(qs[:, k], [1.0, 1.0])
        assert torch.allclose(q[k], expected, atol=1e-14)


def test_orthomerge_all_zero_gives_zero():
    qs = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    q, stats = get_method("orthomerge")(qs, torch.ones(3, dtype=torch.float64))
    assert torch.equal(q, torch.zeros(2, 4, 4, dtype=torch.float64))
    assert not stats["cancelled"]


def test_orthomerge_cancelling_inputs_stay_finite_and_are_flagged():
    q = skew_stack(1, 2, 4, seed=3)[0]
    qs = torch.stack([q, -q + 1e-12 * skew_stack(1, 2, 4, seed=4)[0]])
    out, stats = get_method("orthomerge")(qs, torch.ones(2, dtype=torch.float64))
    assert torch.isfinite(out).all()
    assert stats["cancelled"]
    assert float(out.norm()) < 1e-10  # the plain mean, not a noise direction blown up to full norm
    exact, stats = get_method("orthomerge")(torch.stack([q, -q]), torch.ones(2, dtype=torch.float64))
    assert torch.equal(exact, torch.zeros_like(q)) and stats["cancelled"]


@pytest.mark.parametrize("name", ["orthomerge", "mean_q", "mean_r", "karcher"])
def test_permutation_invariance(name):
    qs = skew_stack(3, 2, 5, seed=5)
    w = torch.tensor([1.0, 0.7, 1.3], dtype=torch.float64)
    m = get_method(name)
    base, _ = m(qs, w)
    for perm in itertools.permutations(range(3)):
        out, _ = m(qs[list(perm)], w[list(perm)])
        assert torch.allclose(out, base, atol=1e-12), perm


@pytest.mark.parametrize("name", ["orthomerge", "mean_q", "mean_r", "karcher"])
def test_identical_inputs_merge_to_themselves(name):
    q = skew_stack(1, 2, 5, seed=6)[0]
    out, _ = get_method(name)(torch.stack([q, q, q]), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(out, q, atol=1e-12)


def test_mean_q_and_mean_r_definitions():
    qs = skew_stack(2, 2, 4, seed=7)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert torch.allclose(get_method("mean_q")(qs, w)[0], (qs[0] + 3 * qs[1]) / 4, atol=1e-15)
    r = polar((cayley(qs[0]) + 3 * cayley(qs[1])) / 4)
    assert torch.allclose(cayley(get_method("mean_r")(qs, w)[0]), r, atol=1e-12)


def test_sequential_is_the_product_in_peft_fold_order():
    qs = skew_stack(3, 2, 4, seed=8)
    out, _ = get_method("sequential")(qs, torch.ones(3, dtype=torch.float64))
    r = cayley(qs)
    assert torch.allclose(cayley(out), r[2] @ r[1] @ r[0], atol=1e-12)
    assert get_method("sequential").order_matters


def test_registry_errors_name_the_choices():
    with pytest.raises(OftMergeError, match="unknown merge method 'nope'.*orthomerge"):
        get_method("nope")
    with pytest.raises(OftMergeError, match="has no option 'bogus'.*per_block"):
        get_method("orthomerge").resolve_options({"bogus": 1})
    assert set(available_methods()) >= {"orthomerge", "mean_q", "mean_r", "sequential", "karcher"}


@pytest.mark.parametrize("name", [n for n, m in available_methods().items() if m.from_sum is not None])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_linear_methods_from_the_sum_equal_the_stacked_call(name, n):
    """``from_sum`` (what decoupling streams into) gives the stacked result bit for bit, any N."""
    from oftmerge.methods import weighted_sum

    method = get_method(name)
    qs = skew_stack(n, 3, 6, seed=40 + n)
    w = torch.linspace(-0.5, 2.0, n, dtype=torch.float64)
    stacked, stats = method(qs, w)
    s = torch.mul(qs[0], w[0])
    for i in range(1, n):  # the streaming caller's order
        s.add_(qs[i] * w[i])
    assert torch.equal(s, weighted_sum(qs, w))
    streamed, stats2 = method.from_sum(s, torch.linalg.matrix_norm(qs), w)
    assert torch.equal(stacked, streamed) and stats == stats2


def test_only_the_linear_methods_declare_from_sum():
    assert sorted(n for n, m in available_methods().items() if m.from_sum is not None) == ["mean_q", "orthomerge"]
