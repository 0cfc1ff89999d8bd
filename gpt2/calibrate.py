"""KVSpliceCalibrator: collect V from every block's c_attn, fit, save kvsplice.pt.

The hook splits c_attn's combined output [B, T, 3*n_embd] into Q, K, V and
keeps V as [B*T*n_head, head_dim] vectors, moved to CPU float32 at once so
accelerator memory never grows with the number of batches. Per layer it
keeps a uniform random subsample of at most min(--kvsplice-samples, 2000*k)
vectors (bottom-k of random keys: exactly uniform over everything seen), so
host memory is bounded however many batches run. fit() returns the geometry
dict of gpt2/geometry.py.

The calibrator needs only a model with `config` and `transformer.h[i].attn.c_attn`;
the training loop calls it (gpt2/train.py), never the reverse.
"""

import argparse
import time

import torch

from gpt2.data import TokenData
from gpt2.geometry import GEOMETRY_FORMAT
from lib.kvsplice import SplinePCA
from gpt2.model import GPT, load_checkpoint
from gpt2.atomic import atomic_torch_save

SAMPLES_PER_LATENT_DIM = 2000
CALIB_SEED_SALT = 104729  # calibration batches: seed + this, so they differ from the training batches


class KVSpliceCalibrator:
    def __init__(self, model, k, max_samples=120000, seed=0):
        if max_samples < k + 1:
            raise ValueError(f"[KVSplice] max_samples {max_samples} keeps fewer V vectors per layer than the "
                             f"fit needs (k + 1 = {k + 1}); raise --kvsplice-samples")
        cfg = model.config
        self.model, self.k = model, k
        self.n_layer, self.n_head, self.n_embd = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.head_dim = cfg.n_embd // cfg.n_head
        self.cap = min(max_samples, SAMPLES_PER_LATENT_DIM * k)
        self.generator = torch.Generator().manual_seed(seed)
        self.samples = [torch.empty(0, self.head_dim) for _ in range(self.n_layer)]
        self.keys = [torch.empty(0) for _ in range(self.n_layer)]
        self.seen = [0] * self.n_layer
        self.dropped = 0
        self.handles = []

    # ---- collection ----------------------------------------------------------

    def register(self):
        for i, block in enumerate(self.model.transformer.h):
            self.handles.append(block.attn.c_attn.register_forward_hook(self._hook(i)))
        return self

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, layer):
        def hook(module, inputs, output):
            v = output[..., 2 * self.n_embd:]  # (B, T, C): the V third of [Q | K | V]
            self.add(layer, v.detach().reshape(-1, self.head_dim).float().cpu())  # (B*T*nh, hs)
        return hook

    def add(self, layer, v):
        finite = torch.isfinite(v).all(dim=1)
        if not finite.all():
            self.dropped += int((~finite).sum())
            v = v[finite]
        self.seen[layer] += v.shape[0]
        keys = torch.cat([self.keys[layer], torch.rand(v.shape[0], generator=self.generator)])
        rows = torch.cat([self.samples[layer], v])
        if rows.shape[0] > self.cap:
            keep = torch.topk(keys, self.cap, largest=False).indices
            keys, rows = keys[keep], rows[keep]
        self.keys[layer], self.samples[layer] = keys, rows

    @torch.no_grad()
    def collect(self, batches, autocast=None):
        """Run no-grad forward passes over an iterable of input batches (B, T)."""
        was_training = self.model.training
        self.model.eval()
        self.register()
        try:
            for i, x in enumerate(batches, 1):
                with autocast or torch.autocast("cpu", enabled=False):
                    self.model(x)
                if i % 4 == 0:
                    print(f"[KVSplice] batch {i}, collected {sum(self.seen):,} vectors "
                          f"(keeping {sum(s.shape[0] for s in self.samples):,})", flush=True)
        finally:
            self.remove()
            self.model.train(was_training)
        if self.dropped:
            print(f"[KVSplice] dropped {self.dropped:,} V vectors with NaN/inf")
        if any(s.shape[0] == 0 for s in self.samples):
            raise ValueError(f"[KVSplice] no finite V vectors collected for some layer "
                             f"(dropped {self.dropped:,} with NaN/inf): cannot fit a geometry")

    # ---- fit and save ------------------------------------------------------------

    def fit(self, knots=7, epochs=8, lr=2e-3, shared=False, seed=0):
        """Fit one SplinePCA per layer (or one shared); returns the geometry dict."""
        t0 = time.time()
        if shared:
            pooled = torch.cat(self.samples)
            pick = torch.randperm(pooled.shape[0], generator=self.generator)[:self.cap]
            groups = [pooled[pick]]
        else:
            groups = self.samples
        threads = torch.get_num_threads()
        # The fit is hundreds of Adam steps on ~100 rows each, on the CPU: a second thread
        # only waits on the first, and when another process holds the other core it waits
        # long (2 epochs of a 32,000-row fit: 26 s on 2 threads, 3-4 s on 1, measured on
        # a busy 2-core machine).
        torch.set_num_threads(1)
        try:
            modules, stats = zip(*(self._fit_one(i, X, knots, epochs, lr, shared, seed) for i, X in enumerate(groups)))
        finally:
            torch.set_num_threads(threads)
        return {
            "Hd": self.head_dim, "k": self.k, "knots": knots, "n_layer": self.n_layer, "shared": shared,
            "state_dict": [{n: t.detach().cpu() for n, t in m.state_dict().items()} for m in modules],
            "format_version": GEOMETRY_FORMAT,
            "fit_stats": {"layers": list(stats), "seconds": time.time() - t0, "samples_seen": list(self.seen),
                          "dropped_nonfinite": self.dropped},
        }

    def _fit_one(self, i, X, knots, epochs, lr, shared, seed):
        if X.shape[0] < self.k + 1:
            raise ValueError(f"[KVSplice] layer {i}: {X.shape[0]} V vectors, need at least k+1 = {self.k + 1}; "
                             f"raise --kvsplice-max-batches")
        mod = SplinePCA(self.head_dim, self.k, knots)
        s = mod.fit(X, epochs=epochs, lr=lr, seed=seed + i)
        label = "shared" if shared else f"layer {i}"
        print(f"[KVSplice] {label}: {X.shape[0]:,} vectors, held-out MSE PCA {s['pca_val_mse']:.5f} "
              f"SplinePCA {s['spline_val_mse']:.5f} (ratio {s['spline_val_mse'] / max(s['pca_val_mse'], 1e-30):.3f}"
              f"{'' if s['kept_spline'] else ', identity spline kept'}), {s['seconds']:.1f}s", flush=True)
        return mod, s

    def dump_samples(self, path):
        atomic_torch_save({i: s for i, s in enumerate(self.samples)}, path)
        print(f"[KVSplice] V samples saved to {path}")


def main(argv=None):
    """Dump V samples of a trained checkpoint for scripts/kvsplice_validate.py --source."""
    ap = argparse.ArgumentParser(description="Collect per-layer V samples from a trained checkpoint "
                                             "(training split) and save them as {layer: [N, head_dim]}.")
    ap.add_argument("--ckpt", required=True, help="a training checkpoint (best.pt / last.pt)")
    ap.add_argument("--out", required=True, help="where to save the samples (.pt)")
    ap.add_argument("--batches", type=int, default=8, help="forward passes of training batches")
    ap.add_argument("--samples", type=int, default=120000, help="max V vectors kept per layer")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    a = ap.parse_args(argv)
    ckpt = load_checkpoint(a.ckpt)
    run, model = ckpt["args"], GPT.from_checkpoint_state(ckpt)
    data = TokenData(run["data_dir"], run["dataset"])
    bs, T = a.batch_size or run["batch_size"], model.config.block_size
    # k only sets the sample cap (2000 per latent dim): ask for head_dim so --samples rules
    cal = KVSpliceCalibrator(model, model.config.head_dim, a.samples, seed=run["seed"])
    cal.collect(data.get_batch("train", bs, T, run["seed"] + CALIB_SEED_SALT, 0, j)[0] for j in range(a.batches))
    cal.dump_samples(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
