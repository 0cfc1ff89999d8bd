"""The KVSplice geometries (lib/kvsplice.py): V -> spline -> PCA_k latent, and plain PCA."""

import torch

from lib.kvsplice import FIT_EPOCHS, FIT_LR, KNOTS, SplinePCA, check_values
from lib.vcache import VCodec, register_codec

SAMPLES_PER_LATENT_DIM = 2000  # V vectors per latent dim a geometry's fit wants per layer


class GeometryCodec(VCodec):
    """A KVSplice geometry, k latent dims per V vector.

    Fitted from its layer's V (SplinePCA.fit on the calibrator's samples) and
    frozen. Training sees its own differentiable round trip, so the true
    gradient reaches V; the cache reads the latent through SplinePCA.attend.
    """

    spline = True
    defaults = {"k": 16, "knots": KNOTS}
    example = {"k": 4, "knots": 3}
    needs_fit = True
    fit_defaults = {"epochs": FIT_EPOCHS, "lr": FIT_LR}
    straight_through_grad = False
    bench_sweep = {"k": (8, 16, 32)}
    bench_with_selectors = {"k": 16}

    def problems(self):
        problems = []
        if not isinstance(self.k, int) or not 1 <= self.k <= self.head_dim:
            problems.append(f"k must be an int in [1, head_dim = {self.head_dim}], got {self.k!r}")
        if not isinstance(self.knots, int) or self.knots < 1:
            problems.append(f"knots must be an int >= 1, got {self.knots!r}")
        return problems

    def setup(self):
        self.geometry = SplinePCA(self.head_dim, self.k, self.knots).requires_grad_(False)
        self.register_load_state_dict_pre_hook(_check_geometry_values)

    def fit_state(self, samples, seed, epochs, lr):
        """SplinePCA.fit; plain PCA is the same fit with no epoch, which keeps the identity spline."""
        stats = self.geometry.fit(samples, epochs=epochs if self.spline else 0, lr=lr, seed=seed)
        self.geometry.requires_grad_(False)
        return stats

    def fit_rows(self):
        return self.k + 1, SAMPLES_PER_LATENT_DIM * self.k

    def fit_summary(self, s):
        ratio = s["spline_val_mse"] / max(s["pca_val_mse"], 1e-30)
        return (f"held-out MSE PCA {s['pca_val_mse']:.5f} SplinePCA {s['spline_val_mse']:.5f} (ratio {ratio:.3f}"
                f"{'' if s['kept_spline'] else ', identity spline kept'}), {s['seconds']:.1f}s")

    def set_geometry(self, splinepca):
        """Use a SplinePCA fitted elsewhere, of the codec's head_dim, k and knots, as the fit."""
        self.load_geometry(splinepca.state_dict())

    def load_geometry(self, state):
        """Load a SplinePCA's state_dict (the seed's kvsplice.pt holds one per layer) as the fit;
        its values are checked first, as any state this codec loads."""
        self.load_state_dict({**{"geometry." + n: t for n, t in state.items()}, "fit_done": torch.tensor(True)})

    def encode(self, v):
        return self.geometry.compress(v)

    def decode(self, stored):
        return self.geometry.decompress(stored)

    def weigh(self, weights, stored):
        return self.geometry.attend(weights, stored)

    def reconstruct(self, v):
        return self.geometry.roundtrip(v)

    def bytes_per_vector(self, dtype):
        return self.k * dtype.itemsize


def _check_geometry_values(codec, state_dict, prefix, *args):
    """Knots, slopes and PCA that would compute NaN are refused before they load."""
    inner = prefix + "geometry."
    check_values({n[len(inner):]: t for n, t in state_dict.items() if n.startswith(inner)},
                 f"{codec.kind} codec state")


@register_codec("splinepca")
class SplinePCACodec(GeometryCodec):
    """KVSplice: a learned monotone spline, then PCA to k dims."""


@register_codec("pca")
class PCACodec(GeometryCodec):
    """Plain PCA to k dims: KVSplice's fit with the identity spline (0 epochs)."""

    spline = False
