"""KVSpliceCalibrator: collect every layer's V, fit every layer's V codec.

It hooks the modules model.v_projections() names (a GPT-2 block's combined
c_attn, whose output [B, T, 3*n_embd] it splits into Q, K, V) and keeps V as
[B*T*n_head, head_dim] vectors, moved to CPU float32 at once so accelerator
memory never grows with the number of batches. Per layer it keeps a uniform
random subsample of at most --kvsplice-samples vectors, and at most what the
codec's fit wants (a geometry: 2000 per latent dim), drawn as the bottom-k of
random keys (exactly uniform over everything seen), so host memory is
bounded however many batches run.

fit() calls each layer's codec's own fit step (VCodec.fit) on a CPU copy
and loads the result into the model's codec: the fitted state is then part
of the model's state_dict. gpt2/geometry.py saves it as kvsplice.pt.

fit_codecs(model, batches, ...) is the one fit path: collect, then fit.
Training, the matrix budget's probe, recovery and the timing models call
it; the post-hoc benchmark collects once (collect) and fits each of its
codecs from those samples with the same calibrator's fit. Progress goes to the logger `kvsplice` (LOG), printed to stdout as
`[KVSplice] ...` lines; `quiet()` silences it for a caller that fits many
times.

The calibrator needs only a model with `config`, `v_projections()` and
`v_codecs()`; the training loop calls it (gpt2/train.py), never the reverse.
"""

import argparse
import contextlib
import copy
import logging
import time

import torch

from gpt2.atomic import atomic_torch_save
from gpt2.data import TokenData
from gpt2.lm import load_checkpoint
from gpt2.pretrained import model_from_checkpoint

CALIB_SEED_SALT = 104729  # calibration batches: seed + this, so they differ from the training batches


class _Stdout(logging.Handler):
    """Prints each record to the sys.stdout of the moment (a redirected or captured one included)."""

    def emit(self, record):
        print(self.format(record), flush=True)


LOG = logging.getLogger("kvsplice")
LOG.setLevel(logging.INFO)
LOG.propagate = False
if not LOG.handlers:
    _handler = _Stdout()
    _handler.setFormatter(logging.Formatter("[KVSplice] %(message)s"))
    LOG.addHandler(_handler)


@contextlib.contextmanager
def quiet():
    """No [KVSplice] progress lines inside the block (warnings still show)."""
    level = LOG.level
    LOG.setLevel(logging.WARNING)
    try:
        yield
    finally:
        LOG.setLevel(level)


MAX_SAMPLES = 120000  # V vectors kept per layer at most (--kvsplice-samples's default)


def kept_rows(model, max_samples=MAX_SAMPLES):
    """V vectors per layer a calibrator keeps: max_samples, or fewer when the codec's fit wants fewer."""
    want = model.v_codecs()[0].fit_rows()[1]  # every layer holds the same method
    return max_samples if want is None else min(max_samples, want)


class KVSpliceCalibrator:
    def __init__(self, model, max_samples=MAX_SAMPLES, seed=0):
        need = model.v_codecs()[0].fit_rows()[0]  # every layer holds the same method
        if max_samples < need:
            raise ValueError(f"[KVSplice] max_samples {max_samples} keeps fewer V vectors per layer than the "
                             f"fit of {model.config.v_cache['codec']['kind']} needs ({need}); "
                             f"raise --kvsplice-samples")
        self.model = model
        self.projections = model.v_projections()
        self.n_layer, self.head_dim = len(self.projections), model.config.head_dim
        self.cap = kept_rows(model, max_samples)
        self.generator = torch.Generator().manual_seed(seed)
        self.samples = [torch.empty(0, self.head_dim) for _ in range(self.n_layer)]
        self.keys = [torch.empty(0) for _ in range(self.n_layer)]
        self.seen = [0] * self.n_layer
        self.dropped = 0
        self.handles = []

    # ---- collection ----------------------------------------------------------

    def register(self):
        for i, (module, v_rows) in enumerate(self.projections):
            self.handles.append(module.register_forward_hook(self._hook(i, v_rows)))
        return self

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, layer, v_rows):
        def hook(module, inputs, output):
            self.add(layer, v_rows(output.detach()).float().cpu())  # (B*T*nh, hs)
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
                    LOG.info(f"batch {i}, collected {sum(self.seen):,} vectors "
                             f"(keeping {sum(s.shape[0] for s in self.samples):,})")
        finally:
            self.remove()
            self.model.train(was_training)
        if self.dropped:
            LOG.warning(f"dropped {self.dropped:,} V vectors with NaN/inf")
        if any(s.shape[0] == 0 for s in self.samples):
            raise ValueError(f"[KVSplice] no finite V vectors collected for some layer "
                             f"(dropped {self.dropped:,} with NaN/inf): cannot fit a geometry")

    # ---- fit and save ------------------------------------------------------------

    def fit(self, shared=False, seed=0, **options):
        """Fit every layer's codec (or one on the pooled samples, copied to all
        layers) with the fit options (epochs, lr: VCodec.fit takes those it
        uses, its own defaults for the rest); returns the fit statistics."""
        t0 = time.time()
        codecs = self.model.v_codecs()
        if shared:
            pooled = torch.cat(self.samples)
            pick = torch.randperm(pooled.shape[0], generator=self.generator)[:self.cap]
            groups = [pooled[pick]]
        else:
            groups = self.samples
        threads = torch.get_num_threads()
        # A fit such as SplinePCA's is hundreds of Adam steps on ~100 rows each, on the
        # CPU: a second thread only waits on the first, and waits long whenever another
        # process holds the other core.
        torch.set_num_threads(1)
        try:
            stats = [self._fit_one(i, codecs[i], X, shared, seed, options) for i, X in enumerate(groups)]
        finally:
            torch.set_num_threads(threads)
        for codec in codecs[len(groups):]:  # shared: every layer holds the one fit
            codec.load_state_dict(codecs[0].state_dict())
        return {"layers": stats, "seconds": time.time() - t0, "samples_seen": list(self.seen),
                "dropped_nonfinite": self.dropped}

    def _fit_one(self, i, codec, X, shared, seed, options):
        need = codec.fit_rows()[0]
        if X.shape[0] < need:
            raise ValueError(f"[KVSplice] layer {i}: {X.shape[0]} V vectors, the fit needs at least {need}; "
                             f"raise --kvsplice-max-batches")
        local = copy.deepcopy(codec).cpu()  # fitted where the samples are, then loaded into the model's codec
        s = local.fit(X, seed=seed + i, **options)
        codec.load_state_dict(local.state_dict())
        label = "shared" if shared else f"layer {i}"
        LOG.info(f"{label}: {X.shape[0]:,} vectors, {codec.fit_summary(s)}")
        return s

    def dump_samples(self, path):
        atomic_torch_save({i: s for i, s in enumerate(self.samples)}, path)
        LOG.info(f"V samples saved to {path}")


def calibration_batches(data, n, batch_size, block_size, seed, step=0, device="cpu"):
    """The n input batches (batch_size, block_size) a calibration reads: TRAINING
    batches drawn with seed + CALIB_SEED_SALT, so never those a run trains on or
    is evaluated on; a generator, so each is drawn as the collection reads it."""
    return (data.get_batch("train", batch_size, block_size, seed + CALIB_SEED_SALT, step, j, device)[0]
            for j in range(n))


def collect(model, batches, max_samples=MAX_SAMPLES, seed=0, autocast=None):
    """A calibrator holding V of every layer collected over `batches` (input ids (B, T)),
    its `collect_seconds` set: what fit_codecs fits, or a benchmark fits several codecs from."""
    cal = KVSpliceCalibrator(model, max_samples, seed=seed)
    t0 = time.time()
    cal.collect(batches, autocast)
    cal.collect_seconds = time.time() - t0
    return cal


def fit_codecs(model, batches, max_samples=MAX_SAMPLES, shared=False, seed=0, autocast=None, **options):
    """The one fit path: collect V of every layer over `batches`, then fit every
    layer's codec with the fit options (epochs, lr). Returns (the calibrator,
    holding the samples for a refit or a dump, and the fit statistics with
    `collect_seconds` added)."""
    cal = collect(model, batches, max_samples, seed, autocast)
    stats = cal.fit(shared=shared, seed=seed, **options)
    return cal, {**stats, "collect_seconds": cal.collect_seconds}


def main(argv=None):
    """Dump V samples of a trained checkpoint for scripts/kvsplice_validate.py --source."""
    ap = argparse.ArgumentParser(description="Collect per-layer V samples from a trained checkpoint "
                                             "(training split) and save them as {layer: [N, head_dim]}.")
    ap.add_argument("--ckpt", required=True, help="a training checkpoint (best.pt / last.pt)")
    ap.add_argument("--out", required=True, help="where to save the samples (.pt)")
    ap.add_argument("--batches", type=int, default=8, help="forward passes of training batches")
    ap.add_argument("--samples", type=int, default=MAX_SAMPLES, help="max V vectors kept per layer")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    a = ap.parse_args(argv)
    ckpt = load_checkpoint(a.ckpt)
    run, model = ckpt["args"], model_from_checkpoint(ckpt)
    data = TokenData(run["data_dir"], run["dataset"], run.get("tokenizer", "gpt2"))
    bs, T = a.batch_size or run["batch_size"], model.config.block_size
    cal = KVSpliceCalibrator(model, a.samples, seed=run["seed"])
    cal.collect(calibration_batches(data, a.batches, bs, T, run["seed"]))
    cal.dump_samples(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
