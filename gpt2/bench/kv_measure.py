"""What scripts/bench_kv.py measures of one V-cache method in a model: quality,
real cache bytes and decode speed; and a checkpoint's context use, which
scripts/compare_runs.py prints above its table. The measuring functions take
the model with the method already installed (install)."""

import argparse
import copy
import math
import statistics
import time
from dataclasses import replace

import torch

from gpt2.bench.kv_methods import BenchMethod, prune_settings
from gpt2.bench.kv_report import context_use
from gpt2.bench.synthetic import warped_v
from gpt2.data import open_data
from gpt2.induction import induction_scores
from gpt2.lm import load_checkpoint
from gpt2.model import GPT
from gpt2.pretrained import model_from_checkpoint
from gpt2.recall import RecallData, answer_accuracy
from gpt2.stats import paired_difference, verdict
from gpt2.train import EVAL_SEED_SALT
from lib.kvsplice import SplinePCA
from lib.vcache import FULL, full_record


def call_times(fn, repeats):
    """Seconds of each of `repeats` timed calls of fn, after one untimed warm-up call
    (first-call allocations, a compile)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def install(model, layers):
    """Put one VCacheMethod per layer into the model's attention."""
    for attn, method in zip(model.attentions(), layers):
        attn.vcache = method
    model.config.v_cache = layers[0].record()


def v_heads(config):
    """The heads of V: a grouped-query model's KV heads, else every head."""
    return getattr(config, "n_kv_head", config.n_head)


@torch.no_grad()
def evaluate(model, batches, window):
    """Per batch, the same batches for every method: {"loss": [...]} and, for
    recall batches (x, y, distance, task), {"acc": [(correct, answers)], "acc_far": [...]}
    with far = the answer at least `window` tokens back. A method whose decode
    only approximates its full-sequence form (H2O) is evaluated through its
    cache, which is its definition."""
    exact = model.attentions()[0].vcache.exact
    out = {"loss": [], "acc": [], "acc_far": []}
    for batch in batches:
        x, y = batch[:2]
        logits, loss = model(x, y) if exact else model(x, y, caches=model.make_cache())
        out["loss"].append(float(loss))
        if len(batch) == 4:
            acc = answer_accuracy(logits, y, batch[2], batch[3], window)
            out["acc"].append(acc["acc"])
            out["acc_far"].append(acc["acc_far"])
    return out


@torch.no_grad()
def v_bytes_per_token(model, tokens):
    """V bytes per token per layer of a real cache prefilled with tokens (1, T);
    checked against what the method declares."""
    cache = model.make_cache()
    model(tokens, caches=cache)
    held = cache.nbytes()["v"]
    cfg, T = model.config, tokens.size(1)
    declared = sum(a.vcache.v_bytes(T) for a in model.attentions()) * v_heads(cfg)
    if held != declared:
        raise RuntimeError(f"{model.attentions()[0].vcache}: cache holds {held} V bytes, "
                           f"the method declares {declared}")
    return held / (cfg.n_layer * T)


@torch.no_grad()
def decode_tokens_per_s(model, tokens, prefill, steps):
    """Tokens/s of `steps` single-token steps after a `prefill`-token prompt (batch 1)."""
    cache = model.make_cache()
    model(tokens[:, :prefill], caches=cache)
    t0 = time.perf_counter()
    for t in range(prefill, prefill + steps):
        model(tokens[:, t:t + 1], caches=cache)
    return steps / (time.perf_counter() - t0)


def decode_rates(model, methods, tokens, prefill, steps, repeats):
    """Median decode tokens/s per method name, timed round-robin: a drift in
    machine speed (other load, clocks) then hits every method alike, not
    whichever happened to run during it. methods: {name: per-layer methods}."""
    rates = {name: [] for name in methods}
    for _ in range(repeats):
        for name, layers in methods.items():
            install(model, layers)
            rates[name].append(decode_tokens_per_s(model, tokens, prefill, steps))
    return {name: statistics.median(r) for name, r in rates.items()}


# ---- quality of a checkpoint under a method ------------------------------------------------

def eval_data(ckpt_path, args, block_size, vocab_size, data_dir, eval_batches, batch_size, seed):
    """The checkpoint's dataset and the val batches every method is evaluated on
    (for recall, with each answer's distance and task)."""
    data_dir = data_dir or args.get("data_dir")
    if data_dir is None or args.get("dataset") is None:
        raise ValueError(f"{ckpt_path}: its args name no data_dir/dataset; pass --data-dir")
    # runs from before --tokenizer existed were all GPT-2 tokens
    data = open_data(argparse.Namespace(**{"tokenizer": "gpt2", **args, "data_dir": data_dir,
                                           "block_size": block_size}))
    if data.vocab_size > vocab_size:
        raise ValueError(f"data at {data.dir} has vocab_size {data.vocab_size}, the model {vocab_size}")
    salt = seed + EVAL_SEED_SALT
    if isinstance(data, RecallData):
        return data, [data.get_batch_with_distance("val", batch_size, block_size, salt, 0, j)
                      for j in range(eval_batches)]
    return data, [data.get_batch("val", batch_size, block_size, salt, 0, j) for j in range(eval_batches)]


def measure_quality(model, method, val, row0, trained, window, log, induction=None):
    """One table row: bytes from a real cache, loss (and recall accuracy) per val batch,
    and with `induction` (gpt2/induction.py batches) the induction test's loss and
    accuracy per batch."""
    install(model, method.layers)
    t0 = time.perf_counter()
    nbytes = v_bytes_per_token(model, row0)
    per_batch = evaluate(model, val, window)
    if induction is not None:
        scores = induction_scores(model, induction)
        per_batch["ind_loss"], per_batch["ind_acc"] = scores["loss"], scores["acc"]
    loss = statistics.fmean(per_batch["loss"])
    row = {"method": method.name, "family": method.family, "k": method.k, "record": method.record,
           "v_bytes_per_token": nbytes, "val_loss": loss, "ppl": math.exp(loss), "calib_s": method.calib_s,
           "trained_in_pct": {"prune": trained["V19"], "prune+splinepca": trained["V20"]}.get(method.family),
           "v_mse_ratio": method.v_mse_ratio, "per_batch": per_batch}
    for name in ("acc", "acc_far"):
        correct, total = (sum(c for c, _ in per_batch[name]), sum(n for _, n in per_batch[name]))
        row[name] = correct / total if total else None
    for name in ("ind_loss", "ind_acc"):
        row[name] = statistics.fmean(per_batch[name]) if name in per_batch else None
    acc = "" if row["acc"] is None else f"  acc {row['acc']:.3f}" + (
        "" if row["acc_far"] is None else f" far {row['acc_far']:.3f}")
    ind = "" if induction is None else f"  induction loss {row['ind_loss']:.3f} acc {row['ind_acc']:.3f}"
    log(f"[bench] {method.name:<28} V {nbytes:8.1f} B/token/layer  loss {loss:.4f}{acc}{ind}  "
        f"calib {method.calib_s:5.1f}s  [{time.perf_counter() - t0:.1f}s]")
    return row


def compare_to_reference(row, ref):
    """Paired differences to the reference (full V cache) over the same val batches."""
    row["compression"] = ref["v_bytes_per_token"] / row["v_bytes_per_token"]
    row["loss_diff"], row["loss_diff_se"] = paired_difference(row["per_batch"]["loss"], ref["per_batch"]["loss"])
    row["ppl_change_pct"] = 100.0 * math.expm1(row["loss_diff"])
    se = row["loss_diff_se"]
    row["ppl_change_se_pct"] = None if se is None else 100.0 * math.exp(row["loss_diff"]) * se
    row["verdict"] = "reference" if row is ref else verdict(row["loss_diff"], se, "worse", "better")
    for name in ("acc", "acc_far"):
        pairs = [(c / n, rc / rn) for (c, n), (rc, rn) in zip(row["per_batch"][name], ref["per_batch"][name])
                 if n and rn]
        if len(pairs) > 1:
            row[f"{name}_diff"], row[f"{name}_diff_se"] = paired_difference(*zip(*pairs))
    for name in ("ind_loss", "ind_acc"):
        if name in row["per_batch"]:
            row[f"{name}_diff"], row[f"{name}_diff_se"] = paired_difference(row["per_batch"][name],
                                                                            ref["per_batch"][name])


def checkpoint_context_use(ckpt_path, eval_batches=20, batch_size=8):
    """(can_rank, text): the context-use line of a checkpoint alone (full cache vs a
    window of its recency), for summaries that print no benchmark."""
    ckpt = load_checkpoint(ckpt_path)
    args = ckpt.get("args") or {}
    model = model_from_checkpoint(ckpt).eval()
    cfg = model.config
    window = prune_settings(ckpt)["recency"]
    data, val = eval_data(ckpt_path, args, cfg.block_size, cfg.vocab_size, None, eval_batches, batch_size,
                          args.get("seed", 1337))
    methods = [BenchMethod("none", FULL), BenchMethod(f"window {window}", {"select": {"kind": "window", "window": window},
                                                                          "codec": FULL["codec"]})]
    rows = [measure_quality(model, m.build(model), val, val[0][0][:1], {"V19": None, "V20": None}, window,
                            lambda msg: None) for m in methods]
    info = {"prune_recency": window, "n_eval_batches": eval_batches, "recall": isinstance(data, RecallData)}
    for row in rows:
        compare_to_reference(row, rows[0])
        row["info"] = info
    return context_use(rows)


# ---- decode speed through model.generate ------------------------------------------------

# (prompt, new tokens) per context; another context: the new tokens an eighth of it, the prompt the rest
DECODE_SHAPES = {256: (192, 64), 1024: (896, 96)}


def timing_geometry(head_dim, k, seed=0):
    """A SplinePCA fitted on warped V-like samples (gpt2/bench/synthetic.py),
    so that its spline is not the identity: decode timings then include the
    spline's arithmetic, whatever a given checkpoint's fit kept."""
    geometry = SplinePCA(head_dim, k)
    if not geometry.fit(warped_v(20000, head_dim, seed=seed), epochs=2, seed=seed)["kept_spline"]:
        raise RuntimeError("the timing geometry kept the identity spline: decode timings would skip the spline")
    return geometry


def decode_models(config, record, context, geometry):
    """(plain, method, control, quantized) models of config's shape at block_size =
    context, with the same random weights: decode speed depends on shapes, not
    on what was learned. method stores V through `geometry` (a SplinePCA);
    control is the same record with plain PCA (the geometry with the identity
    spline): the same V bytes, so the two differ by the spline's work alone;
    quantized is the record's pruning with int4 V (V22's method)."""
    shape = dict(block_size=context, dropout=0.0, v_cache=full_record())
    torch.manual_seed(0)
    plain = GPT(replace(config, **shape)).eval()
    pca = copy.deepcopy(geometry)
    pca.spline.reset_identity()
    models = [plain]
    for codec, g in (("splinepca", geometry), ("pca", pca), ("int4", None)):
        m = GPT(replace(config, **shape)).eval()
        m.load_state_dict(plain.state_dict())
        m.set_v_cache({**record, "codec": {"kind": codec, "group_size": 32} if g is None else
                       {**record["codec"], "kind": codec}})
        for block in m.transformer.h:
            if g is not None:
                block.attn.vcache.codec.set_geometry(g)
        models.append(m)
    return tuple(models)


def decode_row(plain, method, control, quantized, batch, context, repeats, vocab_size, seed=0):
    """One row of the decode-speed table (gpt2/bench/kv_report.py format_decode): {"V0" |
    "V0 compiled" | "V20" | "V20 compiled" | "PCA compiled" (control) | "V22" (quantized, eager):
    (prefill s, decode tokens/s), "prompt": its tokens, "new_tokens": n}, medians over `repeats` round-robin rounds of
    model.generate (its own prefill / decode timings) on the models' device.
    Dynamo starts fresh: every model's _decode_step shares one recompile limit
    (8), past which Dynamo silently runs eager. A first short generate per
    run, from half the context (past the pruning budget, so the cache is full
    as in the timed runs), compiles and warms up."""
    torch._dynamo.reset()
    runs = {"V0": (plain, False), "V0 compiled": (plain, True), "V20": (method, False), "V20 compiled": (method, True),
            "PCA compiled": (control, True), "V22": (quantized, False)}
    n_prompt, new = DECODE_SHAPES.get(context, (context - context // 8, context // 8))
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch, n_prompt), generator=g).to(plain.lm_head.weight.device)
    times = generate_timings(runs, prompt, new, repeats, seed, warmup=context // 2)
    return {**{name: (p, batch * new / d) for name, (p, d) in times.items()}, "prompt": n_prompt, "new_tokens": new}


def generate_timings(runs, prompt, new, repeats, seed=0, warmup=None):
    """{name: (prefill s, decode s)}, medians over `repeats` round-robin rounds of model.generate of
    `new` tokens after `prompt` for each run {name: (model, compile)}, after a first short
    generate per run from the prompt's first `warmup` tokens (default half) that compiles and warms up."""
    warmup = warmup or prompt.size(1) // 2
    for model, compile in runs.values():
        model.generate(prompt[:, :warmup], 3, top_k=50, compile=compile)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (model, compile) in runs.items():
            t = {}
            torch.manual_seed(seed)
            model.generate(prompt, new, temperature=0.8, top_k=50, compile=compile, timings=t)
            times[name].append((t["prefill_s"], t["decode_s"]))
    return {name: (statistics.median(p for p, _ in r), statistics.median(d for _, d in r)) for name, r in times.items()}
