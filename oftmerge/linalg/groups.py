"""Orthogonal-group tools on batches of blocks: polar factor, logarithm, Karcher mean, regridding, orthogonality error."""

from __future__ import annotations

import torch

__all__ = ["karcher_mean", "log_orthogonal", "orthogonality_error", "polar", "regrid_blocks"]

#: Karcher iterations stop when the mean tangent step's largest block norm is below this.
KARCHER_TOL = 1e-12
KARCHER_MAX_ITER = 200


def orthogonality_error(r: torch.Tensor) -> torch.Tensor:
    """``||R^T R - I||_F`` of each matrix of ``r`` ``(..., d, d)``, computed in ``r``'s dtype (a 0-d tensor for one matrix)."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return torch.linalg.matrix_norm(r.transpose(-2, -1) @ r - eye)


def polar(m: torch.Tensor, *, special: bool = True) -> torch.Tensor:
    """Nearest orthogonal matrix (polar factor ``U V^T``) of each block of ``m``.

    With ``special=True`` the result has determinant +1: where ``det(U V^T) < 0``
    the singular vector of the smallest singular value is flipped (the
    special-orthogonal Procrustes solution).
    """
    u, _, vh = torch.linalg.svd(m)
    if special:
        det = torch.linalg.det(u @ vh)
        flip = torch.ones(m.shape[:-1], dtype=m.dtype, device=m.device)
        flip[..., -1] = torch.where(det < 0, -1.0, 1.0).to(m.dtype)
        u = u * flip.unsqueeze(-2)
    return u @ vh


def log_orthogonal(r: torch.Tensor) -> torch.Tensor:
    """Principal matrix logarithm of special-orthogonal blocks (a skew-symmetric result).

    Uses the eigen-decomposition of the normal matrix ``R``. Blocks with an
    eigenvalue at -1 have no unique real logarithm; ``ValueError`` names one.
    """
    evals, evecs = torch.linalg.eig(r)
    if bool((evals.real < -1 + 1e-9).any()):
        raise ValueError("a rotation block has an eigenvalue at -1: its logarithm is not unique")
    angles = torch.angle(evals)
    log = evecs @ torch.diag_embed(1j * angles.to(evecs.dtype)) @ torch.linalg.inv(evecs)
    log = log.real.to(r.dtype)
    return 0.5 * (log - log.transpose(-2, -1))


def karcher_mean(rotations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted Riemannian (Karcher) mean on SO(b), per block.

    ``rotations`` has shape ``(N, blocks, b, b)``, ``weights`` shape ``(N,)``,
    non-negative with a positive sum (they are normalised here). Fixed-point
    iteration ``X <- X exp(sum_i w_i log(X^T R_i))`` from the polar factor of
    the weighted arithmetic mean; converges for rotations within a ball of
    radius pi/2 of each other, which OFT blocks are in practice.
    """
    if weights.shape != rotations.shape[:1]:
        raise ValueError(f"need one weight per rotation, got {tuple(weights.shape)} for {rotations.shape[0]}")
    w = (weights / weights.sum()).to(rotations.dtype).view(-1, 1, 1, 1)
    x = polar((w * rotations).sum(0))
    for _ in range(KARCHER_MAX_ITER):
        step = (w * log_orthogonal(x.unsqueeze(0).transpose(-2, -1) @ rotations)).sum(0)
        x = x @ torch.linalg.matrix_exp(step)
        if float(torch.linalg.matrix_norm(step).max()) < KARCHER_TOL:
            break
    return polar(x)


def regrid_blocks(q: torch.Tensor, new_block: int) -> torch.Tensor:
    """Re-express block-diagonal ``(blocks, b, b)`` as ``(blocks * b / new_block, new_block, new_block)``.

    ``new_block`` must be a multiple of ``b`` and divide ``blocks * b``. The
    matrix is unchanged: each big block holds ``new_block / b`` small blocks on
    its diagonal. Cayley maps and Neumann series preserve block-diagonal
    structure, so a generator regridded this way gives the same rotation.
    """
    blocks, b, _ = q.shape
    if new_block % b:
        raise ValueError(f"new block size {new_block} is not a multiple of {b}")
    if (blocks * b) % new_block:
        raise ValueError(f"new block size {new_block} does not divide the width {blocks * b}")
    if new_block == b:
        return q
    k = new_block // b
    small = q.reshape(blocks // k, k, b, b)
    out = q.new_zeros(blocks // k, new_block, new_block)
    for i in range(k):  # k sub-blocks per big block, not a loop over blocks
        out[:, i * b : (i + 1) * b, i * b : (i + 1) * b] = small[:, i]
    return out


def finest_block(q: torch.Tensor) -> int:
    """The smallest block size ``b`` (a divisor of ``B``) on which block-diagonal ``q`` ``(blocks, B, B)`` is still block-diagonal.

    The inverse of :func:`regrid_blocks`: entries outside the ``b x b`` diagonal sub-blocks must be
    exactly zero (a generator regridded to a coarser grid, e.g. by a kohya writer, comes back).
    """
    big = q.shape[-1]
    for b in range(1, big):
        if big % b:
            continue
        k = big // b
        sub = q.reshape(q.shape[0], k, b, k, b)
        off = ~torch.eye(k, dtype=torch.bool)
        if not bool(sub.permute(0, 1, 3, 2, 4)[:, off].any()):
            return b
    return big


def split_blocks(q: torch.Tensor, b: int) -> torch.Tensor:
    """``(blocks, B, B)`` -> ``(blocks * B / b, b, b)``: the diagonal sub-blocks (exact when :func:`finest_block` divides ``b``)."""
    n, big, _ = q.shape
    if big % b:
        raise ValueError(f"block size {b} does not divide {big}")
    k = big // b
    sub = q.reshape(n, k, b, k, b).permute(0, 1, 3, 2, 4)
    return sub.diagonal(dim1=1, dim2=2).permute(0, 3, 1, 2).reshape(n * k, b, b).contiguous()
