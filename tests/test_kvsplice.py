"""lib/kvsplice.py: the spline, PCA, SplinePCA fit / compress / state_dict."""

import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from gpt2.bench.synthetic import synthetic_v, warped_v
from lib.codecs.geometry import SplinePCACodec
from lib.kvsplice import _KNOT_GRID, MIN_RELATIVE_GAIN, PCA, MonotoneSpline, SplinePCA, check_values
from gpt2.bench.kvsplice_validate import validate_tensor


def bent_spline(dim=8, knots=7, seed=0, spread=1.0, off_grid=False):
    """A spline with knots on N(0, 1) data and random slopes (ratios up to ~e^4).

    off_grid moves the knots off place_knots' grid, so the forward map needs
    the general lookup table (a knot inside a cell) instead of plain lines."""
    g = torch.Generator().manual_seed(seed)
    sp = MonotoneSpline(dim, knots)
    sp.place_knots(torch.randn(2000, dim, generator=g))
    with torch.no_grad():
        if off_grid:
            spaced = torch.linspace(-2, 2, knots) * (1 + 0.3 * torch.rand(dim, 1, generator=g))
            sp.knot_x.copy_(spaced + 0.2 * torch.rand(dim, knots, generator=g))
        sp.raw_slope.copy_(torch.randn(dim, knots + 1, generator=g) * spread)
    sp.refresh()
    assert sp.fwd_is_lines == (not off_grid or knots <= 2)
    return sp


@pytest.fixture(scope="module")
def fitted():
    X = warped_v(3000, 16, seed=1)
    m = SplinePCA(16, 4)
    stats = m.fit(X, seed=0)
    assert stats["kept_spline"]
    return m, X


def test_spline_starts_as_identity():
    sp = MonotoneSpline(5, 7)
    x = torch.randn(10, 3, 5) * 100
    assert torch.equal(sp(x), x) and torch.equal(sp.inverse(x), x)
    assert torch.allclose(sp.forward_ref(x.reshape(-1, 5)), x.reshape(-1, 5))


@pytest.mark.parametrize("knots", [1, 2, 7])
def test_knots_sit_at_the_data_quantiles(knots):
    """The outer knots are order statistics at normal scores +-2.5 (0.6% and
    99.4%), a single knot the median; inner knots lie within half a grid
    cell of theirs. Each dimension has its own scale and shift."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5001, 6, generator=g) ** 3 * torch.arange(1, 7) + torch.arange(6) * 10
    sp = MonotoneSpline(6, knots)
    sp.place_knots(x)
    zs = torch.linspace(-2.5, 2.5, knots, dtype=torch.float64) if knots > 1 else torch.zeros(1, dtype=torch.float64)
    ranks = [round(0.5 * (1 + math.erf(z / math.sqrt(2))) * 5000) + 1 for z in zs.tolist()]
    want = torch.stack([x.kthvalue(r, dim=0).values for r in ranks], dim=1)  # (6, knots)
    assert torch.equal(sp.knot_x[:, [0, -1]], want[:, [0, -1]])
    cell = (want[:, -1:] - want[:, :1]) / _KNOT_GRID
    assert ((sp.knot_x - want).abs() <= cell / 2 + 1e-5 * want.abs().clamp(min=1)).all()
    assert (sp.knot_x[:, 1:] >= sp.knot_x[:, :-1]).all()


@pytest.mark.parametrize("knots,off_grid", [(1, False), (2, False), (7, False), (7, True)])
def test_monotone_far_beyond_the_knots(knots, off_grid):
    sp = bent_spline(knots=knots, off_grid=off_grid)
    grid = torch.linspace(-100, 100, 200_001).unsqueeze(1).expand(-1, 8)  # +-100 sigma, step 1e-3
    for f in (sp.forward, sp.inverse):
        y = f(grid)
        assert torch.isfinite(y).all()
        assert (y[1:] - y[:-1] > 0).all()


@pytest.mark.parametrize("off_grid", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inverse_is_exact_inside_and_far_outside_the_knots(off_grid, seed):
    sp = bent_spline(off_grid=off_grid, seed=seed)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(20_000, 8, generator=g),                # across the knots
                   torch.randn(2_000, 8, generator=g) * 100,           # far outside
                   torch.randn(2_000, 8, generator=g).sign() * 1e4])   # very far outside
    y = sp(x)
    back = sp.inverse(y)
    assert ((back - x).abs() <= 1e-5 * (x.abs() + 1)).all()  # relative, 1 = data sigma
    # the fast lookup path is the same function as the fit's reference path
    assert ((y - sp.forward_ref(x)).abs() <= 1e-5 * (y.abs() + 1)).all()
    assert ((sp.inverse_ref(y) - back).abs() <= 1e-5 * (x.abs() + 1)).all()


def test_exact_reconstruction_at_full_rank():
    X = warped_v(2000, 16, seed=2)
    m = SplinePCA(16, 16)
    m.fit(X)
    assert (m.roundtrip(X) - X).abs().max() <= 1e-4 * X.abs().max()
    # also through a strongly bent spline: the inverse really undoes it
    m.spline = bent_spline(16)
    m.pca._fit_rows(m.spline(X))
    assert (m.roundtrip(X) - X).abs().max() <= 1e-4 * X.abs().max()


def random_source(seed, n=3000, dim=16):
    g = torch.Generator().manual_seed(seed)
    if seed == 0:
        return synthetic_v(n, dim, seed)  # Gaussian: PCA is already optimal
    if seed == 1:  # heavy tails
        t = torch.distributions.StudentT(3.0).sample((n, dim))
        return t @ torch.randn(dim, dim, generator=g)
    if seed == 2:
        return warped_v(n, dim, seed)
    return torch.randn(n, dim, generator=g) * torch.logspace(0, -2, dim)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_never_worse_than_pca_on_held_out_data(seed):
    data = random_source(seed)
    X, unseen = data[:2500], data[2500:]
    m = SplinePCA(16, 4)
    stats = m.fit(X, seed=seed)
    pca = PCA(16, 4).fit(X)
    if stats["kept_spline"]:  # the guarantee: kept only when it beats PCA on the held-out split
        assert stats["spline_val_mse"] < stats["pca_val_mse"] * (1 - MIN_RELATIVE_GAIN)
    else:  # the identity spline: exactly PCA fitted on the same rows
        assert torch.equal(m.compress(X), pca.compress(X))
        assert torch.equal(m.roundtrip(X), pca.roundtrip(X))
    # and on rows neither model saw: within noise of the held-out decision
    err = lambda mod: float(((mod.roundtrip(unseen) - unseen) ** 2).mean())  # noqa: E731
    assert err(m) <= err(pca) * 1.02


def test_beats_pca_by_20_percent_on_warped_data_at_k16():
    (row,) = validate_tensor(warped_v(8000, 64, seed=0), [16])
    assert row["kept"]
    assert row["ratio"] <= 0.8, row


def test_fit_statistics(fitted):
    m, X = fitted
    stats = SplinePCA(16, 4).fit(X, epochs=2, seed=3)
    for key in ("pca_train_mse", "pca_val_mse", "spline_train_mse", "spline_val_mse", "seconds"):
        assert isinstance(stats[key], float) and stats[key] >= 0
    assert stats["epochs"] == 2 and stats["val_rows"] == 300 and stats["train_rows"] == 2700


def test_fit_accepts_low_precision_samples_and_works_in_fp32():
    X = warped_v(1500, 8, seed=4)
    a, b = SplinePCA(8, 3), SplinePCA(8, 3)
    a.fit(X.bfloat16(), epochs=2)
    b.fit(X.bfloat16().float(), epochs=2)
    assert a.pca.components.dtype == torch.float32
    assert torch.equal(a.roundtrip(X), b.roundtrip(X))


def test_state_dict_round_trip(fitted, tmp_path):
    """The state_dict is the whole fit: saved and loaded into a fresh SplinePCA
    (load_state_dict rebuilds the lookup tables), it computes the same."""
    m, X = fitted
    torch.save(m.state_dict(), tmp_path / "geo.pt")
    fresh = SplinePCA(16, 4)
    fresh.load_state_dict(torch.load(tmp_path / "geo.pt", weights_only=True))
    assert torch.equal(fresh.compress(X), m.compress(X))
    assert torch.equal(fresh.roundtrip(X), m.roundtrip(X))


def test_the_compiled_decodes_component_rows_follow_fit_and_load(fitted):
    """PCA.components_t (components.T, contiguous, read by the compiled
    decode) is derived: not saved, and rebuilt whenever the components change."""
    m, X = fitted
    assert "pca.components_t" not in m.state_dict()
    fresh = SplinePCA(16, 4)
    assert torch.equal(fresh.pca.components_t, fresh.pca.components.T)  # the identity's, before any fit
    fresh.load_state_dict(m.state_dict())
    refit = PCA(16, 4).fit(X[:500] ** 3)
    for pca in (m.pca, fresh.pca, refit):
        assert pca.components_t.shape == (4, 16) and pca.components_t.is_contiguous()
        assert torch.equal(pca.components_t, pca.components.T)
    assert not torch.equal(refit.components_t, m.pca.components_t)


def test_bad_fit_input_raises():
    X = torch.randn(100, 8)
    X[3, 1], X[7, 0], X[7, 5], X[9, 2] = float("nan"), float("inf"), float("nan"), -float("inf")
    with pytest.raises(ValueError, match="3 of 100 rows contain NaN or inf"):
        SplinePCA(8, 2).fit(X)
    with pytest.raises(ValueError, match="rows contain NaN or inf"):
        PCA(8, 2).fit(X)
    with pytest.raises(ValueError, match="at least k\\+1=5 samples, got 4"):
        SplinePCA(8, 4).fit(torch.randn(4, 8))
    with pytest.raises(ValueError, match="at least k\\+1"):
        PCA(8, 4).fit(torch.randn(4, 8))
    with pytest.raises(ValueError, match="expected shape"):
        SplinePCA(8, 2).fit(torch.randn(100, 9))


@pytest.mark.parametrize("make", [lambda: SplinePCA(8, 0), lambda: SplinePCA(8, 9), lambda: PCA(8, 0),
                                  lambda: PCA(8, 9), lambda: SplinePCA(8, 2, knots=0),
                                  lambda: MonotoneSpline(8, knots=0)])
def test_bad_sizes_raise(make):
    with pytest.raises(ValueError):
        make()


def test_a_state_dict_of_other_sizes_is_refused(fitted):
    m, _ = fitted
    with pytest.raises(RuntimeError, match="size mismatch"):
        SplinePCA(16, 5).load_state_dict(m.state_dict())


def _with(state_dict, name, edit):
    """A copy of state_dict whose entry `name` went through edit."""
    sd = {n: t.clone() for n, t in state_dict.items()}
    edit(sd[name])
    return sd


@pytest.mark.parametrize("name, edit, message", [
    ("spline.knot_x", lambda t: t[2, 3].fill_(float("nan")), r"spline knots are not finite in dimension\(s\) \[2\]"),
    ("spline.knot_x", lambda t: t[5].copy_(t[5].flip(0)), r"spline knots decrease in dimension\(s\) \[5\]"),
    ("spline.knot_x", lambda t: t[1, 0].fill_(float("-inf")), r"not finite in dimension\(s\) \[1\]"),
    ("spline.raw_slope", lambda t: t[0, 1].fill_(float("nan")), r"slopes are not finite in dimension\(s\) \[0\]"),
    ("spline.raw_slope", lambda t: t[4, 0].fill_(100.0), r"spline slopes are not finite in dimension\(s\) \[4\]"),
    ("pca.components", lambda t: t[0, 0].fill_(float("inf")), "pca.components is not finite"),
])
def test_values_that_would_compute_nan_are_rejected(fitted, name, edit, message):
    """check_values names the problem; a geometry codec refuses such a state before it loads."""
    m, X = fitted
    with pytest.raises(ValueError, match=r"geometry state: .*" + message):
        check_values(_with(m.state_dict(), name, edit), "geometry state")
    codec = SplinePCACodec(16, k=4)
    state = {"geometry." + n: t for n, t in _with(m.state_dict(), name, edit).items()}
    with pytest.raises(ValueError, match=r"splinepca codec state: .*" + message):
        codec.load_state_dict({**state, "fit_done": torch.tensor(True)})
    assert not codec.fitted
    # repeated knots (tied quantiles, a constant dimension) are what fit produces: accepted
    tied = SplinePCA(16, 4)
    tied.load_state_dict(_with(m.state_dict(), "spline.knot_x", lambda t: t[3].fill_(0.5)))
    assert torch.isfinite(tied.roundtrip(X)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype(fitted, dtype):
    m, X = fitted
    V = X[:64].reshape(4, 2, 8, 16).to(dtype)
    z = m.compress(V)
    assert z.dtype == dtype and z.shape == (4, 2, 8, 4)
    out = m.decompress(z)
    assert out.dtype == dtype and out.shape == V.shape
    rt = m.roundtrip(V)
    assert rt.dtype == dtype and rt.shape == V.shape
    ref = m.roundtrip(V.float())
    tol = 0.02 if dtype == torch.float16 else 0.1
    assert ((rt.float() - ref).abs() <= tol * (ref.abs() + 1)).all()


def test_gradients_flow_to_the_input_and_match_the_reference_path(fitted):
    m, X = fitted
    m.requires_grad_(False)
    V = X[:50].clone().transpose(0, 1).contiguous().T.requires_grad_(True)  # non-contiguous, like attention's v
    w = torch.randn(50, 16)
    (m.roundtrip(V) * w).sum().backward()
    V2 = X[:50].clone().requires_grad_(True)
    z = m.spline.forward_ref(V2)
    z_hat = (z - m.pca.mean) @ m.pca.components @ m.pca.components.T + m.pca.mean
    (m.spline.inverse_ref(z_hat) * w).sum().backward()
    assert V.grad is not None and V.grad.abs().sum() > 0
    assert torch.allclose(V.grad, V2.grad, rtol=1e-4, atol=1e-5)


def test_constant_dimension_fits_and_round_trips():
    X = warped_v(1500, 8, seed=5)
    X[:, 3] = 1.5
    m = SplinePCA(8, 3)
    m.fit(X)
    out = m.roundtrip(X)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 3], torch.full((1500,), 1.5), atol=1e-4)
    assert torch.isfinite(m.spline.inverse(torch.linspace(-1e3, 1e3, 101).unsqueeze(1).expand(-1, 8))).all()


def test_nan_at_inference_propagates_instead_of_crashing(fitted):
    m, X = fitted
    V = X[:4].clone()
    V[1, 2] = float("nan")
    out = m.roundtrip(V)
    assert torch.isnan(out[1]).any() and torch.isfinite(out[[0, 2, 3]]).all()


def test_large_inputs_are_processed_in_pieces_identically(fitted):
    m, X = fitted
    big = X.repeat(4, 1)  # 12000 rows > one CPU piece
    assert torch.equal(m.roundtrip(big)[:3000], m.roundtrip(X))
    assert torch.equal(m.decompress(m.compress(big))[-3000:], m.decompress(m.compress(X)))


def test_validate_script_on_a_per_layer_file(tmp_path):
    path = tmp_path / "v.pt"
    torch.save({0: synthetic_v(600, 8, 1), "layer1": warped_v(600, 8, 2)}, path)
    r = subprocess.run([sys.executable, str(ROOT / "scripts/kvsplice_validate.py"), "--source", str(path),
                        "--k", "2", "--epochs", "1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "layer1" in r.stdout and "overall" in r.stdout
    (tmp_path / "bad.pt").write_bytes(b"not a tensor file")
    r = subprocess.run([sys.executable, str(ROOT / "scripts/kvsplice_validate.py"), "--source",
                        str(tmp_path / "bad.pt")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "bad.pt" in r.stderr
