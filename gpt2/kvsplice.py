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

Two evaluations of the same spline:
- the *reference* path (`forward_ref` / `inverse_ref`): segment found by
  comparison, differentiable in the spline's parameters; used by `fit`.
- the *fast* path (`forward` / `inverse`): lookup tables built once after
  fit / load (`refresh`). A uniform grid of cells per dimension turns the
  segment search into arithmetic (scale, clamp, truncate) and one gather.
  The knots sit on the forward grid's edges, so a forward cell is one line
  `a*v + b`; the inverse grid is fine enough that a cell holds at most one
  knot, handled by `a*v + b + c*relu(v - t)`. Differentiable in the input
  only (the parameters are frozen when it runs inside attention).
"""

import math
import os
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT_VERSION = 1
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
    """out = a*v + b + c*relu(v - t), with (a, b, t, c) looked up per cell."""

    @staticmethod
    def forward(ctx, v, table, shift, inv_h, offsets, top):
        # v: (n, D) fp32; table: (D*(M+2), 4) contiguous; shift/inv_h: (D,); offsets: (D,) int32
        # (int32 cell indices: half the memory traffic of int64, ~15% faster on CPU)
        v = v.contiguous()
        u = torch.addcmul(shift, v, inv_h).clamp_(0, top)  # cell coordinate, (n, D)
        idx = u.to(torch.int32).add_(offsets)
        idx.clamp_(0, table.shape[0] - 1)  # NaN input lands anywhere valid and stays NaN
        # one 16-byte element per cell: a complex128 gather is ~5x faster on
        # CPU than gathering rows of 4 floats
        cells = table.view(torch.complex128).view(-1).index_select(0, idx.view(-1))
        a, b, t, c = torch.view_as_real(cells).view(torch.float32).view(*v.shape, 4).unbind(-1)  # each (n, D)
        ramp = (v - t).clamp_(min=0)
        out = torch.addcmul(b, v, a).addcmul_(ramp, c)
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


def _build_table(p_in, p_out, s_left, s_right, cells=None):
    """Lookup table for the piecewise-linear map through points (p_in -> p_out).

    p_in, p_out: (D, K) float64, non-decreasing along K; s_left, s_right: (D,)
    slopes beyond the outer points. Returns (table (D*(M+2), 4), shift (D,),
    inv_h (D,), offsets (D,) int32, top, lines) with cells 0 (left of the
    first point), 1..M (uniform between first and last point) and M+1
    (right). `cells` forces M (for points placed on a grid of that many
    cells); `lines` is the (D*(M+2), 2) table of (a, b) alone when no cell
    has a knot strictly inside it, else None.
    """
    D, K = p_in.shape
    dims = []
    for d in range(D):
        xs, ys = p_in[d].tolist(), p_out[d].tolist()
        span_x, span_y = xs[-1] - xs[0], ys[-1] - ys[0]
        tol_x, tol_y = span_x / _MAX_CELLS, span_y / _MAX_CELLS
        # drop points too close to the previous one to give them their own cell;
        # the last point always stays (it anchors the right-hand line)
        px, py = [xs[0]], [ys[0]]
        for x, y in zip(xs[1:], ys[1:]):
            if x - px[-1] > tol_x and y - py[-1] > tol_y:
                px.append(x)
                py.append(y)
        if len(px) > 1 and (xs[-1] - px[-1] <= tol_x or ys[-1] - py[-1] <= tol_y):
            px[-1], py[-1] = xs[-1], ys[-1]
        slopes = [(py[i + 1] - py[i]) / (px[i + 1] - px[i]) for i in range(len(px) - 1)]
        gap = min((px[i + 1] - px[i] for i in range(len(px) - 1)), default=0.0)
        # (1 - 1e-6): gaps of span/n up to fp32 rounding need n cells, not n+1
        needed = min(_MAX_CELLS, math.ceil(span_x / gap * (1 - 1e-6))) if gap > 0 else 1
        dims.append((px, py, [float(s_left[d])] + slopes + [float(s_right[d])], needed))
    M = max([cells or 1] + [c for *_, c in dims])

    table = torch.zeros(D, M + 2, 4, dtype=torch.float64)
    lines = torch.zeros(D, M + 2, 2, dtype=torch.float64)
    on_grid = cells is not None
    shift = torch.zeros(D, dtype=torch.float64)
    inv_h = torch.ones(D, dtype=torch.float64)
    for d, (px, py, s, _) in enumerate(dims):
        px, py, s = (torch.tensor(t, dtype=torch.float64) for t in (px, py, s))
        m = px.numel()
        lo, hi = px[0], px[-1]
        h = (hi - lo) / M if hi > lo else torch.tensor(1.0, dtype=torch.float64)
        inv_h[d], shift[d] = 1.0 / h, 1.0 - lo / h  # u = (v - lo)/h + 1
        # seg: the segment holding each cell's left edge (0 = left line, i = px[i-1]..px[i])
        seg = torch.zeros(M + 2, dtype=torch.long)
        if m > 1:
            edges = lo + torch.arange(M, dtype=torch.float64) * h
            seg[1:M + 1] = torch.searchsorted(px, edges, right=True).clamp(1, m - 1)
            seg[M + 1] = m - 1
        a = s[seg]
        through = (seg - 1).clamp(min=0)  # the line passes through this point
        b = py[through] - a * px[through]
        # the next knot and the slope change there: h <= the smallest gap keeps
        # every other knot out of the cell, so one correction is exact
        t = px[seg.clamp(max=m - 1)]
        c = s[seg + 1] - a
        table[d] = torch.stack([a, b, t, c], dim=1)
        # with every knot on a cell edge (up to fp32 rounding) a cell is one
        # line: the segment under the cell's midpoint
        off_grid = ((px - lo) / h - ((px - lo) / h).round()).abs() * h
        on_grid = on_grid and bool((off_grid <= 1e-6 * (lo.abs() + hi.abs() + h)).all())
        if m > 1:
            mid = torch.searchsorted(px, lo + (torch.arange(M, dtype=torch.float64) + 0.5) * h, right=True)
            mid = mid.clamp(1, m - 1)
            lines[d, 1:M + 1, 0] = s[mid]
            lines[d, 1:M + 1, 1] = py[mid - 1] - s[mid] * px[mid - 1]
        else:  # one point: right of it is the right line
            lines[d, 1:M + 1] = torch.stack([s[-1], py[-1] - s[-1] * px[-1]])
        lines[d, 0] = torch.stack([s[0], py[0] - s[0] * px[0]])
        lines[d, M + 1] = torch.stack([s[-1], py[-1] - s[-1] * px[-1]])
    offsets = torch.arange(D, dtype=torch.int32) * (M + 2)
    lines = lines.reshape(-1, 2).float() if on_grid else None
    return table.reshape(-1, 4).float(), shift.float(), inv_h.float(), offsets, float(M + 1), lines


class MonotoneSpline(nn.Module):
    """Strictly increasing piecewise-linear map per dimension of the last axis.

    Knots sit at data quantiles (`place_knots`, snapped to a grid of
    _KNOT_GRID cells between the outer ones); between and beyond them the
    map is linear with slopes min_slope + exp(raw) > 0, so every finite input
    has a finite output and back. The first knot is a fixed point, which with
    all slopes 1 makes the map the identity (as it starts).
    """

    def __init__(self, dim, knots=7, min_slope=1e-2):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(knots, int) or knots < 1:
            raise ValueError(f"knots must be an int >= 1, got {knots!r}")
        self.dim, self.knots, self.min_slope = dim, knots, min_slope
        self.register_buffer("knot_x", torch.zeros(dim, knots))  # (D, K), sorted per row
        self.raw_slope = nn.Parameter(torch.empty(dim, knots + 1))  # (D, K+1): left, inner, right
        # lookup tables derived from the parameters: moved by .to(), not saved
        for name in ("fwd_table", "fwd_lines", "fwd_shift", "fwd_inv_h", "fwd_offsets",
                     "inv_table", "inv_shift", "inv_inv_h", "inv_offsets"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(MonotoneSpline._after_load)
        self.reset_identity()

    @staticmethod
    def _after_load(module, incompatible_keys):
        module.refresh()

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
        pos = (levels * (x.shape[0] - 1)).round().long().to(x.device)
        q = x.sort(dim=0).values[pos].T.double()  # (D, K)
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
        """Rebuild the lookup tables from the parameters (after fit / load)."""
        X, Y, s = (t.detach().double().cpu() for t in self._points())
        self.is_identity = bool(torch.all((s - 1).abs() < 1e-6))
        dev = self.knot_x.device
        fwd = _build_table(X, Y, s[:, 0], s[:, -1], cells=_KNOT_GRID)
        inv = _build_table(Y, X, 1 / s[:, 0], 1 / s[:, -1])
        self.fwd_lines = None if fwd[5] is None else fwd[5].to(dev)
        self.fwd_table, self.fwd_shift, self.fwd_inv_h, self.fwd_offsets = (t.to(dev) for t in fwd[:4])
        self.inv_table, self.inv_shift, self.inv_inv_h, self.inv_offsets = (t.to(dev) for t in inv[:4])
        self._fwd_top, self._inv_top = fwd[4], inv[4]

    def _rows(self, v, inverse):
        """The fast path on fp32 rows (n, D)."""
        if self.is_identity:
            return v
        if inverse:
            args = (self.inv_table, self.inv_shift, self.inv_inv_h, self.inv_offsets, self._inv_top)
        elif self.fwd_lines is not None:
            return _ApplyLines.apply(v, self.fwd_lines, self.fwd_shift, self.fwd_inv_h, self.fwd_offsets, self._fwd_top)
        else:
            args = (self.fwd_table, self.fwd_shift, self.fwd_inv_h, self.fwd_offsets, self._fwd_top)
        return _ApplyTable.apply(v, *args)

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

    def _compress_rows(self, v):  # (n, D) -> (n, k)
        return torch.addmm(-(self.mean @ self.components), v, self.components)

    def _decompress_rows(self, z):  # (n, k) -> (n, D)
        return torch.addmm(self.mean, z, self.components.T)

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


def _mse(a, b):
    return float(((a - b) ** 2).mean())


class SplinePCA(nn.Module):
    """Spline -> PCA_k, decoded by back-projection and the spline's inverse."""

    def __init__(self, dim, k, knots=7):
        super().__init__()
        _check_dim_k(dim, k)
        if not isinstance(knots, int) or knots < 1:
            raise ValueError(f"knots must be an int >= 1, got {knots!r}")
        self.dim, self.k, self.n_knots = dim, k, knots
        self.spline = MonotoneSpline(dim, knots)
        self.pca = PCA(dim, k)

    # ---- fit ---------------------------------------------------------------

    def fit(self, X, epochs=8, lr=2e-3, batch_size=None, seed=0, val_fraction=0.1):
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
        if rows.device.type != "cpu" or rows.shape[0] <= _CPU_CHUNK_ROWS:
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
        with _no_autocast(V.device):
            z = self._chunks(V.reshape(-1, self.dim).float(),
                             lambda v: self.pca._compress_rows(self.spline._rows(v, inverse=False)), self.k)
        return z.to(V.dtype).reshape(*V.shape[:-1], self.k)

    def decompress(self, Z):
        """latent (..., k) -> V_hat (..., dim), in Z's dtype."""
        with _no_autocast(Z.device):
            v = self._chunks(Z.reshape(-1, self.k).float(),
                             lambda z: self.spline._rows(self.pca._decompress_rows(z), inverse=True), self.dim)
        return v.to(Z.dtype).reshape(*Z.shape[:-1], self.dim)

    def roundtrip(self, V):
        """decompress(compress(V)) in one pass, V's shape and dtype."""
        def rows_roundtrip(v):
            z = self.pca._compress_rows(self.spline._rows(v, inverse=False))
            return self.spline._rows(self.pca._decompress_rows(z), inverse=True)

        with _no_autocast(V.device):
            out = self._chunks(V.reshape(-1, self.dim).float(), rows_roundtrip, self.dim)
        return out.to(V.dtype).reshape(V.shape)

    # ---- persistence -------------------------------------------------------

    def to_dict(self):
        return {"Hd": self.dim, "k": self.k, "knots": self.n_knots,
                "state_dict": {n: t.detach().cpu() for n, t in self.state_dict().items()},
                "format_version": FORMAT_VERSION}

    @classmethod
    def from_dict(cls, d, where="geometry dict"):
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a dict, found {type(d).__name__}")
        missing = [key for key in ("Hd", "k", "knots", "state_dict", "format_version") if key not in d]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
        if d["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{where}: format_version {d['format_version']!r}, expected {FORMAT_VERSION}")
        mod = cls(d["Hd"], d["k"], d["knots"])
        try:
            mod.load_state_dict(d["state_dict"])
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ValueError(f"{where}: state_dict does not fit Hd={d['Hd']}, k={d['k']}, knots={d['knots']}: {e}") from e
        return mod

    def save(self, path):
        """Write to_dict() to path atomically (temp file in the same dir, then rename)."""
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self.to_dict(), f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path, map_location="cpu"):
        path = os.fspath(path)
        try:
            d = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated / not a torch file
            raise ValueError(f"{path}: not a readable SplinePCA file ({type(e).__name__}: {e})") from e
        return cls.from_dict(d, where=path)
