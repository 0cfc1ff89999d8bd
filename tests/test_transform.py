"""lib/codecs/transform.py (a transform coder: optional KVSplice spline, the
fitted PCA basis or a random rotation, a per-vector scale, bits per
coordinate allocated by dynamic programming or spread equally) and the
width packing of lib/quantize.py. The registry's checks (tests/test_vcache.py)
run it too: causality, decode == attend, real bytes, gradients, bad settings."""

import itertools
import math

import pytest
import torch

from lib.codecs.transform import MAX_WIDTH, allocate_bits
from lib.quantize import pack_widths, unpack_widths, width_layout, width_unpack_matrix
from lib.vcache import build_method


def codec(head_dim=32, **settings):
    return build_method({"select": {"kind": "full"}, "codec": {"kind": "transform", **settings}}, 32, head_dim).codec


def skewed_v(n=6000, d=32, seed=0):
    """V-like rows: channel variances falling over two decades, heavy tails, a mean."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, d)
    return (torch.randn(n, d, generator=g) ** 3 * 0.5 + torch.randn(n, d, generator=g)) * scales + 0.3


def test_packing_at_per_coordinate_widths_round_trips_and_fills_whole_bytes():
    g = torch.Generator().manual_seed(0)
    widths = torch.randint(0, MAX_WIDTH + 1, (20,), generator=g)
    codes = torch.stack([torch.randint(0, 2 ** int(w), (5, 3), generator=g) for w in widths], -1).to(torch.uint8)
    source, shift = width_layout(widths)
    packed = pack_widths(codes, source, shift)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, math.ceil(int(widths.sum()) / 8))
    assert torch.equal(unpack_widths(packed, width_unpack_matrix(source, shift, 20)), codes.float())


def test_the_allocation_is_the_least_total_error_for_its_bits():
    """Against every allocation of 4 coordinates, widths 0..3, on random convex-ish errors."""
    g = torch.Generator().manual_seed(1)
    errors = torch.rand(4, 4, generator=g).sort(dim=1, descending=True).values
    for total in (0, 3, 7, 12):
        widths = allocate_bits(errors, total)
        assert int(widths.sum()) == total
        best = min(sum(errors[i, w].item() for i, w in enumerate(ws))
                   for ws in itertools.product(range(4), repeat=4) if sum(ws) == total)
        assert sum(errors[i, int(w)].item() for i, w in enumerate(widths)) == pytest.approx(best)


@pytest.mark.parametrize("bits", [1.75, 2.25, 3])
def test_bytes_are_the_packed_codes_and_one_fp16_scale(bits):
    c = codec(head_dim=64, bits=bits)
    c.fit(skewed_v(d=64), epochs=0)
    assert c.stored_bytes(torch.bfloat16) == math.ceil(bits * 64 / 8) + 2
    assert c.write(torch.randn(3, 64)).shape == (3, math.ceil(bits * 64 / 8) + 2)
    assert int(c.widths.sum()) == bits * 64


def test_variance_allocation_gives_the_high_variance_components_more_bits_and_errs_less():
    v = skewed_v()
    errs = {}
    for allocate in ("variance", "equal"):
        c = codec(bits=2, allocate=allocate)
        stats = c.fit(v, epochs=0)
        errs[allocate] = ((c.decode(c.write(v)) - v) ** 2).mean().item()
        if allocate == "variance":
            assert c.widths[0] > c.widths[-1] and stats["zero_width"] > 0
    assert errs["variance"] < 0.8 * errs["equal"]


@pytest.mark.parametrize("basis", ["pca", "hadamard", "orthogonal"])
def test_the_basis_inverse_once_after_the_weighted_sum_equals_decoding_every_token(basis):
    c = codec(basis=basis, bits=2.5)
    c.fit(skewed_v(), epochs=0)
    g = torch.Generator().manual_seed(2)
    stored = c.write(skewed_v(80, seed=3).view(2, 40, 32))
    weights = torch.softmax(torch.randn(2, 6, 40, generator=g), -1)
    assert torch.allclose(c.read(weights, stored), weights @ c.decode(stored), atol=1e-5, rtol=0)


def test_the_spline_goes_before_the_basis_and_is_undone_after_it():
    v = skewed_v()
    c = codec(bits=3, spline=True, spline_k=8, knots=5)
    stats = c.fit(v, epochs=2, lr=5e-3)
    assert "kept_spline" in stats
    u = c.warp(v)
    assert torch.allclose(c.warp.inverse(u), v, atol=1e-4, rtol=1e-4)  # exactly invertible
    stored = c.write(v[:50])
    assert torch.allclose(c.decode(stored), c.warp.inverse(c._scaled(stored) @ c.axes.T + c.mean))


def test_the_fit_is_saved_with_the_method():
    a, b = codec(bits=2.5), codec(bits=2.5)
    a.fit(skewed_v(), epochs=0)
    b.load_state_dict(a.state_dict())
    v = skewed_v(10, seed=4)
    assert torch.equal(a.write(v), b.write(v)) and torch.equal(a.widths, b.widths)


@pytest.mark.parametrize("settings, message", [
    ({"bits": 2.1}, r"bits must be a number in \(0, 8\] with bits \* head_dim \(32\) a whole number of bits, got 2.1"),
    ({"bits": 9}, "got 9"),
    ({"basis": "dct"}, "basis must be one of pca, hadamard, orthogonal, got 'dct'"),
    ({"allocate": "greedy"}, "allocate must be one of variance, equal, got 'greedy'"),
    ({"spline": 1}, "spline must be true or false, got 1"),
])
def test_bad_settings_name_the_problem(settings, message):
    with pytest.raises(ValueError, match=rf"codec 'transform': .*{message}"):
        codec(**settings)
    with pytest.raises(ValueError, match="rotation 'hadamard' needs a power-of-two head_dim, got 48"):
        codec(head_dim=48, basis="hadamard")


def test_a_spline_fitted_once_serves_codecs_that_differ_after_it():
    v = skewed_v()
    a = codec(bits=3, spline=True, spline_k=8, knots=5)
    a.fit(v, epochs=1)
    b = codec(bits=2, spline=True, spline_k=8, knots=5, allocate="equal")
    stats = b.fit(v, warp=a.warp.state_dict())
    assert "kept_spline" not in stats and b.fitted
    assert all(torch.equal(x, y) for x, y in zip(a.warp.state_dict().values(), b.warp.state_dict().values()))
