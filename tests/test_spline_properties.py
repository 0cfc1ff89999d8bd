"""Property-based checks of lib/kvsplice.py's MonotoneSpline: the fast lookup
path and the compiled path's select chain are the fitted spline (forward_ref /
inverse_ref), its inverse undoes it, and it is monotone, for every spline the
fitter can produce and for any increasing knots a geometry file may hold."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.kvsplice import _KNOT_GRID, MonotoneSpline, _chain

DIMS = 3
# few examples, the same ones every run: the suite stays fast and reproducible
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None)
# raw slope -25 is a near-flat segment (slope min_slope + 1e-11); 0.5 gives
# slopes up to ~1.66: slope ratios up to 166, past the min-slope bound 1/0.01
RAW_SLOPES = st.floats(-25.0, 0.5, allow_subnormal=False)
# where the knots start, in data sigmas (values near fp32's smallest normal
# would only test flush-to-zero, which the suite turns on)
OFFSETS = st.integers(-3000, 3000).map(lambda i: i / 1000)


@st.composite
def fitter_splines(draw):
    """Knots as place_knots leaves them: on a grid of _KNOT_GRID cells between
    the outer knots, repeats allowed (tied quantiles); any slopes."""
    knots = draw(st.integers(1, 9))
    sp = MonotoneSpline(DIMS, knots)
    lo = draw(OFFSETS)
    span = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    with torch.no_grad():
        for d in range(DIMS):
            inner = draw(st.lists(st.integers(0, _KNOT_GRID), min_size=max(0, knots - 2), max_size=max(0, knots - 2)))
            cells = [0] + sorted(inner) + [_KNOT_GRID] if knots > 1 else [0]
            sp.knot_x[d] = torch.tensor([lo + c * span / _KNOT_GRID for c in cells])
        sp.raw_slope.copy_(torch.tensor(draw(st.lists(RAW_SLOPES, min_size=DIMS * (knots + 1),
                                                      max_size=DIMS * (knots + 1)))).view(DIMS, knots + 1))
    sp.refresh()
    return sp


@st.composite
def loaded_splines(draw):
    """Any increasing knots, including gaps a millionth of the span apart."""
    knots = draw(st.integers(2, 7))
    sp = MonotoneSpline(DIMS, knots)
    gaps = st.lists(st.sampled_from([1e-6, 1e-3, 0.05, 0.3, 1.0]), min_size=knots - 1, max_size=knots - 1)
    with torch.no_grad():
        for d in range(DIMS):
            steps = torch.tensor([0.0] + draw(gaps), dtype=torch.float64)
            sp.knot_x[d] = (draw(OFFSETS) + steps.cumsum(0)).float()
        sp.raw_slope.copy_(torch.tensor(draw(st.lists(RAW_SLOPES, min_size=DIMS * (knots + 1),
                                                      max_size=DIMS * (knots + 1)))).view(DIMS, knots + 1))
    sp.refresh()
    return sp


def probe_points(sp, seed):
    """Inputs across the knots, on them, and up to 1e4 spans outside."""
    X = sp.knot_x.double()
    lo, span = X[:, 0], (X[:, -1] - X[:, 0]).clamp(min=1e-3)
    g = torch.Generator().manual_seed(seed)
    u = torch.cat([torch.rand(4000, DIMS, generator=g) * 1.2 - 0.1,
                   torch.randn(200, DIMS, generator=g) * 1e4,
                   torch.rand(200, DIMS, generator=g).sign() * 1e4])
    return torch.cat([(lo + u * span).float(), X.T.float()])


def scales(sp):
    """Per dimension: the span of the knots plus their magnitude (fp32 cannot
    place a value near a knot more finely than that allows), in and out."""
    X, Y, _ = (t.detach().double() for t in sp._points())
    return ((X[:, -1] - X[:, 0]) + X.abs().max(1).values, (Y[:, -1] - Y[:, 0]) + Y.abs().max(1).values)


def check_spline(sp, seed):
    x = probe_points(sp, seed).double()
    scale_x, scale_y = scales(sp)
    with torch.no_grad():
        y, y_ref = sp(x.float()).double(), sp.forward_ref(x.float()).double()
        back, back_ref = sp.inverse(y_ref.float()).double(), sp.inverse_ref(y_ref.float()).double()
        roundtrip = sp.inverse(y.float()).double()
        min_slope = sp.slopes().min(1).values.double()
    # 1e-5 of the span, or of the value itself far outside (fp32 resolution there)
    assert ((y - y_ref).abs() <= 1e-5 * (scale_y + y_ref.abs())).all()
    assert ((back - back_ref).abs() <= 1e-5 * (scale_x + back_ref.abs())).all()
    if not sp.is_identity:  # the compiled path's formula, run eagerly
        with torch.no_grad():
            y_chain = _chain(x.float(), *sp.segments()).double()
            back_chain = _chain(y_ref.float(), *sp.segments(inverse=True)).double()
        assert ((y_chain - y_ref).abs() <= 1e-5 * (scale_y + y_ref.abs())).all()
        assert ((back_chain - back_ref).abs() <= 1e-5 * (scale_x + back_ref.abs())).all()
    # the inverse undoes the forward map up to the forward's own rounding,
    # which the inverse's slope 1/s magnifies (at most 1/min_slope)
    assert ((roundtrip - x).abs() <= 1e-5 * (scale_x + x.abs()) + 1e-6 * (scale_y + y.abs()) / min_slope).all()
    # monotone: no step back beyond the precision above (where two segments
    # meet, even the fp32 reference steps back by rounding times 1/s)
    grid = torch.sort(x, dim=0).values.float()
    for f, scale in ((sp.forward, scale_y), (sp.inverse, scale_x)):
        with torch.no_grad():
            out = f(grid).double()
        assert torch.isfinite(out).all()
        assert (out[1:] - out[:-1] >= -1e-5 * (scale + out[1:].abs())).all()


@PROPERTY
@given(fitter_splines(), st.integers(0, 2**16))
def test_fast_path_is_the_fitted_spline(sp, seed):
    check_spline(sp, seed)


@PROPERTY
@given(loaded_splines(), st.integers(0, 2**16))
def test_fast_path_is_the_loaded_spline_for_any_increasing_knots(sp, seed):
    check_spline(sp, seed)


def test_a_near_flat_segment_keeps_its_knot():
    """Knots where place_knots puts them for unit-variance data, steep slopes
    and one nearly flat segment: its y-gap is under 1/1024 of the output
    span. Dropping that knot from the tables moves the fast forward by 0.86
    (the inverse by 0.63 data sigma)."""
    sp = MonotoneSpline(1, 9)
    sp.place_knots(torch.randn(4000, 1, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        sp.raw_slope.fill_(1.0)  # slope ~2.7
        sp.raw_slope[0, 4] = -20.0  # slope ~min_slope
    sp.refresh()
    x = torch.linspace(-4, 4, 8001).view(-1, 1)
    with torch.no_grad():
        y_ref = sp.forward_ref(x)
        span = float(y_ref.max() - y_ref.min())
        assert float((sp(x) - y_ref).abs().max()) <= 1e-5 * span
        assert float((sp.inverse(y_ref) - x).abs().max()) <= 1e-4
