"""KVSpliceCalibrator: collect V from every block's c_attn, fit, save kvsplice.pt.

The hook splits c_attn's combined output [B, T, 3*n_embd] into Q, K, V and
keeps V as [B*T*n_head, head_dim] vectors, moved to CPU float32 at once so
accelerator memory never grows with the number of batches. Per layer it
keeps a uniform random subsample of at most min(--kvsplice-samples, 2000*k)
vectors (bottom-k of random keys: exactly uniform over everything seen), so
host memory is bounded however many batches run.

The geometry file (and the "kvsplice" entry of a checkpoint) is
    {"Hd", "k", "knots", "n_layer", "shared", "state_dict", "format_version", "fit_stats"}
with state_dict a list of SplinePCA state dicts: one per layer, or one shared.
"""

import time
from pathlib import Path

import torch

from gpt2.kvsplice import FORMAT_VERSION as SPLINEPCA_FORMAT
from gpt2.kvsplice import SplinePCA
from lib.atomic import atomic_torch_save

GEOMETRY_FORMAT = 1
SAMPLES_PER_LATENT_DIM = 2000
_KEYS = ("Hd", "k", "knots", "n_layer", "shared", "state_dict", "format_version")


class KVSpliceCalibrator:
    def __init__(self, model, k, max_samples=120000, seed=0):
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
        modules, stats = [], []
        for i, X in enumerate(groups):
            if X.shape[0] < self.k + 1:
                raise ValueError(f"[KVSplice] layer {i}: {X.shape[0]} V vectors, need at least k+1 = {self.k + 1}; "
                                 f"raise --kvsplice-max-batches")
            mod = SplinePCA(self.head_dim, self.k, knots)
            s = mod.fit(X, epochs=epochs, lr=lr, seed=seed + i)
            label = "shared" if shared else f"layer {i}"
            print(f"[KVSplice] {label}: {X.shape[0]:,} vectors, held-out MSE PCA {s['pca_val_mse']:.5f} "
                  f"SplinePCA {s['spline_val_mse']:.5f} (ratio {s['spline_val_mse'] / max(s['pca_val_mse'], 1e-30):.3f}"
                  f"{'' if s['kept_spline'] else ', identity spline kept'}), {s['seconds']:.1f}s", flush=True)
            modules.append(mod)
            stats.append(s)
        return {
            "Hd": self.head_dim, "k": self.k, "knots": knots, "n_layer": self.n_layer, "shared": shared,
            "state_dict": [{n: t.detach().cpu() for n, t in m.state_dict().items()} for m in modules],
            "format_version": GEOMETRY_FORMAT,
            "fit_stats": {"layers": stats, "seconds": time.time() - t0, "samples_seen": list(self.seen),
                          "dropped_nonfinite": self.dropped},
        }

    def dump_samples(self, path):
        atomic_torch_save({i: s for i, s in enumerate(self.samples)}, path)
        print(f"[KVSplice] V samples saved to {path}")


def save_geometry(geometry, path):
    atomic_torch_save(geometry, path)
    print(f"[KVSplice] Saved to {path}")


def check_geometry(geometry, config, where, expected_k=None):
    """Raise ValueError naming expected and found values when a geometry does not fit a model."""
    if not isinstance(geometry, dict) or any(key not in geometry for key in _KEYS):
        missing = [key for key in _KEYS if not isinstance(geometry, dict) or key not in geometry]
        raise ValueError(f"{where} is not a KVSplice geometry: missing keys {missing}")
    if geometry["format_version"] != GEOMETRY_FORMAT:
        raise ValueError(f"{where}: format_version {geometry['format_version']!r}, expected {GEOMETRY_FORMAT}")
    head_dim = config.n_embd // config.n_head
    for key, expected in (("Hd", head_dim), ("n_layer", config.n_layer), ("k", expected_k)):
        if expected is not None and geometry[key] != expected:
            raise ValueError(f"{where}: {key} is {geometry[key]}, but the model needs {key} = {expected}")
    n_sd = 1 if geometry["shared"] else geometry["n_layer"]
    if len(geometry["state_dict"]) != n_sd:
        raise ValueError(f"{where}: {len(geometry['state_dict'])} state dicts, expected {n_sd}")


def load_geometry(path, config, expected_k=None):
    """Read a kvsplice.pt for `config` (a GPTConfig); clear errors for bad files."""
    try:
        geometry = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"KVSplice geometry {path} not found") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable KVSplice geometry file ({type(e).__name__}: {e})") from None
    check_geometry(geometry, config, str(path), expected_k)
    return geometry


def geometry_modules(geometry, config):
    """One frozen SplinePCA per layer (the same object everywhere when shared)."""
    check_geometry(geometry, config, "KVSplice geometry")
    mods = [SplinePCA.from_dict({"Hd": geometry["Hd"], "k": geometry["k"], "knots": geometry["knots"],
                                 "state_dict": sd, "format_version": SPLINEPCA_FORMAT})
            for sd in geometry["state_dict"]]
    if geometry["shared"]:
        mods = mods * config.n_layer
    return mods


def calibrate_model(model, data, args, rt, tracker, step):
    """Calibrate on the model as trained so far and put the geometry into its attention.

    Under DDP, rank 0 collects and fits; the geometry is broadcast so every
    rank uses the identical one. `model` is the raw module (not the compiled
    or DDP wrapper): hooks see plain c_attn calls.
    """
    from gpt2.train import autocast_context

    geometry = None
    if rt.master:
        print(f"[KVSplice] calibrating at iteration {step}: {args.kvsplice_max_batches} batches, "
              f"k={args.kvsplice_k}, knots={args.kvsplice_knots}", flush=True)
        t0 = time.time()
        cal = KVSpliceCalibrator(model, args.kvsplice_k, args.kvsplice_samples, seed=args.seed)
        batches = (data.get_batch("train", args.batch_size, args.block_size, args.seed + 104729, step, j,
                                  rt.device)[0] for j in range(args.kvsplice_max_batches))
        cal.collect(batches, autocast_context(rt.device, args.dtype)[0])
        geometry = cal.fit(args.kvsplice_knots, args.kvsplice_epochs, args.kvsplice_lr,
                           args.kvsplice_shared, seed=args.seed)
        save_geometry(geometry, Path(args.out_dir) / args.kvsplice_save)
        if args.kvsplice_dump_samples:
            cal.dump_samples(args.kvsplice_dump_samples)
        record = {"kvsplice/seconds": time.time() - t0, "kvsplice/fit_seconds": geometry["fit_stats"]["seconds"]}
        for i, s in enumerate(geometry["fit_stats"]["layers"]):
            record[f"kvsplice/layer{i}_pca_val_mse"] = s["pca_val_mse"]
            record[f"kvsplice/layer{i}_splinepca_val_mse"] = s["spline_val_mse"]
        tracker.log(record, step=step)
    if rt.ddp:
        import torch.distributed as dist

        box = [geometry]
        dist.broadcast_object_list(box, src=0)
        geometry = box[0]
    model.attach_kvsplice(geometry)


def main(argv=None):
    """Dump V samples of a trained checkpoint for scripts/kvsplice_validate.py --source."""
    import argparse

    from gpt2.data import TokenData
    from gpt2.model import GPT, load_checkpoint

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
    cal.collect(data.get_batch("train", bs, T, run["seed"] + 104729, 0, j)[0] for j in range(a.batches))
    cal.dump_samples(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
