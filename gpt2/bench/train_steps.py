"""Models of an ablation step at set shapes, as the timing scripts build them."""

import torch

from gpt2.calibrate import fit_codecs, quiet
from gpt2.cli import parse_args
from gpt2.train import model_config_from_args

QUICKSTART = ("--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--block-size", "256",
              "--kv-prune-k-min", "32", "--kv-prune-recency", "32")


def step_config(step, vocab, flags):
    """The GPTConfig an ablation step trains, at the shapes `flags` give."""
    return model_config_from_args(parse_args(["--ablation-step", step, *flags]), vocab)


def with_geometry(model, batch, warp=True, seed=0):
    """Fit the model's geometry codecs on its own V (random tokens).

    A fit on random tokens keeps the identity spline (it does not beat PCA
    there), and the identity skips the spline's lookup altogether. With
    `warp`, the spline's slopes are set to fixed random values instead
    (knots stay at the data's quantiles): the lookup tables have a fitted
    spline's size and the timing includes them.
    """
    device = model.lm_head.weight.device
    batches = (torch.randint(0, model.config.vocab_size, (batch, model.config.block_size), device=device)
               for _ in range(2))
    with quiet():  # its per-layer lines would report the identity spline
        fit_codecs(model, batches, max_samples=20000, epochs=0 if warp else 1)
    if warp:
        gen = torch.Generator().manual_seed(seed)
        for codec in model.v_codecs():
            state = codec.state_dict()
            raw = state["geometry.spline.raw_slope"].cpu()  # (D, K+1): min_slope + exp(raw), identity ~ log(0.99)
            state["geometry.spline.raw_slope"] = raw + 0.5 * torch.randn(raw.shape, generator=gen)
            codec.load_state_dict(state)
    return model
