"""SwiGLU experts: stacked weights, a grouped forward over tokens sorted by expert, and the no-autograd
forward / backward pair the expert server runs on its shards.

Yuan-M32 expert: w1: d -> 2*ffn (no bias), split in halves (a, g); out = w2(silu(a) * g); SiLU on the FIRST half.
Weights are stored stacked: w1 [E, d, 2*ffn], w2 [E, ffn, d], so `x @ w1[e]` needs no transpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

WeightPair = tuple[torch.Tensor, torch.Tensor]  # (w1 [d, 2f], w2 [f, d]) of one expert


def swiglu_gate(h_n2f: torch.Tensor) -> torch.Tensor:
    """silu(a) * g for h = x @ w1 = [a | g]: [n, 2f] -> [n, f]."""
    a, g = h_n2f.chunk(2, dim=-1)
    return F.silu(a) * g


def swiglu(x_nd: torch.Tensor, w1_d2f: torch.Tensor, w2_fd: torch.Tensor) -> torch.Tensor:
    """One expert on a block of tokens."""
    return swiglu_gate(x_nd @ w1_d2f) @ w2_fd


def swiglu_forward_saving(x_nd: torch.Tensor, w1_d2f: torch.Tensor, w2_fd: torch.Tensor,
                          out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`swiglu` without autograd (call under no_grad), also returning h = x @ w1 [n, 2f]: with x, all that
    swiglu_backward needs. `out` (a [n, d] slice of a larger output) receives y without a copy."""
    h_n2f = x_nd @ w1_d2f
    return torch.mm(swiglu_gate(h_n2f), w2_fd, out=out), h_n2f


def swiglu_backward(dy_nd: torch.Tensor, x_nd: torch.Tensor, h_n2f: torch.Tensor, w1_d2f: torch.Tensor,
                    w2_fd: torch.Tensor, dx_out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx [n, d], dw1 [d, 2f], dw2 [f, d]) of swiglu, written by hand (call under no_grad).

    The ops autograd would run (four matmuls, `aten.silu_backward` for the activation), so it matches autograd to
    rounding; it needs no graph, keeps only x and h from the forward, and lets the caller accumulate the weight
    grads into its own buffers (faster than autograd on leaf weights: docs/measurements.md).
    """
    a, g = h_n2f.chunk(2, dim=-1)
    sa = F.silu(a)
    du = dy_nd @ w2_fd.t()
    dw2 = (sa * g).t() @ dy_nd
    dh = torch.cat((torch.ops.aten.silu_backward(du * g, a), du * sa), dim=-1)
    dx = torch.mm(dh, w1_d2f.t(), out=dx_out)
    return dx, x_nd.t() @ dh, dw2


@torch.no_grad()
def grouped_swiglu_forward_saving(x_nd: torch.Tensor, counts: Sequence[int], weights: Sequence[WeightPair]
                                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """Expert weights[i] on rows [sum(counts[:i]), +counts[i]) of x_nd, no autograd: y [rows, d] and, per
    segment, h = x_seg @ w1 (what grouped_swiglu_backward needs besides x)."""
    y = x_nd.new_empty(x_nd.shape[0], x_nd.shape[1])
    hs = []
    start = 0
    for (w1, w2), n in zip(weights, counts):
        _, h = swiglu_forward_saving(x_nd[start : start + n], w1, w2, out=y[start : start + n])
        hs.append(h)
        start += n
    return y, hs


@torch.no_grad()
def grouped_swiglu_backward(dy_nd: torch.Tensor, counts: Sequence[int], x_nd: torch.Tensor,
                            hs: Sequence[torch.Tensor], weights: Sequence[WeightPair]
                            ) -> tuple[torch.Tensor, list[WeightPair]]:  # fmt: skip
    """dx [rows, d] of grouped_swiglu_forward_saving and (dw1, dw2) per segment, by swiglu_backward."""
    dx = torch.empty_like(x_nd)
    wgrads = []
    start = 0
    for (w1, w2), h, n in zip(weights, hs, counts):
        rows = slice(start, start + n)
        _, dw1, dw2 = swiglu_backward(dy_nd[rows], x_nd[rows], h, w1, w2, dx_out=dx[rows])
        wgrads.append((dw1, dw2))
        start += n
    return dx, wgrads


# The two paths of grouped_swiglu, where each wins (benchmarks/expert_compute.py, docs/measurements.md):
# - little padding (G * max(C_e) <= PADDED_MAX_WASTE * sum(C_e)): padded, 2 batched GEMMs doing the loop's FLOPs;
# - otherwise the loop (run fused: grouped_swiglu_fused): on a quiet box it won even at a few rows per expert (64
#   tokens, 32 experts: loop 17.6 ms, padded 24.5 ms; weight reads bound both). With the cores oversubscribed padded
#   won 3-5x there, but the choice stays a pure function of the counts: a timed choice would make the oracle's
#   results depend on the machine's load.
PADDED_MAX_WASTE = 1.25

Path = Literal["padded", "loop"]


def path_rule(counts: Sequence[int], weight_index: Sequence[int] | None = None) -> Path:
    """grouped_swiglu's choice (pure): "padded" when padding costs almost nothing, else "loop". Rows of segments
    that share an expert are merged first (replicas): G experts used, C_e rows each."""
    per_expert = _rows_per_expert(counts, weight_index)
    if not per_expert:
        return "loop"
    total, groups, longest = sum(per_expert.values()), len(per_expert), max(per_expert.values())
    return "padded" if groups * longest <= PADDED_MAX_WASTE * total else "loop"


# Within the loop family, a forward without autograd runs fused (grouped_swiglu_fused) only at <= this many rows per
# used expert (mean), else the plain loop. Measured, 2 threads, in the benchmark's round (docs/measurements.md): the
# fused forward 1.00-1.03x the loop at 4 rows per expert, 0.92-0.94x at 32 (the same GEMMs, bit-equal: it loses on
# page faults and cache, not FLOPs), 1.01x at 256; under autograd it wins 1.3-1.8x at every size (its backward).
FUSED_FORWARD_MAX_MEAN_ROWS = 8


def fused_forward_wins(counts: Sequence[int], weight_index: Sequence[int] | None = None) -> bool:
    """For a forward without autograd in the loop family: True runs grouped_swiglu_fused, False the plain loop
    (pure: a function of the counts; both give the same bits)."""
    per_expert = _rows_per_expert(counts, weight_index)
    return bool(per_expert) and sum(per_expert.values()) <= FUSED_FORWARD_MAX_MEAN_ROWS * len(per_expert)


def padded_is_faster(counts: Sequence[int], weight_index: Sequence[int] | None = None) -> bool:
    """True picks the padded batched path, False the loop (`path_rule`)."""
    return path_rule(counts, weight_index) == "padded"


def _rows_per_expert(counts: Sequence[int], weight_index: Sequence[int] | None) -> dict[int, int]:
    index = range(len(counts)) if weight_index is None else weight_index
    rows: dict[int, int] = {}
    for e, n in zip(index, counts):
        if n:
            rows[int(e)] = rows.get(int(e), 0) + int(n)
    return rows


def _check(x_nd: torch.Tensor, counts: Sequence[int], weight_index: Sequence[int] | None) -> None:
    if sum(counts) != x_nd.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)}: expected x rows ({x_nd.shape[0]})")
    if weight_index is not None and len(weight_index) != len(counts):
        raise ValueError(
            f"len(weight_index) = {len(weight_index)} but len(counts) = {len(counts)}: expected equal"
        )


def _empty(x_nd: torch.Tensor, w1_ed2f: torch.Tensor, w2_efd: torch.Tensor) -> torch.Tensor:
    # [0, d_out], still attached to x and the weights, so backward() works and leaves zero gradients
    if w1_ed2f.shape[0] == 0:
        return x_nd.new_zeros(0, w2_efd.shape[-1])
    return swiglu(x_nd, w1_ed2f[0], w2_efd[0])


def grouped_swiglu_loop(
    x_nd: torch.Tensor,
    counts: Sequence[int],
    w1_ed2f: torch.Tensor,
    w2_efd: torch.Tensor,
    weight_index: Sequence[int] | None = None,
) -> torch.Tensor:
    """grouped_swiglu by a Python loop: one matmul pair per non-empty segment, on contiguous row slices.

    The best path at many rows per expert (no padding, full-size GEMMs). Under autograd the stacked weights are
    unbound once: the backward of w[i] (select) would allocate and add a zero tensor of the WHOLE stack per
    segment (much slower at 32 experts: docs/measurements.md); unbind's backward stacks the per-expert gradients
    once.
    """
    _check(x_nd, counts, weight_index)
    index = range(len(counts)) if weight_index is None else weight_index
    if torch.is_grad_enabled() and (w1_ed2f.requires_grad or w2_efd.requires_grad):
        w1s, w2s = w1_ed2f.unbind(0), w2_efd.unbind(0)
    else:
        w1s, w2s = w1_ed2f, w2_efd
    outs = []
    start = 0
    for i, n in zip(index, counts):
        if n:
            outs.append(swiglu(x_nd[start : start + n], w1s[i], w2s[i]))
        start += n
    if not outs:
        return _empty(x_nd, w1_ed2f, w2_efd)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def grouped_swiglu_padded(
    x_nd: torch.Tensor,
    counts: Sequence[int],
    w1_ed2f: torch.Tensor,
    w2_efd: torch.Tensor,
    weight_index: Sequence[int] | None = None,
) -> torch.Tensor:
    """grouped_swiglu by two batched matmuls over a zero-padded [B, max_rows, d] buffer, B experts.

    Segments of one expert (replicas) share that expert's block, so each expert's weights are read once and their
    gradients accumulate through the shared rows. The batch is the expert range [lo, hi] of the used experts, taken
    as a view of the stacked weights (no copy) when at least half of that range is used; otherwise the used experts
    are gathered (index_select: a copy, whose backward is one index_add). Padding rows are zero, give zero output
    and zero gradient. A constant number of ops, whatever the number of experts.
    """
    _check(x_nd, counts, weight_index)
    index = range(len(counts)) if weight_index is None else weight_index
    per_expert = _rows_per_expert(counts, index)
    if not per_expert:
        return _empty(x_nd, w1_ed2f, w2_efd)
    used = sorted(per_expert)
    lo, hi = used[0], used[-1]
    if 2 * len(used) >= hi - lo + 1:
        slot = {e: e - lo for e in used}
        w1_bd2f, w2_bfd = w1_ed2f[lo : hi + 1], w2_efd[lo : hi + 1]
    else:
        slot = {e: s for s, e in enumerate(used)}
        sel = torch.tensor(used, device=w1_ed2f.device)
        w1_bd2f, w2_bfd = w1_ed2f.index_select(0, sel), w2_efd.index_select(0, sel)
    b, rows, d = w1_bd2f.shape[0], max(per_expert.values()), x_nd.shape[1]
    # buffer row of input row r (segment i) = slot(e_i) * rows + (rows of e_i in earlier segments) + (r - start_i):
    # one repeat_interleave of a per-segment shift, added to arange(n)
    filled = dict.fromkeys(used, 0)
    shifts, lengths = [], []
    start = 0
    for e, n in zip(index, counts):
        if n:
            e = int(e)
            shifts.append(slot[e] * rows + filled[e] - start)
            lengths.append(n)
            filled[e] += n
        start += n
    n_rows = x_nd.shape[0]
    shift = torch.tensor(shifts, dtype=torch.long, device=x_nd.device)
    pos = torch.arange(n_rows, device=x_nd.device) + shift.repeat_interleave(
        torch.tensor(lengths, dtype=torch.long, device=x_nd.device), output_size=n_rows
    )
    buf = x_nd.new_zeros(b * rows, d).index_copy(0, pos, x_nd).view(b, rows, d)
    y = torch.bmm(swiglu_gate(torch.bmm(buf, w1_bd2f)), w2_bfd)
    return y.view(b * rows, -1).index_select(0, pos)


# The fused loop's chunks: consecutive segments are gated together up to this many rows (one silu and one mul per
# chunk instead of per segment). 64, not 128: after an op that frees big buffers, a 128-row h [., 2f] (1.4 MB at
# ffn 1408) and its gate output were first-touched anew on most calls (~1150-1600 page faults per call at 512 tokens
# vs ~480, the output's, for the loop); 64-row chunks, gated in place, fault like the loop (docs/measurements.md).
FUSED_CHUNK_ROWS = 64

_Seg = tuple[int, int, int]  # (first row, rows, expert) of one non-empty segment


def fused_chunks(counts: Sequence[int], weight_index: Sequence[int] | None = None,
                 max_rows: int = FUSED_CHUNK_ROWS) -> list[list[_Seg]]:  # fmt: skip
    """The non-empty segments as (start, rows, expert), in order, grouped into chunks of consecutive segments of
    <= max_rows rows together (a longer segment is a chunk alone). Pure: a function of the counts only."""
    index = range(len(counts)) if weight_index is None else weight_index
    chunks: list[list[_Seg]] = []
    rows = start = 0
    for e, n in zip(index, counts):
        n = int(n)
        if n:
            if not chunks or rows + n > max_rows:
                chunks.append([])
                rows = 0
            chunks[-1].append((start, n, int(e)))
            rows += n
        start += n
    return chunks


def _chunk_rows(chunk: list[_Seg]) -> tuple[int, int]:
    return chunk[0][0], chunk[-1][0] + chunk[-1][1]


def grouped_mm_offsets(chunk: list[_Seg]) -> list[int] | None:
    """torch._grouped_mm's offs for a chunk of >= 2 segments with strictly increasing experts e0 < ... < e1: the
    end row (relative to the chunk) of each expert in [e0, e1], an unused one an empty group; None otherwise (one
    segment: a plain mm; replicas or unsorted experts: the per-segment loop). Pure: a function of the chunk."""
    experts = [e for _, _, e in chunk]
    if len(chunk) < 2 or any(b <= a for a, b in zip(experts, experts[1:])):
        return None
    lo = chunk[0][0]
    end_of = {e: s + n - lo for s, n, e in chunk}
    offs, end = [], 0
    for e in range(experts[0], experts[-1] + 1):
        end = end_of.get(e, end)
        offs.append(end)
    return offs


def _grouped_mm_fits(x_nd: torch.Tensor, w1_ed2f: torch.Tensor, w2_efd: torch.Tensor) -> bool:
    # torch._grouped_mm on CPU: a C++ loop of mm_out over the groups (the loop's GEMMs, same bits, one call); it
    # needs every stride (d, f, 2f) a multiple of 16 bytes. CUDA's takes bf16 on sm90+ only: not used there.
    item = x_nd.element_size()
    return (
        hasattr(torch, "_grouped_mm")
        and x_nd.device.type == "cpu"
        and x_nd.dtype == w1_ed2f.dtype == w2_efd.dtype
        and x_nd.dtype in (torch.float32, torch.bfloat16, torch.float16)  # float64 (tests' oracles) it refuses
        and (x_nd.shape[1] * item) % 16 == 0
        and (w2_efd.shape[1] * item) % 16 == 0
    )


def _chunk_gmm_offs(chunks: list[list[_Seg]], use_gmm: bool, device: torch.device) -> list[torch.Tensor | None]:
    if not use_gmm:
        return [None] * len(chunks)
    offs = [grouped_mm_offsets(c) for c in chunks]
    return [None if o is None else torch.tensor(o, dtype=torch.int32, device=device) for o in offs]


def _fused_forward(x_nd: torch.Tensor, w1_ed2f: torch.Tensor, w2_efd: torch.Tensor, chunks: list[list[_Seg]],
                   keep_h: bool, gmm_offs: Sequence[torch.Tensor | None] | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """y [rows, d] and (keep_h) h = x @ w1 per chunk. Outputs written in place (mm out=); without keep_h one h buffer
    is reused by every chunk. Buffers are per chunk, not [rows, 2f]: a big fresh buffer costs page faults. A chunk
    with gmm_offs (grouped_mm_offsets) runs its segments' GEMMs as one torch._grouped_mm each (same GEMMs)."""
    f = w2_efd.shape[1]
    y_nd = x_nd.new_empty(x_nd.shape[0], w2_efd.shape[2])
    hs: list[torch.Tensor] = []
    scratch: torch.Tensor | None = None
    for c, chunk in enumerate(chunks):
        lo, hi = _chunk_rows(chunk)
        offs = None if gmm_offs is None else gmm_offs[c]
        if offs is not None:  # one call per matrix instead of one per segment (and its slicing)
            e0, e1 = chunk[0][2], chunk[-1][2] + 1
            h_c2f = torch._grouped_mm(x_nd[lo:hi], w1_ed2f[e0:e1], offs=offs)
            if keep_h:
                u_cf = F.silu(h_c2f[:, :f]).mul_(h_c2f[:, f:])
            else:  # gated in place in h's first half (a strided A operand): no u buffer to allocate and fault in
                u_cf = F.silu(h_c2f[:, :f], inplace=True).mul_(h_c2f[:, f:])
            y_nd[lo:hi] = torch._grouped_mm(u_cf, w2_efd[e0:e1], offs=offs)
            if keep_h:
                hs.append(h_c2f)
            continue
        if keep_h or scratch is None or scratch.shape[0] < hi - lo:
            h_c2f = x_nd.new_empty(hi - lo, w1_ed2f.shape[2])
            scratch = None if keep_h else h_c2f
        else:
            h_c2f = scratch[: hi - lo]
        for s, n, e in chunk:
            torch.mm(x_nd[s : s + n], w1_ed2f[e], out=h_c2f[s - lo : s - lo + n])
        u_cf = F.silu(h_c2f[:, :f]).mul_(h_c2f[:, f:])
        for s, n, e in chunk:
            torch.mm(u_cf[s - lo : s - lo + n], w2_efd[e], out=y_nd[s : s + n])
        if keep_h:
            hs.append(h_c2f)
    return y_nd, hs


def _fused_backward(dy_nd: torch.Tensor, x_nd: torch.Tensor, hs: Sequence[torch.Tensor], w1_ed2f: torch.Tensor,
                    w2_efd: torch.Tensor, chunks: list[list[_Seg]], need_dx: bool, need_dw: bool,
                    gmm_offs: Sequence[torch.Tensor | None] | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(dx, dw1 [E, d, 2f], dw2 [E, f, d]) of _fused_forward: swiglu_backward's ops, the elementwise part once
    per chunk, each weight grad written into its expert's slice of one stacked buffer (replica segments add). A chunk
    with gmm_offs runs du and dx as one torch._grouped_mm each; the weight grads stay per segment (written in place)."""
    f = w2_efd.shape[1]
    dx_nd = dy_nd.new_empty(x_nd.shape) if need_dx else None
    dw1 = torch.empty_like(w1_ed2f) if need_dw else None
    dw2 = torch.empty_like(w2_efd) if need_dw else None
    written: set[int] = set()
    for c, (chunk, h_c2f) in enumerate(zip(chunks, hs)):
        lo, hi = _chunk_rows(chunk)
        offs = None if gmm_offs is None else gmm_offs[c]
        e0, e1 = chunk[0][2], chunk[-1][2] + 1
        if offs is not None:
            du_cf = torch._grouped_mm(dy_nd[lo:hi], w2_efd[e0:e1].transpose(1, 2), offs=offs)
        else:
            du_cf = dy_nd.new_empty(hi - lo, f)
            for s, n, e in chunk:
                torch.mm(dy_nd[s : s + n], w2_efd[e].t(), out=du_cf[s - lo : s - lo + n])
        a, g = h_c2f[:, :f], h_c2f[:, f:]
        sa = F.silu(a)
        dh_c2f = dy_nd.new_empty(hi - lo, 2 * f)
        torch.mul(du_cf, sa, out=dh_c2f[:, f:])
        torch.ops.aten.silu_backward.grad_input(du_cf.mul_(g), a, grad_input=dh_c2f[:, :f])
        u_cf = sa.mul_(g)
        if dx_nd is not None and offs is not None:
            dx_nd[lo:hi] = torch._grouped_mm(dh_c2f, w1_ed2f[e0:e1].transpose(1, 2), offs=offs)
        for s, n, e in chunk:
            rows, crow = slice(s, s + n), slice(s - lo, s - lo + n)
            if dx_nd is not None and offs is None:
                torch.mm(dh_c2f[crow], w1_ed2f[e].t(), out=dx_nd[rows])
            if dw1 is not None and dw2 is not None:
                if e in written:
                    dw1[e].addmm_(x_nd[rows].t(), dh_c2f[crow])
                    dw2[e].addmm_(u_cf[crow].t(), dy_nd[rows])
                else:
                    torch.mm(x_nd[rows].t(), dh_c2f[crow], out=dw1[e])
                    torch.mm(u_cf[crow].t(), dy_nd[rows], out=dw2[e])
                    written.add(e)
    if dw1 is not None and dw2 is not None:
        for e in range(w1_ed2f.shape[0]):
            if e not in written:
                dw1[e].zero_()
                dw2[e].zero_()
    return dx_nd, dw1, dw2


class _FusedLoop(torch.autograd.Function):
    """The fused loop as ONE autograd op: saves x and h, runs _fused_backward (no per-segment graph nodes, no
    unbind/stack of the weight stacks)."""

    @staticmethod
    def forward(ctx, x_nd, w1_ed2f, w2_efd, chunks, gmm_offs):  # type: ignore[override]
        y_nd, hs = _fused_forward(x_nd, w1_ed2f, w2_efd, chunks, keep_h=True, gmm_offs=gmm_offs)
        ctx.save_for_backward(x_nd, w1_ed2f, w2_efd, *hs)
        ctx.chunks, ctx.gmm_offs = chunks, gmm_offs
        return y_nd

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_nd):  # type: ignore[override]
        x_nd, w1_ed2f, w2_efd, *hs = ctx.saved_tensors
        need_dx, need_w1, need_w2 = ctx.needs_input_grad[:3]
        dx, dw1, dw2 = _fused_backward(dy_nd.contiguous(), x_nd, hs, w1_ed2f, w2_efd, ctx.chunks, need_dx,
                                       need_w1 or need_w2, ctx.gmm_offs)  # fmt: skip
        return dx, dw1 if need_w1 else None, dw2 if need_w2 else None, None, None


def grouped_swiglu_fused(
    x_nd: torch.Tensor,
    counts: Sequence[int],
    w1_ed2f: torch.Tensor,
    w2_efd: torch.Tensor,
    weight_index: Sequence[int] | None = None,
    use_grouped_mm: bool = True,
) -> torch.Tensor:
    """grouped_swiglu_loop's matmuls (one pair per non-empty segment, no padding), fused around them: outputs
    written in place, SiLU * gate once per chunk of segments (fused_chunks), and under autograd one op with a
    hand-written backward writing the weight grads into stacked buffers. A chunk of several segments of increasing
    experts runs its GEMMs as one torch._grouped_mm per matrix (use_grouped_mm, where it fits: the same mm calls
    from C++, without the per-segment Python and slicing). Same result as the loop up to fp32 rounding (bit-equal
    on this build); deterministic (a pure function of the counts decides every shape)."""
    _check(x_nd, counts, weight_index)
    chunks = fused_chunks(counts, weight_index)
    if not chunks:
        return _empty(x_nd, w1_ed2f, w2_efd)
    x_nd = x_nd.contiguous()
    gmm_offs = _chunk_gmm_offs(chunks, use_grouped_mm and _grouped_mm_fits(x_nd, w1_ed2f, w2_efd), x_nd.device)
    if torch.is_grad_enabled() and (x_nd.requires_grad or w1_ed2f.requires_grad or w2_efd.requires_grad):
        return _FusedLoop.apply(x_nd, w1_ed2f, w2_efd, chunks, gmm_offs)
    with torch.no_grad():
        return _fused_forward(x_nd, w1_ed2f, w2_efd, chunks, keep_h=False, gmm_offs=gmm_offs)[0]


def grouped_swiglu(
    x_nd: torch.Tensor,
    counts: Sequence[int],
    w1_ed2f: torch.Tensor,
    w2_efd: torch.Tensor,
    weight_index: Sequence[int] | None = None,
) -> torch.Tensor:
    """Run expert weight_index[i] (default i) on rows [sum(counts[:i]), +counts[i]) of x_nd.

    Rows are sorted by group; groups with zero rows are skipped; weight_index may repeat an expert (replicas: the
    gradients of its weights accumulate). Differentiable w.r.t. x and both weight stacks. Picks the padded batched
    path (grouped_swiglu_padded) when padding costs almost nothing, else the loop, fused (grouped_swiglu_fused:
    grouped_swiglu_loop's matmuls with less around them), by path_rule; without autograd the fused forward runs
    only at few rows per expert (fused_forward_wins), else the plain loop. All give the loop's result up to fp32
    rounding, and the choice is a pure function of the counts (same inputs, same bits).
    """
    if padded_is_faster(counts, weight_index):
        return grouped_swiglu_padded(x_nd, counts, w1_ed2f, w2_efd, weight_index)
    autograd = torch.is_grad_enabled() and (x_nd.requires_grad or w1_ed2f.requires_grad or w2_efd.requires_grad)
    if not autograd and not fused_forward_wins(counts, weight_index):
        return grouped_swiglu_loop(x_nd, counts, w1_ed2f, w2_efd, weight_index)
    return grouped_swiglu_fused(x_nd, counts, w1_ed2f, w2_efd, weight_index)


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts of one MoE layer, weights stacked."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, init_std: float = 0.02,
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        self.num_experts = num_experts
        # dtype: the storage dtype (model.expert_weight_dtype); bf16 is converted per expert (model/weight_storage)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * ffn_hidden_size, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size, dtype=dtype))
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w2, std=init_std)

    def forward(self, x_nd: torch.Tensor, counts: Sequence[int], expert_ids: Sequence[int]) -> torch.Tensor:
        if self.w1.dtype != x_nd.dtype:  # stored in another dtype: one expert converted at a time
            from moe_runtime.model.weight_storage import stored_swiglu_loop

            return stored_swiglu_loop(x_nd, counts, self.w1, self.w2, expert_ids)
        return grouped_swiglu(x_nd, counts, self.w1, self.w2, expert_ids)
