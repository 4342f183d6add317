"""Property tests of the so(b) / SO(b) math, over block sizes and dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from oftmerge.linalg import (
    RotationMap,
    block_size_from_packed,
    cayley,
    coft_project,
    inverse_cayley,
    karcher_mean,
    log_orthogonal,
    neumann_series,
    pack_skew,
    polar,
    regrid_blocks,
    skew_from_full,
    unpack_skew,
)

DTYPES = {torch.float32: 2e-5, torch.float64: 1e-11}


def random_skew(blocks: int, b: int, scale: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    a = torch.randn(blocks, b, b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return (a - a.transpose(-1, -2)).to(dtype)


sizes = st.integers(min_value=2, max_value=64)
seeds = st.integers(min_value=0, max_value=2**16)


@settings(max_examples=40, deadline=None)
@given(b=sizes, blocks=st.integers(1, 4), seed=seeds, dtype=st.sampled_from(list(DTYPES)))
def test_pack_unpack_round_trip(b, blocks, seed, dtype):
    q = random_skew(blocks, b, 0.3, seed, dtype)
    packed = pack_skew(q)
    assert packed.shape == (blocks, b * (b - 1) // 2)
    assert block_size_from_packed(packed.shape[1]) == b
    assert torch.equal(unpack_skew(packed), q)


def test_block_size_from_packed_rejects_non_triangular():
    with pytest.raises(ValueError, match="not b\\*\\(b-1\\)/2"):
        block_size_from_packed(7)


@settings(max_examples=40, deadline=None)
@given(b=sizes, seed=seeds, dtype=st.sampled_from(list(DTYPES)), scale=st.floats(0.001, 0.5))
def test_cayley_is_special_orthogonal_and_inverts(b, seed, dtype, scale):
    q = random_skew(3, b, scale / b**0.5, seed, dtype)
    r = cayley(q)
    eye = torch.eye(b, dtype=dtype)
    tol = DTYPES[dtype] * b
    assert torch.allclose(r.transpose(-1, -2) @ r, eye.expand_as(r), atol=tol)
    assert torch.allclose(torch.linalg.det(r), torch.ones(3, dtype=dtype), atol=tol)
    assert torch.allclose(inverse_cayley(r.double()).to(dtype), q, atol=tol * 10)


def test_inverse_cayley_refuses_eigenvalue_minus_one():
    r = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)).unsqueeze(0)
    with pytest.raises(ValueError, match="eigenvalue at -1"):
        inverse_cayley(r)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 8])
def test_neumann_series_matches_installed_peft(terms):
    """Pins the 0.18+ series to the installed PEFT's own implementation."""
    from peft.tuners.oft.layer import OFTRotationModule

    b = 6
    mod = OFTRotationModule(2, b * (b - 1) // 2, b, 12, use_cayley_neumann=True, num_cayley_neumann_terms=terms)
    vec = torch.randn(2, b * (b - 1) // 2, dtype=torch.float64) * 0.2
    ours = neumann_series(unpack_skew(vec), terms, "0.18")
    theirs = mod._cayley_batch(vec, b, True, terms)
    assert torch.allclose(ours, theirs, atol=1e-14)
    exact = mod._cayley_batch(vec, b, False, terms)
    assert torch.allclose(cayley(unpack_skew(vec)), exact, atol=1e-14)


def test_neumann_series_approximates_opposite_sign_cayley():
    q = random_skew(2, 8, 0.01, 1)
    for variant in ("0.16", "0.18"):
        r = neumann_series(q, 12, variant)
        assert torch.allclose(r, cayley(-q), atol=1e-12)
        assert not torch.allclose(r, cayley(q), atol=1e-3)
    assert RotationMap("neumann").sign == -1 and RotationMap("exact").sign == 1


def test_neumann_variants_differ_only_in_the_last_term():
    q = random_skew(1, 4, 0.3, 2)
    q4 = torch.linalg.matrix_power(q[0], 4)
    assert torch.allclose(neumann_series(q, 5, "0.16") - neumann_series(q, 5, "0.18"), q4.unsqueeze(0), atol=1e-14)
    # PEFT >= 0.18 gives the same series for 3 and 4 terms (its loop structure), unlike 0.16
    assert torch.equal(neumann_series(q, 3, "0.18"), neumann_series(q, 4, "0.18"))
    assert not torch.equal(neumann_series(q, 3, "0.16"), neumann_series(q, 4, "0.16"))


def test_coft_project_matches_peft_rule():
    x = random_skew(3, 4, 1.0, 3)
    x[1] *= 1e-6
    out = coft_project(x, 0.5)
    norms = torch.linalg.matrix_norm(out)
    assert torch.allclose(norms[[0, 2]], torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.equal(out[1], x[1])
    assert torch.equal(coft_project(torch.zeros(1, 3, 3), 0.1), torch.zeros(1, 3, 3))


def test_skew_from_full():
    a = torch.randn(2, 5, 5, dtype=torch.float64)
    q = skew_from_full(a)
    assert torch.equal(q, -q.transpose(-1, -2))
    assert torch.equal(skew_from_full(q), q)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(2, 16), k=st.integers(1, 4), groups=st.integers(1, 3), seed=seeds)
def test_regrid_keeps_the_matrix_and_its_rotation(b, k, groups, seed):
    q = random_skew(groups * k, b, 0.1, seed)
    big = regrid_blocks(q, b * k)
    assert big.shape == (groups, b * k, b * k)
    assert torch.allclose(torch.block_diag(*big), torch.block_diag(*q))
    assert torch.allclose(torch.block_diag(*cayley(big)), torch.block_diag(*cayley(q)), atol=1e-12)
    for variant in ("0.16", "0.18"):
        assert torch.allclose(
            torch.block_diag(*neumann_series(big, 5, variant)), torch.block_diag(*neumann_series(q, 5, variant)), atol=1e-12
        )


def test_regrid_rejects_bad_sizes():
    q = random_skew(4, 4, 0.1, 0)
    with pytest.raises(ValueError, match="not a multiple"):
        regrid_blocks(q, 6)
    with pytest.raises(ValueError, match="does not divide"):
        regrid_blocks(q, 12)


def test_polar_special_orthogonal():
    m = torch.randn(5, 6, 6, dtype=torch.float64)
    r = polar(m)
    assert torch.allclose(r.transpose(-1, -2) @ r, torch.eye(6, dtype=torch.float64).expand(5, 6, 6), atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(5, dtype=torch.float64), atol=1e-12)
    rot = cayley(random_skew(2, 6, 0.1, 4))
    assert torch.allclose(polar(rot), rot, atol=1e-12)


def test_log_orthogonal_inverts_exp():
    q = random_skew(3, 7, 0.1, 5)
    assert torch.allclose(log_orthogonal(torch.linalg.matrix_exp(q)), q, atol=1e-12)


def test_karcher_mean_properties():
    q = random_skew(4, 5, 0.1, 6)
    r = torch.linalg.matrix_exp(q)
    w = torch.ones(2, dtype=torch.float64)
    # a rotation and its inverse average to the identity; a rotation with itself to itself
    assert torch.allclose(karcher_mean(torch.stack([r, r.transpose(-1, -2)]), w), torch.eye(5, dtype=torch.float64).expand(4, 5, 5), atol=1e-10)
    assert torch.allclose(karcher_mean(torch.stack([r, r]), w), r, atol=1e-10)
    # on a one-parameter subgroup the Karcher mean is the geodesic midpoint exp(mean of logs)
    mid = karcher_mean(torch.stack([torch.linalg.matrix_exp(q), torch.linalg.matrix_exp(3 * q)]), w)
    assert torch.allclose(mid, torch.linalg.matrix_exp(2 * q), atol=1e-10)
    # weights: all weight on one input returns that input
    r2 = torch.linalg.matrix_exp(random_skew(4, 5, 0.1, 7))
    assert torch.allclose(karcher_mean(torch.stack([r, r2]), torch.tensor([1.0, 1e-300], dtype=torch.float64)), r, atol=1e-10)
