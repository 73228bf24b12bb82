"""Gram products ``cols @ cols.T`` for :mod:`delve.covariance`: which kernel, and only the lower block triangle.

On the CPU, torch's ``mm`` goes to the BLAS it was built with (MKL in the
official wheels), and MKL runs its AVX2 code on AMD processors; oneDNN, which
torch also ships for its convolutions, runs AVX-512 there. Its inner product
(``torch.ops.mkldnn._linear_pointwise``, which computes ``a @ b.T`` of two
row-major matrices) computes a Gram matrix about twice as fast on such a
machine (``benchmarks/overhead.py``). It is a private operator of torch, so it
is used only after a check on a small product (once per process) and only for
contiguous float32 matrices on the CPU; everything else goes through
``addmm``. Both follow torch's float32 matmul precision setting
(:func:`torch.set_float32_matmul_precision`), which is full float32 by default.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

#: Column-block width of the lower block triangle of a Gram matrix; narrower matrices get one product.
GRAM_BLOCK = 128

#: Side of the square tiles :func:`symmetrize_` works on (two float64 tiles: 1 MiB, in L2).
SYMMETRIZE_TILE = 256

_inner_product: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
_checked = False


def _onednn_inner_product() -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``a @ b.T`` through oneDNN, or ``None`` where that operator is missing or gives a wrong result."""
    global _inner_product, _checked
    if _checked:
        return _inner_product
    _checked = True
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        operator = torch.ops.mkldnn._linear_pointwise

        def inner_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return operator(a, b, None, "none", [], "")

        generator = torch.Generator().manual_seed(0)
        a = torch.randn(19, 37, generator=generator)
        with torch.no_grad():
            product = inner_product(a, a[3:8])
        expected = a.double() @ a[3:8].double().T
        if product.shape == expected.shape and torch.allclose(product.double(), expected, rtol=1e-5, atol=1e-4):
            _inner_product = inner_product
    except (AttributeError, RuntimeError, TypeError):
        _inner_product = None
    return _inner_product


#: Multiply-adds from which a product goes to oneDNN: below, its fixed cost (~10 us) outweighs its speed.
MIN_INNER_PRODUCT_WORK = 1 << 20


def uses_inner_product(device: torch.device, dtype: torch.dtype, dim: int, num: int) -> bool:
    """Whether the Gram product of ``dim`` features over ``num`` samples of ``dtype`` on ``device``
    goes through oneDNN (see the module docstring)."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and dim * dim * num >= MIN_INNER_PRODUCT_WORK
        and _onednn_inner_product() is not None
    )


def add_gram_product(gram: torch.Tensor, cols: torch.Tensor, beta: float, alpha: float = 1.0) -> None:
    """``gram = beta * gram + alpha * cols @ cols.T``, lower block triangle only from ``2 * GRAM_BLOCK`` features.

    ``cols`` is ``(d, n)``: one column per sample. Only the column blocks on and
    below the diagonal are computed (about a third less work for wide
    matrices); :func:`mirror_lower` fills in the rest. ``beta`` is 0 or 1.
    """
    dim = gram.shape[0]
    use = cols.is_contiguous() and uses_inner_product(cols.device, cols.dtype, dim, cols.shape[1])
    inner_product = _onednn_inner_product() if use else None
    if dim < 2 * GRAM_BLOCK:
        blocks = [(gram, cols, cols)]
    else:
        starts = range(0, dim, GRAM_BLOCK)
        blocks = [(gram[start:, start : start + GRAM_BLOCK], cols[start:], cols[start : start + GRAM_BLOCK]) for start in starts]
    for target, left, right in blocks:
        if inner_product is None:
            target.addmm_(left, right.T, beta=beta, alpha=alpha)
        elif beta:
            target.add_(inner_product(left, right), alpha=alpha)
        elif alpha == 1.0:
            target.copy_(inner_product(left, right))
        else:
            torch.mul(inner_product(left, right), alpha, out=target)


def mirror_lower(gram: torch.Tensor) -> None:
    """Copy the lower block triangle written by :func:`add_gram_product` onto the upper one."""
    dim = gram.shape[0]
    if dim < 2 * GRAM_BLOCK:
        return
    for start in range(0, dim - GRAM_BLOCK, GRAM_BLOCK):
        stop = start + GRAM_BLOCK
        gram[start:stop, stop:].copy_(gram[stop:, start:stop].T)


def symmetrize_(matrix: torch.Tensor) -> torch.Tensor:
    """``(matrix + matrix.T) / 2`` in place, tile by tile, and ``matrix``.

    A whole transposed operand is read across rows, a cache miss per value from
    a few hundred features on; tiles of :data:`SYMMETRIZE_TILE` squared stay in
    cache (about 2x faster at 3072 features, as measured, and no d x d temporaries).
    """
    dim = matrix.shape[0]
    for row in range(0, dim, SYMMETRIZE_TILE):
        for col in range(0, row + 1, SYMMETRIZE_TILE):
            lower = matrix[row : row + SYMMETRIZE_TILE, col : col + SYMMETRIZE_TILE]
            if row == col:
                lower.copy_((lower + lower.T).mul_(0.5))
            else:
                upper = matrix[col : col + SYMMETRIZE_TILE, row : row + SYMMETRIZE_TILE]
                lower.add_(upper.T).mul_(0.5)
                upper.copy_(lower.T)
    return matrix
