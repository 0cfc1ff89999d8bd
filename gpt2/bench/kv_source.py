"""What scripts/bench_kv.py benchmarks: a training checkpoint, or a pretrained
model named where a checkpoint path goes (`smollm2`).

A pretrained model has no run of its own, so its source stands in for the
checkpoint's run: the held-out text it is evaluated on (the val split of a
corpus prepared with the model's own tokenizer, prepared on first use), its
context, the benchmark's sizes that fit its cost, and an induction test
(gpt2/induction.py) over ids of the tokenizer's ordinary range. The stand-in
is a checkpoint dict without weights, so every setting is read and checked
as a checkpoint's is before the model loads.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from gpt2.data import dataset_dir_name, stale_reason
from gpt2.llama import LlamaConfig
from gpt2.lm import load_checkpoint
from gpt2.pretrained import SMOLLM2, load_pretrained, model_from_checkpoint


@dataclass(frozen=True)
class Pretrained:
    name: str             # what --ckpt takes, and what gpt2.pretrained.load_pretrained loads
    family: str
    config: object        # its config at `context` (the model's own: checked again once it is loaded)
    dataset: str          # held out: its val split; the geometries are fitted on its train split
    tokenizer: str
    flags: dict           # the run flags its stand-in checkpoint records (pruning's, the fits')
    defaults: dict        # the benchmark's sizes for this model (flags left unset take them)
    induction: dict       # induction_batches' settings: n_batches, batch_size, length, low, high
    wall_target_s: int    # the table's wall-time target on 2 cores


# SmolLM2-135M: 30 layers cost ~0.7 s per 512-token forward on 2 cores, so 8,192 held-out tokens,
# half the SplinePCA epochs, and no H2O (its cache runs token by token through 30 layers: minutes a
# row); pruning's defaults keep 195 of 512 tokens with a recency window of 64
PRETRAINED = {SMOLLM2: Pretrained(
    SMOLLM2, "llama", LlamaConfig(block_size=512), "shakespeare-raw", SMOLLM2, flags={"kvsplice_epochs": 4},
    defaults={"eval_batches": 16, "batch_size": 1, "calib_batches": 8, "ks": [16, 32], "h2o": False,
              "decode": False},
    # ids of ordinary tokens, clear of the special ones (0-16); a passage of 200 > the recency
    # window 64, so a pruned cache must have kept the tokens it copies
    induction={"n_batches": 8, "batch_size": 1, "length": 200, "low": 1000, "high": 49152},
    wall_target_s=900)}

CHECKPOINT_DEFAULTS = {"eval_batches": 20, "batch_size": 8, "calib_batches": 8, "ks": [8, 16, 32], "h2o": True,
                       "decode": True}


def open_source(name, data_dir=None):
    """(checkpoint dict, Pretrained or None) of what --ckpt names. For a pretrained
    model the dict holds no weights: its args name the data, its model_config the shape."""
    if name not in PRETRAINED:
        return load_checkpoint(name), None
    p = PRETRAINED[name]
    args = {**p.flags, "dataset": p.dataset, "tokenizer": p.tokenizer, "data_dir": data_dir or "data"}
    return {"args": args, "model_config": asdict(p.config), "model_family": p.family}, p


def load_model(name, ckpt, pretrained):
    """The model to benchmark: the checkpoint's, or the pretrained weights at the source's context."""
    if pretrained is None:
        return model_from_checkpoint(ckpt)
    model = load_pretrained(name, block_size=pretrained.config.block_size)
    expected = {n: getattr(pretrained.config, n) for n in ("n_layer", "n_head", "head_dim", "n_kv_head")}
    found = {n: getattr(model.config, n) for n in expected}
    if found != expected:
        raise ValueError(f"{name} loaded with {found}, but its benchmark was set up for {expected}")
    return model


def needs_data(ckpt, pretrained):
    """True when a pretrained source's corpus is not prepared (or is stale) under its data dir."""
    if pretrained is None:
        return False
    args = ckpt["args"]
    meta = Path(args["data_dir"]) / dataset_dir_name(args["dataset"], args["tokenizer"]) / "meta.json"
    if not meta.is_file():
        return True
    meta = json.loads(meta.read_text())
    return meta.get("tokenizer") != args["tokenizer"] or stale_reason(meta, args["dataset"]) is not None
