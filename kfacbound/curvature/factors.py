"""Gram-product accumulators shared by both K-FAC backends and the module rules.

Every K-FAC factor is a sum of outer products Σ_r m_r m_rᵀ over rows m_r (inputs ã or
backpropagated output columns γ): ``out`` += Mᵀ M for a row matrix M. The helpers here add such
products in place, with about half the flops of one GEMM (the factors are symmetric) and, for
long reductions (conv layers: rows = examples × positions), over chunks of GRAM_CHUNK rows whose
partial sums are moved into a float64 accumulator. They know nothing about module types: which
rows a layer contributes is the business of its rule (:mod:`kfacbound.curvature.modules`).

Neither :mod:`.kfac` (native backend) nor :mod:`.kfac_backpack` (BackPACK backend) is imported
here, so both can import this module without importing each other.
"""

from __future__ import annotations

import torch

GRAM_CHUNK = 16384  # rows per GEMM before partial sums move to a float64 accumulator
GRAM_BLOCK = 50  # target width of the column blocks of :func:`gram_upper_` (see there)


def new_acc(size: int, M: torch.Tensor) -> torch.Tensor:
    """Accumulator for Σ Mᵀ M: M's dtype, or float64 when a batch has more than GRAM_CHUNK rows.

    A conv layer's rows are columns × examples × positions (1.8M per batch of 256 for LeNet's
    first layer); summed in float32 they lost 2e-3 relative accuracy against float64.
    """
    dtype = torch.float64 if M.shape[0] > GRAM_CHUNK else M.dtype
    return torch.zeros(size, size, dtype=dtype, device=M.device)


def gram_upper_(out: torch.Tensor, M: torch.Tensor, alpha: float = 1.0, *,
                upper: bool = False) -> torch.Tensor:
    """``out`` += alpha · Mᵀ M in place with about half the flops of one GEMM (a "SYRK").

    The d columns of M are split into b ≈ d / GRAM_BLOCK blocks B_1 … B_b; block row i gets one
    GEMM out[B_i, B_i ∪ … ∪ B_b] += M[:, B_i]ᵀ M[:, B_i ∪ … ∪ B_b] (the upper block triangle,
    (b + 1)/(2b) of the full product's flops), then the strictly lower blocks are copied from the
    upper ones. ``out`` must be symmetric on entry (e.g. zeros or an earlier sum): the result is
    then exactly the symmetric Σ Mᵀ M. torch has no SYRK and this runs on any device; on this
    project's CPU it was 1.5–2× faster than one full GEMM for d ≥ 600 (1 thread).

    ``upper=True`` skips the copies: only the upper triangle (entries j ≥ i, all inside the
    upper block triangle) is updated, and an accumulator summed this way over many batches is
    completed once by :func:`symmetrize_upper_`. (The transposed block copies were 8% of a
    T-600 K-FAC extraction, 1 thread.)
    """
    d = M.shape[1]
    b = max(1, round(d / GRAM_BLOCK))
    if b == 1:
        return out.addmm_(M.T, M, alpha=alpha)
    edges = [round(d * k / b) for k in range(b + 1)]
    for i in range(b):
        lo, hi = edges[i], edges[i + 1]
        out[lo:hi, lo:].addmm_(M[:, lo:hi].T, M[:, lo:], alpha=alpha)
    if not upper:
        for i in range(b - 1):
            lo, hi = edges[i], edges[i + 1]
            out[hi:, lo:hi].copy_(out[lo:hi, hi:].T)
    return out


def symmetrize_upper_(out: torch.Tensor) -> torch.Tensor:
    """Make ``out`` symmetric from its upper triangle in place: out[i, j] = out[j, i] for
    j > i. Completes a sum of :func:`gram_upper_` products taken with ``upper=True``; a
    symmetric matrix is left as it is."""
    low = torch.tril_indices(out.shape[0], out.shape[1], -1, device=out.device)
    out[low[0], low[1]] = out[low[1], low[0]]
    return out


def add_gram(out: torch.Tensor, M: torch.Tensor, alpha: float = 1.0, *,
             upper: bool = False) -> torch.Tensor:
    """``out`` += alpha · Mᵀ M in place (``out`` symmetric): one half-flop blocked product
    (:func:`gram_upper_`) when dtypes match (Linear layers), else products over chunks of
    GRAM_CHUNK rows, each formed in M's dtype and added into the float64 ``out`` (conv layers).

    (scipy's BLAS SYRK was 2× faster alone on 1 thread but slower inside the loop with 2 threads:
    its OpenBLAS threads compete with torch's; and it is CPU-only.)
    """
    if out.dtype == M.dtype:
        return gram_upper_(out, M, alpha=alpha, upper=upper)
    tmp = None
    for start in range(0, M.shape[0], GRAM_CHUNK):
        c = M[start:start + GRAM_CHUNK]
        if tmp is None:
            tmp = torch.zeros(M.shape[1], M.shape[1], dtype=M.dtype, device=M.device)
        else:
            tmp.zero_()
        out.add_(gram_upper_(tmp, c, upper=upper), alpha=alpha)
    return out


def conv_gram(out: torch.Tensor, U: torch.Tensor, alpha: float = 1.0, *,
              upper: bool = False) -> torch.Tensor:
    """``out`` (float64, D×D) += alpha · Σ_i U_i U_iᵀ for U [B, D, T] (B examples or columns).

    Over chunks of about GRAM_CHUNK rows (b examples with b·T ≈ GRAM_CHUNK): the chunk is
    copied into a [D, b·T] matrix (cache-sized), its Gram product formed in U's dtype by
    :func:`gram_upper_` and added into the float64 ``out``. (Measured against a transposed copy
    of all N·T rows and against per-example batched GEMMs on LeNet-5 and ResNet shapes: fastest
    or within 20% of the fastest on each.)
    """
    B, D, T = U.shape
    step = max(1, GRAM_CHUNK // max(T, 1))
    tmp = torch.zeros(D, D, dtype=U.dtype, device=U.device)
    for start in range(0, B, step):
        c = U[start:start + step].permute(1, 0, 2).reshape(D, -1)
        if start:
            tmp.zero_()
        out.add_(gram_upper_(tmp, c.T, upper=upper), alpha=alpha)
    return out


def accumulate(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor,
               alpha: float = 1.0) -> None:
    """sums[name] += alpha · value (in value's dtype)."""
    if name not in sums:
        sums[name] = torch.zeros_like(value)
    sums[name].add_(value, alpha=alpha)


# bytes of the per-shift product images of :func:`patch_gram_correlation`; above it the patch
# Gram is formed by GEMMs of copied patches instead
CORRELATION_MEMORY = 2**26
CORRELATION_MIN_TAPS = 16  # kernels of at least this many taps (5×5: yes, 3×3: no)
_SHIFT_INDEX: dict[tuple[int, int, int], tuple] = {}


def correlation_pays(channels: int, kernel: tuple[int, ...], stride: tuple[int, ...],
                     dilation: tuple[int, ...], padded: tuple[int, ...], itemsize: int) -> bool:
    """Whether :func:`patch_gram_correlation` applies and is the cheaper route: 2-D, stride and
    dilation 1, a kernel of at least CORRELATION_MIN_TAPS taps (measured on 1 thread, batches
    of 256: LeNet-5's 5×5 layers 2–3× faster than the patch GEMMs, ResNet's 3×3 layers as fast
    or slower) and product images within CORRELATION_MEMORY bytes."""
    if len(kernel) != 2 or any(s != 1 for s in stride) or any(d != 1 for d in dilation):
        return False
    kh, kw = kernel
    images = kh * (2 * kw - 1) * padded[0] * padded[1] * channels ** 2
    # P (float64), the chunk's products (itemsize) and the running sums' float64 copies
    return kh * kw >= CORRELATION_MIN_TAPS and images * (3 * 8 + itemsize) <= CORRELATION_MEMORY


def _shift_index(C: int, kh: int, kw: int) -> tuple[torch.Tensor, ...]:
    """For every pair of kernel taps u = (i, j) and u′ = u + δ with δ = (di, dj) in the
    half-plane di > 0 or (di = 0, dj ≥ 0): (di, dj + kw − 1, i, j) and the flat row (c, u) and
    column (c′, u′) indices of the patch Gram for all channel pairs."""
    key = (C, kh, kw)
    if key not in _SHIFT_INDEX:
        cols_: list[list[int]] = [[], [], [], [], [], []]
        for di in range(kh):
            for dj in range(-(kw - 1), kw):
                if di == 0 and dj < 0:
                    continue
                for i in range(kh - di):
                    for j in range(max(0, -dj), min(kw, kw - dj)):
                        for lst, v in zip(cols_, (di, dj + kw - 1, i, j, i * kw + j,
                                                  (i + di) * kw + j + dj), strict=True):
                            lst.append(v)
        ch = torch.arange(C) * (kh * kw)
        di_, dj_, i_, j_, r_, c_ = (torch.tensor(v) for v in cols_)
        _SHIFT_INDEX[key] = (di_, dj_, i_, j_, r_[:, None] + ch[None], c_[:, None] + ch[None])
    return _SHIFT_INDEX[key]


def patch_gram_correlation(xp: torch.Tensor, kernel: tuple[int, int], bias: bool,
                           chunk: int = 4096) -> torch.Tensor:
    """Σ_{n,t} ũ_{n,t} ũ_{n,t}ᵀ (float64, D × D, D = C·kh·kw, + 1 with ``bias``) for the
    patches ũ of a stride-1, dilation-1 2-D convolution over the zero-padded input ``xp``
    [N, C, H, W], without forming the patches.

    Entry ((c, u), (c′, u′)) is Σ_n Σ_{t ∈ out grid} x_c(t + u) x_c′(t + u′): for the shift
    δ = u′ − u it is the sum, over the Ho × Wo window at u, of the product image
    P_δ[c, c′](s) = Σ_n x_c(s) x_c′(s + δ). With the input laid out [H·W, C, N], a shift is an
    offset along the flat pixel index, so the 2kw − 1 shifts of one row offset di are one
    batched GEMM over pixels against a sliding-window view (no copy); the window sums come from
    running sums along each axis; the half-plane of shifts gives the rest by symmetry. (Pixels
    paired across a row end are formed but never summed: a window's pixels stay in their row.)
    Multiply-adds per example: kh(2kw − 1) H·W C², against D² Ho·Wo / 2 for the patch Gram:
    2–4× fewer for LeNet-5's 5×5 layers, more for 3×3 (:func:`correlation_pays` decides). Sums
    over examples run in ``xp``'s dtype over chunks of at most ``chunk`` examples, then in
    float64."""
    N, C, H, W = xp.shape
    kh, kw = kernel
    Ho, Wo, HW, span = H - kh + 1, W - kw + 1, H * W, 2 * kw - 1
    di_i, dj_i, i_i, j_i, rows, cols = _shift_index(C, kh, kw)
    dev = xp.device
    P = torch.zeros(kh, HW, C, span * C, dtype=torch.float64, device=dev)
    part = torch.zeros(kh, HW, C, span * C, dtype=xp.dtype, device=dev)
    xsum = torch.zeros(HW, C, dtype=torch.float64, device=dev)
    for start in range(0, N, chunk):
        X = xp[start:start + chunk].permute(2, 3, 1, 0).reshape(HW, C, -1)
        n = X.shape[2]
        Xpad = torch.zeros(HW + 2 * (kw - 1), C, n, dtype=xp.dtype, device=dev)
        Xpad[kw - 1:kw - 1 + HW] = X
        X = Xpad[kw - 1:kw - 1 + HW]
        for di in range(kh):  # pixels r < HW − di·W pair with r + di·W + dj, |dj| < kw
            r1 = HW - di * W
            window = Xpad.as_strided((r1, span * C, n), (C * n, n, 1),
                                     Xpad.storage_offset() + di * W * C * n)
            torch.bmm(X[:r1], window.transpose(1, 2), out=part[di, :r1])
        P += part
        if bias:
            xsum += X.sum(2)

    def box(img: torch.Tensor, hdim: int) -> torch.Tensor:
        """Window sums of ``img`` along dims (hdim, hdim + 1) = (H, W): rows [i, i + Ho),
        columns [j, j + Wo) for i < kh, j < kw, by running sums."""
        cs = torch.cat([torch.zeros_like(img.narrow(hdim, 0, 1)), img.cumsum(hdim)], hdim)
        r = cs.narrow(hdim, Ho, kh) - cs.narrow(hdim, 0, kh)
        cs = torch.cat([torch.zeros_like(r.narrow(hdim + 1, 0, 1)), r.cumsum(hdim + 1)],
                       hdim + 1)
        return cs.narrow(hdim + 1, Wo, kw) - cs.narrow(hdim + 1, 0, kw)

    sums = box(P.reshape(kh, H, W, C, span, C), 1)  # [di, i, j, C, dj + kw − 1, C]
    vals = sums[di_i, i_i, j_i, :, dj_i, :]  # [M, C, C]: entry ((c, u), (c′, u + δ))
    D = C * kh * kw
    out = torch.zeros(D + int(bias), D + int(bias), dtype=torch.float64, device=dev)
    rows, cols = rows.to(dev), cols.to(dev)
    out[rows[:, :, None], cols[:, None, :]] = vals
    out[cols[:, None, :], rows[:, :, None]] = vals
    if bias:
        s = box(xsum.reshape(H, W, C), 0).permute(2, 0, 1).reshape(D)  # Σ_{n,t} x_c(t + u)
        out[:D, D] = s
        out[D, :D] = s
        out[D, D] = N * Ho * Wo
    return out
