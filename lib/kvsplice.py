"""KVSplice: a learned monotone per-dimension spline in front of PCA.

    standard PCA:   V -> PCA_k(V) -> latent
    Spline->PCA:    V -> Spline(V) = Z -> PCA_k(Z) -> latent
    back:           latent -> PCA back-projection -> Spline^-1 -> V_hat

The spline is a strictly increasing piecewise-linear map per head dimension,
so it keeps the order of values, has an exact inverse, and with k = dim the
round trip is exact. It is fitted so that the reconstruction error in the
ORIGINAL V space is as small as possible; it starts as the identity, and if
the fitted spline does not beat plain PCA on held-out samples the identity is
kept, so SplinePCA is never worse than PCA on that split.

Pure tensors in, tensors out: nothing here knows about models. Everything
works on CPU and CUDA; compress / decompress / roundtrip take fp32, fp16 or
bf16 and return the input dtype (the arithmetic is always fp32).

Three evaluations of the same spline:
- the *reference* path (`forward_ref` / `inverse_ref`): segment found by
  comparison, differentiable in the spline's parameters; used by `fit`.
- the *fast* path (`forward` / `inverse`): lookup tables built once after
  fit / load (`refresh`). A uniform grid of cells per dimension turns the
  segment search into arithmetic (scale, clamp, truncate) and one gather.
  The knots sit on the forward grid's edges, so a forward cell is one line
  `a*v + b`; the inverse grid is fine enough that a cell holds at most one
  knot t, handled by `b + a*(v - t) + c*relu(v - t)`. Every knot is kept, so the
  fast path is the reference function up to fp32 rounding; a dimension
  whose knots are too close for a table of _MAX_CELLS cells (a nearly flat
  segment seen from the inverse side) is evaluated by the reference formula
  instead. Differentiable in the input only (the parameters are frozen when
  it runs inside attention).
- the *compiled* path: the reference formula as a chain of selects over the
  knots (`_chain`), with no gather, which torch.compile fuses into one loop
  (a vectorised C++ loop on CPU, one Triton kernel on CUDA). It runs whenever
  the caller is being compiled (a compiled training step or decode step),
  and for compress / decompress of a SplinePCA
  set to `compiled`: then the spline and the PCA projection are one compiled
  kernel each way, shared by every SplinePCA.

`attend(W, Z)` is the decode cache's read, the attention weights over
stored latents (W @ decompress(Z)); with the identity spline (plain PCA) it
stays in the latent.
"""

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

KNOTS = 7          # spline knots per dimension
FIT_EPOCHS = 8     # SplinePCA.fit's passes over the samples
FIT_LR = 2e-3      # and its Adam learning rate
# the learned spline is kept only if it beats PCA on the held-out split by
# this relative margin; smaller gains are within noise and not worth keeping
MIN_RELATIVE_GAIN = 0.005
# rows per piece on CPU: intermediates stay in cache instead of streaming
# hundreds of MB per elementwise op
_CPU_CHUNK_ROWS = 4096
# upper bound on lookup-table cells per dimension
_MAX_CELLS = 1024
# inner knots snap to a grid of this many cells between the outer knots
_KNOT_GRID = 64
# how far (in cells) outside its cell a value may land by fp32 rounding of
# the cell coordinate and still be placed exactly by the cell's knot
_EDGE_MARGIN = 1 / 64


def _check_dim_k(dim, k):
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(f"k must be an int in [1, dim={dim}], got {k!r}")


def _as_rows(x, dim, what):
    """x (..., dim) -> float32 (N, dim), with checks."""
    if not torch.is_tensor(x):
        raise ValueError(f"{what}: expected a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"{what}: expected shape [..., {dim}], got {list(x.shape)}")
    x = x.reshape(-1, dim).float()
    bad = (~torch.isfinite(x)).any(dim=1)
    n_bad = int(bad.sum())
    if n_bad:
        raise ValueError(f"{what}: {n_bad} of {x.shape[0]} rows contain NaN or inf")
    return x


def _no_autocast(device):
    # under bf16 autocast the projections would silently run in bf16
    return torch.autocast(device_type=device.type, enabled=False)


class _ApplyTable(torch.autograd.Function):
    """out = b + a*(v - t) + c*relu(v - t), with (b, a, t, c) looked up per cell:
    the line's value b at the cell's knot t, its slope a, and the slope change
    c at t. Measured from t, no large intercept cancels: fp32 rounding stays
    at the output's own scale however steep the line."""

    @staticmethod
    def forward(ctx, v, table, shift, inv_h, offsets, top):
        # v: (n, D) fp32; table: (D*cells, 4) contiguous; shift/inv_h: (D,); offsets: (D,) int32
        # (int32 cell indices: half the memory traffic of int64)
        v = v.contiguous()
        u = torch.addcmul(shift, v, inv_h).clamp_(0, top)  # cell coordinate, (n, D)
        idx = u.to(torch.int32).add_(offsets)
        idx.clamp_(0, table.shape[0] - 1)  # NaN input lands anywhere valid and stays NaN
        # one 16-byte element per cell: one complex128 gather instead of
        # gathering rows of 4 floats, the faster of the two on CPU
        cells = table.view(torch.complex128).view(-1).index_select(0, idx.view(-1))
        b, a, t, c = torch.view_as_real(cells).view(torch.float32).view(*v.shape, 4).unbind(-1)  # each (n, D)
        ramp = v - t
        out = torch.addcmul(b, ramp, a)
        out.addcmul_(ramp.clamp_(min=0), c)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(a, c, ramp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, c, ramp = ctx.saved_tensors
        slope = torch.addcmul(a, c, ramp.sign())  # a + c * [v > t]
        return grad_out * slope, None, None, None, None, None


class _ApplyLines(torch.autograd.Function):
    """out = a*v + b, with (a, b) looked up per cell: the table of a map whose
    knots all sit on cell edges, so no cell needs a correction."""

    @staticmethod
    def forward(ctx, v, table, shift, inv_h, offsets, top):
        # v: (n, D) fp32; table: (D*(M+2), 2) contiguous
        v = v.contiguous()
        u = torch.addcmul(shift, v, inv_h).clamp_(0, top)
        idx = u.to(torch.int32).add_(offsets)
        idx.clamp_(0, table.shape[0] - 1)
        cells = table.view(torch.complex64).view(-1).index_select(0, idx.view(-1))
        a, b = torch.view_as_real(cells).view(*v.shape, 2).unbind(-1)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(a)
        return torch.addcmul(b, v, a)

    @staticmethod
    def backward(ctx, grad_out):
        (a,) = ctx.saved_tensors
        return grad_out * a, None, None, None, None, None


def _segment_lines(px, py, s, seg):
    """(a, b) of the lines a*v + b of segments seg (0: left of the first point)
    through the point before each segment, as MonotoneSpline._piecewise anchors them."""
    anchor = (seg - 1).clamp(min=0)
    return s[seg], py[anchor] - s[seg] * px[anchor]


def _cell_width(p_in, M):
    """(D, 1) width h of M uniform cells between the outer points. Where they
    coincide (a constant dimension), a width far below the point's own fp32
    resolution: values that round into the wrong cell are then closer to it
    than fp32 can tell apart."""
    lo, hi = p_in[:, :1], p_in[:, -1:]
    return torch.where(hi > lo, (hi - lo) / M, lo.abs().clamp(min=2.0 ** -100) * 2.0 ** -20)


def _grid(p_in, M, cells):
    """(shift, inv_h, offsets, top) of a grid of `cells` uniform cells of
    width h = span/M from the first point on, per dimension: cell coordinate
    u = (v - lo)/h + 1; cell 0 is left of the first point, cell cells+1
    right of the last uniform one."""
    h = _cell_width(p_in, M)[:, 0]
    offsets = torch.arange(p_in.shape[0], dtype=torch.int32) * (cells + 2)
    return (1.0 - p_in[:, 0] / h).float(), (1.0 / h).float(), offsets, float(cells + 1)


def _edges(p_in, M, cells):
    """((D, cells+2) left edges of _grid's cells, cell 0's one cell left of lo; (D, 1) h)."""
    h = _cell_width(p_in, M)
    return p_in[:, :1] + (torch.arange(cells + 2, dtype=torch.float64) - 1) * h, h


def _lines_table(p_in, p_out, slopes, M):
    """(table, grid, exact) for _ApplyLines: the (D*(M+2), 2) table of (a, b)
    on _grid(p_in, M, M), and no dimension left out. None when some point is
    off the cell edges (beyond fp32 rounding): then a cell would need a kink."""
    edges, h = _edges(p_in, M, M)
    lo, hi = p_in[:, :1], p_in[:, -1:]
    pos = (p_in - lo) / h
    if ((pos - pos.round()).abs() * h > 1e-6 * (lo.abs() + hi.abs() + h)).any():
        return None
    # each cell is the line of the segment under its midpoint
    seg = torch.searchsorted(p_in, (edges + 0.5 * h).contiguous(), right=True)
    seg[:, 0], seg[:, -1] = 0, p_in.shape[1]
    a, b = zip(*(_segment_lines(p_in[d], p_out[d], slopes[d], seg[d]) for d in range(p_in.shape[0])))
    table = torch.stack([torch.stack(a), torch.stack(b)], dim=-1).reshape(-1, 2).float()
    return table, _grid(p_in, M, M), torch.empty(0, dtype=torch.long)


def _knot_table(p_in, p_out, slopes):
    """(table, grid, exact) for _ApplyTable: the table of (b, a, t, c) on
    _grid(p_in, M, M+1), M+1 cells of width h = span/M (the last one past the
    last point), and the dimensions it cannot represent.

    Cell j's knot t is the first point at or right of its left edge minus
    h*_EDGE_MARGIN; the cell's line is the segment before t, and c the slope
    change at t. With h*(1 + 2*_EDGE_MARGIN) at most the smallest gap
    between points, no other point lies within h*_EDGE_MARGIN of the cell,
    so a value that rounding puts in it from that close is still compared
    with t exactly and lands on its own segment. The rightmost cell is the
    right line alone: far out, a correction would cancel most of the base
    line and lose fp32 precision. Dimensions needing more than _MAX_CELLS
    cells (points closer than span/_MAX_CELLS: a nearly flat segment seen
    from the inverse side) are returned in `exact`, their rows left zero:
    _rows evaluates them by the reference formula.
    """
    D, K = p_in.shape
    lo, hi = p_in[:, 0], p_in[:, -1]
    distinct = p_in[:, 1:] > p_in[:, :-1]
    gaps = (p_in[:, 1:] - p_in[:, :-1]).masked_fill(~distinct, math.inf)
    gap = gaps.min(dim=1).values if K > 1 else torch.full((D,), math.inf, dtype=torch.float64)
    needed = torch.where(torch.isinf(gap), 1.0, ((hi - lo) * (1 + 2 * _EDGE_MARGIN) / gap).ceil())
    exact = (needed > _MAX_CELLS).nonzero().flatten()
    M = int(needed.masked_fill(needed > _MAX_CELLS, 1).max())
    edges, h = _edges(p_in, M, M + 1)
    table = torch.zeros(D, M + 3, 4, dtype=torch.float64)
    for d in sorted(set(range(D)) - set(exact.tolist())):
        px, py, s = p_in[d], p_out[d], slopes[d]
        knot = torch.searchsorted(px, edges[d] - _EDGE_MARGIN * h[d]).clamp(max=K - 1)
        t = px[knot]
        a, b = _segment_lines(px, py, s, torch.searchsorted(px, t))  # the segment ending at t
        after = s[torch.searchsorted(px, t, right=True)]  # the slope beyond t (past repeats of t)
        a[-1], b[-1], after[-1] = s[K], py[K - 1] - s[K] * px[K - 1], s[K]  # the right line, t = last point
        table[d] = torch.stack([a * t + b, a, t, after - a], dim=1)
    return table.reshape(-1, 4).float(), _grid(p_in, M, M + 1), exact


def _chain(v, p_in, p_out, slopes):
    """The piecewise-linear map through (p_in -> p_out) with slopes, as a
    chain of selects: the last knot at or left of v anchors the line, as in
    MonotoneSpline._piecewise, so it is the reference formula. No gather and
    no data-dependent shape: a compiler fuses it into one elementwise loop.
    v (n, D); p_in, p_out (K, D); slopes (K+1, D), contiguous: each knot's
    row is one vector load across the dimensions. The selects pick the line
    (its anchor and slope), not values computed from v: the gradient to v is
    the slope alone, and a backward saves one tensor, not a mask per knot."""
    x0, y0, slope = p_in[0], p_out[0], slopes[0]
    for j in range(p_in.shape[0]):
        right = v >= p_in[j]
        x0 = torch.where(right, p_in[j], x0)
        y0 = torch.where(right, p_out[j], y0)
        slope = torch.where(right, slopes[j + 1], slope)
    return y0 + slope * (v - x0)


def _encode_rows(v, mean, components, segments):
    """Spline, then PCA: rows (n, D) -> (n, k). segments: MonotoneSpline.segments(), None for the identity."""
    z = v if segments is None else _chain(v, *segments)
    return (z - mean) @ components  # the centring fuses into the spline's loop


def _decode_rows(z, mean, components_t, segments):
    """PCA back-projection, then the spline's inverse: rows (n, k) -> (n, D),
    with components_t = P^T as (k, D) rows (PCA.components_t). With a spline
    the back-projection is k multiply-adds per value over those rows (each
    one vector load), not a matmul, so that a compiler fuses it with the
    chain into one loop that stores no back-projected rows; where one query
    row reads the values (SplinePCA.attend in a decode step) the weighted
    sum joins that loop too. The mean is folded into the spline's knots
    (chain(u + mean, p_in) == chain(u, p_in - mean)): one bias pass over the
    n x D rows fewer."""
    if segments is None:
        return torch.addmm(mean, z, components_t)
    u = z[..., 0:1] * components_t[0]
    for j in range(1, z.shape[-1]):
        u = u + z[..., j:j + 1] * components_t[j]
    p_in, p_out, slopes = segments
    return _chain(u, p_in - mean, p_out, slopes)


def _refresh_after_load(module, incompatible_keys):
    """load_state_dict post-hook: rebuild the module's derived, unsaved buffers."""
    module.refresh()


_COMPILED = {}


def _compiled(kernel, rows, *args):
    """kernel(rows, *args), torch.compile'd once per process and shared by
    every SplinePCA (a layer's geometry is an argument, not a constant); only
    the row count is dynamic, so the loop over dimensions is vectorised."""
    if kernel not in _COMPILED:
        _COMPILED[kernel] = torch.compile(kernel, dynamic=False)
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    return _COMPILED[kernel](rows, *args)


class MonotoneSpline(nn.Module):
    """Strictly increasing piecewise-linear map per dimension of the last axis.

    Knots sit at data quantiles (`place_knots`, snapped to a grid of
    _KNOT_GRID cells between the outer ones); between and beyond them the
    map is linear with slopes min_slope + exp(raw) > 0, so every finite input
    has a finite output and back. The first knot is a fixed point, which with
    all slopes 1 makes the map the identity (as it starts).
    """

    def __init__(self, dim, knots=KNOTS, min_slope=1e-2):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(knots, int) or knots < 1:
            raise ValueError(f"knots must be an int >= 1, got {knots!r}")
        self.dim, self.knots, self.min_slope = dim, knots, min_slope
        self.register_buffer("knot_x", torch.zeros(dim, knots))  # (D, K), sorted per row
        self.raw_slope = nn.Parameter(torch.empty(dim, knots + 1))  # (D, K+1): left, inner, right
        # lookup tables derived from the parameters: moved by .to(), not saved
        for name in ("fwd_table", "fwd_shift", "fwd_inv_h", "fwd_offsets", "fwd_exact",
                     "inv_table", "inv_shift", "inv_inv_h", "inv_offsets", "inv_exact",
                     "ref_x", "ref_y", "ref_s",
                     "fwd_p_in", "fwd_p_out", "fwd_slopes", "inv_p_in", "inv_p_out", "inv_slopes"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.reset_identity()

    def slopes(self):
        return self.min_slope + self.raw_slope.exp()  # (D, K+1)

    @torch.no_grad()
    def reset_identity(self):
        self.raw_slope.fill_(math.log(1.0 - self.min_slope))
        self.refresh()

    @torch.no_grad()
    def place_knots(self, x):
        """Knots at quantiles of x (N, D), spaced evenly in normal score so
        the outer ones reach the tails (0.6% and 99.4% for several knots)."""
        x = x.reshape(-1, self.dim).float()
        z = torch.linspace(-2.5, 2.5, self.knots, dtype=torch.float64) if self.knots > 1 else torch.zeros(1, dtype=torch.float64)
        levels = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        pos = (levels * (x.shape[0] - 1)).round().long().tolist()
        # K order statistics from one sort of each dimension's values laid out
        # contiguously, rather than K kthvalue selections down the columns
        q = x.T.contiguous().sort(dim=1).values[:, pos].double()  # (D, K)
        # snap the inner knots to a grid of _KNOT_GRID cells between the outer
        # ones: then every forward cell is a single line (no correction term)
        lo, hi = q[:, :1], q[:, -1:]
        h = ((hi - lo) / _KNOT_GRID).clamp(min=torch.finfo(torch.float64).tiny)
        self.knot_x.copy_((lo + ((q - lo) / h).round() * h).float())
        self.reset_identity()

    def _points(self):
        """(knot_x, knot_y, slopes): knot_y is where the knots land."""
        s = self.slopes()
        X = self.knot_x
        Y = torch.cat([X[:, :1], X[:, :1] + torch.cumsum(s[:, 1:-1] * (X[:, 1:] - X[:, :-1]), dim=1)], dim=1)
        return X, Y, s

    @staticmethod
    def _piecewise(v, p_in, p_out, s):
        """The piecewise-linear map through (p_in -> p_out) with slopes s;
        differentiable in v, p_out and s. v (n, D); p_in, p_out (D, K); s (D, K+1)."""
        D, K = p_in.shape
        with torch.no_grad():
            seg = (v.unsqueeze(-1) >= p_in).sum(-1)  # (n, D): 0 = left line, K = right line
            dim_base = torch.arange(D, device=v.device)
            anchor = (seg - 1).clamp_(min=0) + dim_base * K  # the point the segment's line passes through
            seg += dim_base * (K + 1)
        x0 = p_in.reshape(-1).take(anchor)
        return p_out.reshape(-1).take(anchor) + s.reshape(-1).take(seg) * (v - x0)

    def forward_ref(self, x):
        """Spline(x) for x (n, D), differentiable in the parameters (used by fit)."""
        X, Y, s = self._points()
        return self._piecewise(x, X, Y, s)

    def inverse_ref(self, y):
        X, Y, s = self._points()
        return self._piecewise(y, Y, X, 1.0 / s)

    @torch.no_grad()
    def refresh(self):
        """Rebuild the lookup tables from the parameters (after fit / load).
        On the meta device (a model built for its shapes alone) there are no
        values to build them from."""
        if self.knot_x.is_meta:
            self.is_identity = True
            return
        X, Y, s = (t.detach() for t in self._points())
        self.ref_x, self.ref_y, self.ref_s = X, Y, s
        # _chain's (K, D) rows, both ways
        self.fwd_p_in, self.fwd_p_out, self.fwd_slopes = (t.T.contiguous() for t in (X, Y, s))
        self.inv_p_in, self.inv_p_out, self.inv_slopes = (t.T.contiguous() for t in (Y, X, 1.0 / s))
        X, Y, s = (t.double().cpu() for t in (X, Y, s))
        self.is_identity = bool(torch.all((s - 1).abs() < 1e-6))
        dev = self.knot_x.device
        fwd = _lines_table(X, Y, s, _KNOT_GRID)  # the knots place_knots leaves: every cell one line
        self.fwd_is_lines = fwd is not None
        table, (shift, inv_h, offsets, self._fwd_top), exact = fwd or _knot_table(X, Y, s)
        self.fwd_table, self.fwd_shift, self.fwd_inv_h, self.fwd_offsets, self.fwd_exact = (
            t.to(dev) for t in (table, shift, inv_h, offsets, exact))
        table, (shift, inv_h, offsets, self._inv_top), exact = _knot_table(Y, X, 1 / s)
        self.inv_table, self.inv_shift, self.inv_inv_h, self.inv_offsets, self.inv_exact = (
            t.to(dev) for t in (table, shift, inv_h, offsets, exact))

    def segments(self, inverse=False):
        """(p_in, p_out, slopes) of the map (or of its inverse) for _chain; None for the identity."""
        if self.is_identity:
            return None
        if inverse:
            return self.inv_p_in, self.inv_p_out, self.inv_slopes
        return self.fwd_p_in, self.fwd_p_out, self.fwd_slopes

    def _rows(self, v, inverse):
        """The fast path on fp32 rows (n, D)."""
        if self.is_identity:
            return v
        if torch.compiler.is_compiling():  # traced into the caller's graph
            return _chain(v, *self.segments(inverse))
        if inverse:
            out = _ApplyTable.apply(v, self.inv_table, self.inv_shift, self.inv_inv_h, self.inv_offsets,
                                    self._inv_top)
        else:
            apply = _ApplyLines if self.fwd_is_lines else _ApplyTable
            out = apply.apply(v, self.fwd_table, self.fwd_shift, self.fwd_inv_h, self.fwd_offsets, self._fwd_top)
        exact = self.inv_exact if inverse else self.fwd_exact
        if exact.numel():  # dimensions no table of bounded size represents exactly
            X, Y, s = self.ref_x[exact], self.ref_y[exact], self.ref_s[exact]
            ref = self._piecewise(v[:, exact], Y, X, 1.0 / s) if inverse else self._piecewise(v[:, exact], X, Y, s)
            out = out.index_copy(1, exact, ref)
        return out

    def forward(self, x):
        """Spline(x) over the last dimension, any leading shape; returns x's dtype."""
        rows = x.reshape(-1, self.dim).float()
        with _no_autocast(x.device):
            return self._rows(rows, inverse=False).to(x.dtype).reshape(x.shape)

    def inverse(self, y):
        rows = y.reshape(-1, self.dim).float()
        with _no_autocast(y.device):
            return self._rows(rows, inverse=True).to(y.dtype).reshape(y.shape)


class PCA(nn.Module):
    """Plain PCA to k dims: the baseline, with SplinePCA's interface."""

    def __init__(self, dim, k):
        super().__init__()
        _check_dim_k(dim, k)
        self.dim, self.k = dim, k
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.eye(dim)[:, :k].contiguous())  # (D, k), orthonormal columns
        # components.T laid out (k, D) for _decode_rows' vector loads: derived, not saved
        self.register_buffer("components_t", torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.refresh()

    @torch.no_grad()
    def refresh(self):
        """Rebuild components_t from the components (after fit / load)."""
        self.components_t = self.components.T.contiguous()

    @torch.no_grad()
    def fit(self, X):
        """Fit to X (N, dim); any float dtype, NaN/inf rejected. Returns self."""
        X = _as_rows(X, self.dim, "PCA.fit")
        if X.shape[0] < self.k + 1:
            raise ValueError(f"PCA.fit: need at least k+1={self.k + 1} samples, got {X.shape[0]}")
        self._fit_rows(X)
        return self

    @torch.no_grad()
    def _fit_rows(self, X):
        X = X.double()  # float64 covariance and eigh: stable for near-degenerate spectra
        mean = X.mean(0)
        Xc = X - mean
        evals, evecs = torch.linalg.eigh(Xc.T @ Xc / X.shape[0])
        comps = evecs.flip(-1)[:, :self.k]  # (D, k), largest variance first
        # deterministic signs: the largest-magnitude entry of each component is positive
        sign = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
        sign[sign == 0] = 1
        self.mean.copy_(mean.float())
        self.components.copy_((comps * sign).float())
        self.refresh()

    def _compress_rows(self, v):  # (n, D) -> (n, k)
        return torch.addmm(-(self.mean @ self.components), v, self.components)

    def _decompress_rows(self, z):  # (n, k) -> (n, D)
        return _decode_rows(z, self.mean, self.components_t, None)

    def compress(self, V):
        with _no_autocast(V.device):
            z = self._compress_rows(V.reshape(-1, self.dim).float())
        return z.to(V.dtype).reshape(*V.shape[:-1], self.k)

    def decompress(self, Z):
        with _no_autocast(Z.device):
            v = self._decompress_rows(Z.reshape(-1, self.k).float())
        return v.to(Z.dtype).reshape(*Z.shape[:-1], self.dim)

    def roundtrip(self, V):
        return self.decompress(self.compress(V))


def check_values(state_dict, where):
    """ValueError unless the spline's knots are finite and non-decreasing per
    dimension and its slopes and PCA finite: anything else computes NaN.
    Missing or misshapen entries are left to load_state_dict to report."""
    sd = {n: t.detach().float() for n, t in state_dict.items()
          if torch.is_tensor(t) and t.is_floating_point()} if isinstance(state_dict, dict) else {}

    def dims(bad):  # (D, ...) bool -> the dimensions with any True
        return bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist()

    problems = []
    knots = sd.get("spline.knot_x")
    if knots is not None and knots.dim() == 2:
        if not torch.isfinite(knots).all():
            problems.append(f"spline knots are not finite in dimension(s) {dims(~torch.isfinite(knots))}")
        elif (knots[:, 1:] < knots[:, :-1]).any():
            problems.append(f"spline knots decrease in dimension(s) {dims(knots[:, 1:] < knots[:, :-1])}")
    raw = sd.get("spline.raw_slope")
    if raw is not None and raw.dim() == 2 and not torch.isfinite(raw.exp()).all():  # the slopes are exp(raw) in fp32
        problems.append(f"spline slopes are not finite in dimension(s) {dims(~torch.isfinite(raw.exp()))}")
    for name in ("pca.mean", "pca.components"):
        if name in sd and not torch.isfinite(sd[name]).all():
            problems.append(f"{name} is not finite")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems)
                         + " (knots must be finite and non-decreasing, slopes and PCA finite)")


def _mse(a, b):
    return float(((a - b) ** 2).mean())


class SplinePCA(nn.Module):
    """Spline -> PCA_k, decoded by back-projection and the spline's inverse."""

    def __init__(self, dim, k, knots=KNOTS):
        super().__init__()
        _check_dim_k(dim, k)
        if not isinstance(knots, int) or knots < 1:
            raise ValueError(f"knots must be an int >= 1, got {knots!r}")
        self.dim, self.k, self.n_knots = dim, k, knots
        self.spline = MonotoneSpline(dim, knots)
        self.pca = PCA(dim, k)
        self.compiled = False  # compress / decompress through the compiled kernels

    def set_compiled(self, compiled=True):
        """Run compress / decompress as compiled kernels (torch.compile: the
        first call compiles, seconds on CPU; later ones are fused loops)."""
        self.compiled = compiled
        return self

    # ---- fit ---------------------------------------------------------------

    def fit(self, X, epochs=FIT_EPOCHS, lr=FIT_LR, batch_size=None, seed=0, val_fraction=0.1):
        """Fit to samples X (N, dim), any float dtype. Returns fit statistics.

        Holds out val_fraction of the rows, places knots at quantiles of the
        rest, then minimises the reconstruction MSE in V space with Adam
        (gradients through spline, projection and inverse spline), refitting
        the PCA on the warped data as it goes. The learned spline is kept only
        if it beats PCA on the held-out rows; then the PCA step is refitted on
        all rows.
        """
        t0 = time.perf_counter()
        X = _as_rows(X, self.dim, "SplinePCA.fit").to(self.pca.mean.device)
        N = X.shape[0]
        if N < self.k + 1:
            raise ValueError(f"SplinePCA.fit: need at least k+1={self.k + 1} samples, got {N}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(N, generator=gen).to(X.device)
        n_val = int(N * val_fraction)
        if n_val < 1 or N - n_val < self.k + 1:
            n_val = 0  # too few rows to hold any out: judge on the training rows
        train, val = X[perm[n_val:]], X[perm[:n_val]] if n_val else X[perm[n_val:]]
        n_train = train.shape[0]
        if batch_size is None:  # enough Adam steps per epoch even for small N
            batch_size = max(64, min(1024, n_train // 256))

        baseline = PCA(self.dim, self.k).to(X.device)
        baseline._fit_rows(train)
        pca_train, pca_val = _mse(baseline.roundtrip(train), train), _mse(baseline.roundtrip(val), val)

        self.spline.place_knots(train)
        if self.k == self.dim:  # PCA alone is already exact: nothing to learn
            self.pca._fit_rows(X)
            return {"pca_train_mse": pca_train, "pca_val_mse": pca_val,
                    "spline_train_mse": pca_train, "spline_val_mse": pca_val,
                    "kept_spline": False, "train_rows": n_train, "val_rows": n_val,
                    "batch_size": batch_size, "epochs": 0, "seconds": time.perf_counter() - t0}
        self.spline.requires_grad_(True)
        opt = torch.optim.Adam(self.spline.parameters(), lr=lr)
        # intermediate PCA refits on a fixed subset keep them cheap
        refit_rows = train[torch.randperm(n_train, generator=gen)[:16384].to(X.device)]
        steps_per_epoch = math.ceil(n_train / batch_size)
        refit_every = max(1, steps_per_epoch // 4)
        mean, comps = baseline.mean, baseline.components
        for _ in range(epochs):
            order = torch.randperm(n_train, generator=gen).to(X.device)
            for step in range(steps_per_epoch):
                if step % refit_every == 0:
                    with torch.no_grad():
                        self.pca._fit_rows(self.spline.forward_ref(refit_rows))
                    mean, comps = self.pca.mean, self.pca.components
                xb = train[order[step * batch_size:(step + 1) * batch_size]]
                z = self.spline.forward_ref(xb)
                z_hat = (z - mean) @ comps @ comps.T + mean
                loss = F.mse_loss(self.spline.inverse_ref(z_hat), xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.spline.requires_grad_(False)

        with torch.no_grad():
            self.spline.refresh()  # the fast path is what gets judged and used
            self.pca._fit_rows(self.spline(train))
            spline_train, spline_val = _mse(self.roundtrip(train), train), _mse(self.roundtrip(val), val)
            kept = spline_val < pca_val * (1 - MIN_RELATIVE_GAIN)
            if not kept:
                self.spline.reset_identity()
            self.pca._fit_rows(self.spline(X))
        return {
            "pca_train_mse": pca_train, "pca_val_mse": pca_val,
            "spline_train_mse": spline_train, "spline_val_mse": spline_val,
            "kept_spline": kept, "train_rows": n_train, "val_rows": n_val,
            "batch_size": batch_size, "epochs": epochs, "seconds": time.perf_counter() - t0,
        }

    # ---- inference ---------------------------------------------------------

    def _chunks(self, rows, fn, width):
        """fn over rows (n, *) -> (n, width), piece by piece on CPU."""
        if rows.device.type != "cpu" or rows.shape[0] <= _CPU_CHUNK_ROWS or torch.compiler.is_compiling():
            return fn(rows)
        parts = rows.split(_CPU_CHUNK_ROWS)
        if torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in self.parameters())):
            return torch.cat([fn(part) for part in parts])
        out = rows.new_empty(rows.shape[0], width)
        for dst, part in zip(out.split(_CPU_CHUNK_ROWS), parts):
            dst.copy_(fn(part))  # the piece is still in cache: cheaper than one cat at the end
        return out

    def compress(self, V):
        """V (..., dim) -> latent (..., k), in V's dtype."""
        if self.compiled or torch.compiler.is_compiling():  # is_compiling: traced into the caller's graph
            args = (V.reshape(-1, self.dim).float(), self.pca.mean, self.pca.components, self.spline.segments())
            with _no_autocast(V.device):
                z = _encode_rows(*args) if torch.compiler.is_compiling() else _compiled(_encode_rows, *args)
            return z.to(V.dtype).reshape(*V.shape[:-1], self.k)
        with _no_autocast(V.device):
            z = self._chunks(V.reshape(-1, self.dim).float(),
                             lambda v: self.pca._compress_rows(self.spline._rows(v, inverse=False)), self.k)
        return z.to(V.dtype).reshape(*V.shape[:-1], self.k)

    def decompress(self, Z):
        """latent (..., k) -> V_hat (..., dim), in Z's dtype."""
        if self.compiled or torch.compiler.is_compiling():  # is_compiling: traced into the caller's graph
            args = (Z.reshape(-1, self.k).float(), self.pca.mean, self.pca.components_t,
                    self.spline.segments(inverse=True))
            with _no_autocast(Z.device):
                v = _decode_rows(*args) if torch.compiler.is_compiling() else _compiled(_decode_rows, *args)
            return v.to(Z.dtype).reshape(*Z.shape[:-1], self.dim)
        with _no_autocast(Z.device):
            v = self._chunks(Z.reshape(-1, self.k).float(),
                             lambda z: self.spline._rows(self.pca._decompress_rows(z), inverse=True), self.dim)
        return v.to(Z.dtype).reshape(*Z.shape[:-1], self.dim)

    def attend(self, W, Z):
        """Attention weights over stored latents: W (..., T, n) @ decompress(Z)
        for Z (..., n, k) -> (..., T, dim) in fp32. With the identity spline
        (plain PCA) decoding is linear, so the weights go through the latent
        first, (W @ Z) @ P^T + mean * sum(W): k values per token instead of
        dim, and no token decoded. With a spline each value is decoded
        (compiled, in one loop with the weighted sum: _decode_rows)."""
        W = W.float()
        if self.spline.is_identity:
            with _no_autocast(Z.device):
                return (W @ Z.float()) @ self.pca.components.T + W.sum(-1, keepdim=True) * self.pca.mean
        return W @ self.decompress(Z).float()

    def roundtrip(self, V):
        """decompress(compress(V)) in one pass, V's shape and dtype."""
        def rows_roundtrip(v):
            z = self.pca._compress_rows(self.spline._rows(v, inverse=False))
            return self.spline._rows(self.pca._decompress_rows(z), inverse=True)

        with _no_autocast(V.device):
            out = self._chunks(V.reshape(-1, self.dim).float(), rows_roundtrip, self.dim)
        return out.to(V.dtype).reshape(V.shape)
