"""lib/codecs/rotated.py (a fixed rotation before a codec without a fit step) and
lib/codecs/turbo.py (a rotation, an fp16 scale per vector, b bits per coordinate). The
registry's checks (tests/test_vcache.py) run them too: causality, decode == attend,
real bytes, gradients, bad settings."""

import pytest
import torch

from lib.codecs.rotated import hadamard, rotation_matrix
from lib.vcache import build_method


def codec(head_dim=64, **settings):
    return build_method({"select": {"kind": "full"}, "codec": {"kind": "rotated", **settings}}, 32, head_dim).codec


@pytest.mark.parametrize("kind, n", [("hadamard", 16), ("hadamard", 64), ("hadamard", 128),
                                     ("orthogonal", 48), ("orthogonal", 64)])
def test_the_rotation_is_orthogonal_and_seeded(kind, n):
    R = rotation_matrix(kind, n, seed=3)
    assert R.shape == (n, n) and R.dtype == torch.float32
    assert torch.allclose(R @ R.T, torch.eye(n), atol=1e-5)
    assert torch.equal(R, rotation_matrix(kind, n, seed=3)) and not torch.equal(R, rotation_matrix(kind, n, seed=4))
    if kind == "hadamard":  # every entry +-1/sqrt(n): each channel spread over all of them
        assert torch.allclose(R.abs(), torch.full((n, n), n ** -0.5))
        assert torch.allclose(hadamard(n).abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64), rtol=1e-15)


@pytest.mark.parametrize("rotation", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_inverse_rotation_once_after_the_weighted_sum_equals_decoding_every_token(rotation, bits):
    c = codec(rotation=rotation, inner={"kind": "int", "bits": bits})
    g = torch.Generator().manual_seed(bits)
    v = torch.randn(2, 3, 40, 64, generator=g)  # (B, nkv, n held, hs)
    stored = c.write(v)
    weights = torch.softmax(torch.randn(2, 3, 6, 40, generator=g), -1)  # (B, nkv, g x T, n)
    assert torch.allclose(c.read(weights, stored), weights @ c.decode(stored), atol=1e-5, rtol=0)


def test_a_rotation_spreads_outlier_channels_so_int2_errs_less():
    """V with a few channels far larger than the rest (what V's outlier channels
    look like): per-group int2 spends its 4 levels on the outliers; rotated, every
    channel carries a share of them and the error falls."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4096, 64, generator=g)
    v[:, [3, 17, 40]] *= 20
    plain = build_method({"select": {"kind": "full"}, "codec": {"kind": "int", "bits": 2}}, 32, 64).codec
    rotated = codec(inner={"kind": "int", "bits": 2})

    def mse(c):
        return ((c.decode(c.write(v)) - v) ** 2).mean().item()

    assert mse(rotated) < 0.5 * mse(plain)
    assert plain.stored_bytes(torch.float32) == rotated.stored_bytes(torch.float32) == 24  # the same bytes


def test_the_rotation_is_saved_with_the_method():
    a, b = codec(seed=5), codec(seed=6)
    assert not torch.equal(a.rotation_matrix, b.rotation_matrix)
    b.load_state_dict(a.state_dict())
    v = torch.randn(3, 64)
    assert torch.equal(a.write(v), b.write(v))


@pytest.mark.parametrize("settings, message", [
    ({"rotation": "spin"}, "rotation must be one of hadamard, orthogonal, got 'spin'"),
    ({"inner": {"kind": "splinepca"}}, "inner: splinepca needs a fit; a rotation goes before a codec without one"),
    ({"inner": {"kind": "rotated"}}, "inner: expected a codec record"),
    ({"inner": {"kind": "int", "bits": 5}}, "inner: int: bits must be one of 2, 3, 4, 8, got 5"),
    ({"seed": "x"}, "seed must be an int >= 0, got 'x'"),
])
def test_bad_settings_name_the_problem(settings, message):
    with pytest.raises(ValueError, match=f"v_cache codec 'rotated': {message}".replace("(", r"\(").replace(")", r"\)")):
        codec(**settings)


def test_hadamard_needs_a_power_of_two_head_dim_and_orthogonal_does_not():
    with pytest.raises(ValueError, match="rotation 'hadamard' needs a power-of-two head_dim, got 48"):
        codec(head_dim=48, inner={"kind": "int", "bits": 4, "group_size": 16})
    assert codec(head_dim=48, rotation="orthogonal", inner={"kind": "int", "bits": 4, "group_size": 16}).fitted


# ---- turbo: a rotation, an fp16 RMS per vector, b bits per coordinate on a fitted clip ----------

def fitted_turbo(bits, samples, **settings):
    c = build_method({"select": {"kind": "full"}, "codec": {"kind": "turbo", "bits": bits, **settings}}, 32,
                     samples.size(-1)).codec
    stats = c.fit(samples)
    return c, stats


def outlier_v(n, seed=0):
    v = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
    v[:, [3, 17, 40]] *= 20
    return v


@pytest.mark.parametrize("bits, nbytes", [(2, 18), (3, 26), (4, 34), (8, 66)])
def test_turbo_holds_b_bits_a_coordinate_and_one_fp16_scale(bits, nbytes):
    c, _ = fitted_turbo(bits, outlier_v(1000))
    stored = c.write(torch.randn(2, 3, 5, 64))
    assert stored.dtype == torch.uint8 and stored.shape == (2, 3, 5, nbytes) == (2, 3, 5, c.stored_bytes(torch.float32))


def test_turbo_fits_the_clip_that_errs_least_and_beats_int2_at_fewer_bytes():
    v = outlier_v(6000)
    c, stats = fitted_turbo(2, v[:3000])
    assert stats["clip"] == c.clip.item() and 0.5 < stats["clip"] < 5

    def rel_mse(codec, x):
        return (((codec.decode(codec.write(x)) - x) ** 2).mean() / (x ** 2).mean()).item()

    held_out = v[3000:]
    for worse in (stats["clip"] * 0.7, stats["clip"] * 1.4):  # a clip away from the fitted one errs more
        other, _ = fitted_turbo(2, v[:3000])
        other.clip.fill_(worse)
        assert rel_mse(other, held_out) > rel_mse(c, held_out)
    int2 = build_method({"select": {"kind": "full"}, "codec": {"kind": "int", "bits": 2}}, 32, 64).codec
    assert c.stored_bytes(torch.float32) == 18 < int2.stored_bytes(torch.float32) == 24
    assert rel_mse(c, held_out) < 0.5 * rel_mse(int2, held_out)


def test_turbo_reads_through_the_inverse_rotation_once():
    c, _ = fitted_turbo(3, outlier_v(1000))
    g = torch.Generator().manual_seed(1)
    stored = c.write(torch.randn(2, 3, 40, 64, generator=g))
    weights = torch.softmax(torch.randn(2, 3, 6, 40, generator=g), -1)
    assert torch.allclose(c.read(weights, stored), weights @ c.decode(stored), atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings, head_dim, message", [
    ({"bits": 5}, 64, "bits must be one of 2, 3, 4, 8, got 5"),
    ({"bits": 3}, 36, "head_dim 36 is not a multiple of 8"),
    ({}, 48, "rotation 'hadamard' needs a power-of-two head_dim, got 48"),
])
def test_turbo_bad_settings_name_the_problem(settings, head_dim, message):
    with pytest.raises(ValueError, match=f"v_cache codec 'turbo': {message}"):
        build_method({"select": {"kind": "full"}, "codec": {"kind": "turbo", **settings}}, 32, head_dim)
