"""Round-to-nearest and GPTQ quantization of one weight matrix into the GPTQ layout.

GPTQ (Frantar et al. 2022): quantize columns one at a time and push each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs
H = 2/n Σ x xᵀ. Lazy batches of 128 columns keep the updates matrix-sized.
"""

from __future__ import annotations

import torch

from lowvram.kernels import fp16_scale, pack_cols, pack_rows


def fit(w: torch.Tensor, bits: int, sym: bool, mse: bool = False, grid: int = 100,
        maxshrink: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (rounded to fp16, as stored) and integer zero for w [N, g].

    mse=False: the row's full range (min-max, or ±absmax when symmetric). mse=True: GPTQ's `mse`
    option with a squared norm: also try the range shrunk by p = 1 - i/grid for i = 1 ..
    maxshrink*grid (both ends by the same p) and keep, per row, the (scale, zero) whose
    round-to-nearest error sum((deq - w)^2) is lowest. p = 1 is a candidate, so the chosen error is
    never larger than the plain fit's.
    """
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    scale, zero = _range_params(xmin, xmax, bits, sym)
    if not mse:
        return scale, zero
    step = max(1, (1 << 20) // max(w.shape[1], 1))  # ~4 MB of rows at a time: the search stays in cache
    for r in range(0, w.shape[0], step):
        wr, lo, hi = w[r : r + step], xmin[r : r + step], xmax[r : r + step]
        sc, ze = scale[r : r + step], zero[r : r + step]  # views: updated in place
        best = _sq_error(wr, sc, ze, bits)
        for i in range(1, int(maxshrink * grid) + 1):
            p = 1 - i / grid
            s, z = _range_params(p * lo, p * hi, bits, sym)
            err = _sq_error(wr, s, z, bits)
            better = err < best
            best = torch.where(better, err, best)
            sc.copy_(torch.where(better, s, sc))
            ze.copy_(torch.where(better, z, ze))
    return scale, zero


def _range_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = 2**bits - 1
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    span = xmax - xmin
    span = torch.where(span == 0, torch.ones_like(span), span)
    scale = fp16_scale(span / maxq).float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        # zero >= 1: the GPTQ v1 format stores zero-1 in `bits` bits.
        zero = torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


def _sq_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row sum((dequant(quant(w)) - w)^2), in place on one temporary."""
    s, z = scale[:, None], zero[:, None]
    t = torch.div(w, s).round_().add_(z).clamp_(0, 2**bits - 1).sub_(z).mul_(s).sub_(w)
    return t.mul_(t).sum(dim=1)


def quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2**bits - 1)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
         v1: bool = True, rows: int = 2048) -> dict[str, torch.Tensor]:
    """q [N, K] ints, scales/zeros [G, N] -> GPTQ tensors (v1: stored zero-1). Packed `rows` output rows at
    a time: pack_rows works in int64, 8 bytes per value of what it is given."""
    qweight = torch.cat([pack_rows(q[r : r + rows].t().to(torch.int32), bits) for r in range(0, q.shape[0], rows)], 1)
    return dict(qweight=qweight, **_pack_groups(scales, zeros, g_idx, bits, v1))


def _pack_groups(scales, zeros, g_idx, bits, v1=True) -> dict[str, torch.Tensor]:
    z = zeros.to(torch.int32) - (1 if v1 else 0)
    return {
        "qzeros": pack_cols(z & (2**bits - 1), bits),
        "scales": scales.half().contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def rtn(w: torch.Tensor, bits: int, group: int, sym: bool = True, rows: int = 2048,
        keep_deq: bool = True, mse: bool = False) -> tuple[dict, torch.Tensor | float]:
    """Round-to-nearest: (GPTQ tensors, dequantized weight), or with keep_deq=False (GPTQ tensors,
    relative error ||deq - w|| / ||w||).

    Works on `rows` output rows at a time, packing as it goes, so its temporaries stay a few
    hundred MB whatever the matrix (the quantize command's peak memory follows from this).
    mse=True searches each group's clipping range (see `fit`) within the same chunk.
    """
    n, k = w.shape
    g = k if group <= 0 else group
    if k % g:
        raise ValueError(f"in_features {k} is not a multiple of group size {g}")
    qws, scales, zeros, deqs = [], [], [], []
    err2 = w2 = 0.0
    for r in range(0, n, rows):
        wr = w[r : r + rows].float()
        m = wr.shape[0]
        wg = wr.reshape(m, k // g, g).permute(1, 0, 2).reshape(-1, g)  # [G*m, g]
        scale, zero = fit(wg, bits, sym, mse)
        q = quant(wg, scale, zero, bits)
        deq = ((q - zero[:, None]) * scale[:, None]).reshape(k // g, m, g).permute(1, 0, 2).reshape(m, k)
        if keep_deq:
            deqs.append(deq)
        else:
            err2 += float(((deq - wr) ** 2).sum())
            w2 += float((wr**2).sum())
        del deq, wg
        q = q.reshape(k // g, m, g).permute(1, 0, 2).reshape(m, k)
        qws.append(pack_rows(q.t().to(torch.int32), bits))  # [K*bits/32, m]
        scales.append(scale.reshape(k // g, m))
        zeros.append(zero.reshape(k // g, m))
    g_idx = torch.arange(k) // g
    tensors = dict(qweight=torch.cat(qws, 1), **_pack_groups(torch.cat(scales, 1), torch.cat(zeros, 1), g_idx, bits))
    return tensors, (torch.cat(deqs) if keep_deq else (err2 / max(w2, 1e-30)) ** 0.5)


def _flip_(a: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """a[::-1, ::-1] in place, a block of rows at a time (a copy would add a K x K matrix to the peak)."""
    n = a.shape[0]
    for i in range(0, n // 2, rows):
        j = min(i + rows, n // 2)
        top, bot = a[i:j], a[n - j : n - i]
        tmp = top.flip((0, 1))
        top.copy_(bot.flip((0, 1)))
        bot.copy_(tmp)
    if n % 2:
        a[n // 2] = a[n // 2].flip(0)
    return a


def _invert_upper_(m: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """m^-1 in place for an upper triangular m (LAPACK's trtri, which torch does not expose): with
    m = [[A, B], [0, D]], the corner -A^-1 B D^-1 comes from two triangular solves against the blocks as
    they are, then A and D are inverted the same way. K^3/3 flops, in triangular solves."""
    n = m.shape[0]
    if n <= leaf:
        m.copy_(torch.linalg.solve_triangular(m, torch.eye(n, dtype=m.dtype, device=m.device), upper=True))
        return m
    h = n // 2
    a, b, d = m[:h, :h], m[:h, h:], m[h:, h:]
    x = torch.linalg.solve_triangular(d, b, upper=True, left=False)
    b.copy_(torch.linalg.solve_triangular(a, x, upper=True).neg_())
    del x
    _invert_upper_(a, leaf)
    _invert_upper_(d, leaf)
    return m


def _inverse_cholesky_(H: torch.Tensor) -> torch.Tensor | None:
    """The upper Cholesky factor U of H^-1 (U^T U = H^-1), in H's storage; None if H is not positive definite.

    Flipped, H = L L^T (Cholesky) means H = M M^T with M = flip(L) upper triangular, so H^-1 = (M^-1)^T M^-1
    and U = M^-1: one Cholesky and one triangular inverse, where Cholesky, cholesky_inverse and Cholesky
    again took twice as long (27.1 -> 13.1 s at K = 13696, 2 cores, same peak memory), and no less accurate
    (1.20e-5 against 1.22e-5 relative to a float64 factor at K = 3000)."""
    info = torch.empty((), dtype=torch.int32, device=H.device)
    torch.linalg.cholesky_ex(_flip_(H), out=(H, info))
    if int(info):
        return None
    return _invert_upper_(_flip_(H))


def gptq(w: torch.Tensor, H: torch.Tensor, bits: int, group: int, sym: bool = True, act_order: bool = False,
         damp: float = 0.01, blocksize: int = 128, mse: bool = False, consume_h: bool = False) -> tuple[dict, torch.Tensor]:
    """GPTQ of w [N, K] given the input Hessian H [K, K]: (GPTQ tensors, dequantized weight).

    consume_h: H is ours to overwrite (the quantize command's Hessians): the inverse's Cholesky factor
    is then computed in its storage, and memory peaks at two K x K matrices instead of six (for a
    13696-input projection each is 0.75 GB in fp32).
    """
    W = w.float().clone()
    n, k = W.shape
    g = k if group <= 0 else group
    if k % g:
        raise ValueError(f"in_features {k} is not a multiple of group size {g}")
    H = H.float() if consume_h else H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = _inverse_cholesky_(H)
    if Hinv is None:
        raise ValueError(f"the input Hessian is not positive definite (dampening {damp} too small for it)")

    Q = torch.zeros(n, k, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(k // g, n, device=W.device)
    zeros = torch.zeros(k // g, n, device=W.device)
    scale = zero = None
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hi = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # the group's columns as they stand now (updated by the earlier errors)
                span = W1[:, i : i + g]
                if span.shape[1] < g:
                    span = torch.cat([span, W[:, i2 : i2 + g - span.shape[1]]], dim=1)
                scale, zero = fit(span, bits, sym, mse)
                scales[col // g], zeros[col // g] = scale, zero
            wc = W1[:, i]
            qc = quant(wc[:, None], scale, zero, bits)[:, 0]
            dq = (qc - zero) * scale
            Q[:, col] = qc.to(torch.uint8)
            err = (wc - dq) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            W1[:, i] = dq  # done: W ends up holding the dequantized weight
            Err[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    if perm is None:
        g_idx = torch.arange(k, device=W.device) // g
        return pack(Q, scales, zeros, g_idx, bits), W
    inv = torch.argsort(perm)
    g_idx = (torch.arange(k, device=W.device) // g)[inv]
    return pack(Q[:, inv], scales, zeros, g_idx, bits), W[:, inv]


class Hessian:
    """Running H = 2/n Σ x xᵀ over the rows of every input seen."""

    def __init__(self, k: int, device="cpu"):
        self.H = torch.zeros(k, k, device=device)
        self.n = 0

    def add(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = (2 / self.n) ** 0.5 * x
        self.H.addmm_(x.t(), x)  # in place: no K x K temporary (0.75 GB for a 13696-input projection)
