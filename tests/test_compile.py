"""torch.compile sees the training step of V0, V19 and V20 whole.

torch._dynamo.explain traces a tiny model's forward + loss in training mode
(what --compile runs, in fp32 and under bf16 autocast) and counts graph
breaks. An AOTAutograd backend that generates no code then shows the graphs
Inductor would receive, forward and backward: they must hold no complex
tensors, for which Inductor generates no code (it falls back to eager and
warns). Last, a short train() with --compile runs the loop end to end with
the aot_eager backend (the same capture, no code generation, so seconds):
the geometry attached mid-run reaches the compiled model and the losses are
an eager run's. V20 runs with a fitted geometry whose spline is not the
identity, since an identity spline skips its lookup.
"""

import functools

import pytest
import torch
import torch._dynamo
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from conftest import losses_by_iter, tiny_args
from gpt2.bench.train_steps import step_config, with_geometry
from gpt2.model import GPT
from gpt2.train import train

STEPS = ("V0", "V19", "V20")
TINY = ("--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64",
        "--kv-prune-k-min", "16", "--kv-prune-recency", "8", "--kvsplice-k", "8")
VOCAB, BATCH = 96, 4

@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(step):
    torch.manual_seed(0)
    cfg = step_config(step, VOCAB, TINY)
    model = GPT(cfg)
    if cfg.v_cache["codec"]["kind"] == "splinepca":
        with_geometry(model, BATCH)
        splines = [codec.geometry.spline for codec in model.v_codecs()]
        assert not any(s.is_identity for s in splines)  # the lookup runs
        with torch.no_grad():  # the outer knots are calibration samples, which this tiny vocabulary repeats;
            for s in splines:  # on a knot the slope is either side's, and eager and compiled may differ there
                s.knot_x.add_(1e-4)
                s.refresh()
    if cfg.v_cache["select"]["kind"] == "prune":
        assert model.transformer.h[0].attn.vcache.selector.rule.budget < cfg.block_size  # the pruned path runs
    return model.train()


def batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (BATCH, 64), generator=gen)
    return x, torch.roll(x, -1, dims=1)


def loss_of(model):
    def f(x, y):
        return model(x, y)[1]
    return f


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("step", STEPS)
def test_training_forward_has_no_graph_breaks(step, dtype):
    model = tiny_model(step)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with amp:
        explained = torch._dynamo.explain(loss_of(model))(*batch())
    reasons = [r.reason for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def _complex_nodes(gm, found):
    """Record the graph's nodes that produce complex tensors; run it as it is."""
    for node in gm.graph.nodes:
        vals = node.meta.get("val")
        vals = vals if isinstance(vals, (list, tuple)) else [vals]
        if any(isinstance(v, torch.Tensor) and v.is_complex() for v in vals):
            trace = node.meta.get("stack_trace", "").strip().splitlines()
            found.append(f"{node.target} at {trace[-2].strip() if len(trace) > 1 else '?'}")
    return make_boxed_func(gm.forward)


@pytest.mark.parametrize("step", STEPS)
def test_inductor_gets_real_graphs_that_compute_the_eager_step(step):
    model = tiny_model(step)
    x, y = batch()
    params = [p for p in model.parameters() if p.requires_grad]  # not the frozen geometry
    eager_loss = model(x, y)[1]
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    found = {"forward": [], "backward": []}
    backend = aot_autograd(fw_compiler=lambda gm, _: _complex_nodes(gm, found["forward"]),
                           bw_compiler=lambda gm, _: _complex_nodes(gm, found["backward"]))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    loss = compiled(x, y)[1]
    loss.backward()
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    for p, g in zip(params, eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert found == {"forward": [], "backward": []}


def test_train_with_compile_matches_eager_across_calibration(tiny_data_dir, tmp_path, monkeypatch):
    """V20 under --compile: compiled before the geometry exists, recompiled
    when calibration attaches it, evaluated in eval mode; every loss equals
    the eager run's."""
    flags = ("--ablation-step", "V20", "--kvsplice-k", "8", "--kv-prune-k-min", "16", "--kv-prune-recency", "8",
             "--kvsplice-samples", "4000", "--kvsplice-max-batches", "2", "--kvsplice-epochs", "1",
             "--warmup-iters", "3", "--max-iters", "8", "--eval-interval", "4")
    train(tiny_args(tiny_data_dir, tmp_path / "eager", *flags))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.utils.counters.clear()
    summary = train(tiny_args(tiny_data_dir, tmp_path / "compiled", *flags, "--compile"))
    footprint = summary["v_cache"]
    assert summary["complete"] and footprint["elements_per_head"] < footprint["baseline_elements_per_head"]
    assert not torch._dynamo.utils.counters["graph_break"]
    eager, compiled = losses_by_iter(tmp_path / "eager"), losses_by_iter(tmp_path / "compiled")
    assert sorted(compiled) == list(range(1, 9))
    for it in compiled:
        assert compiled[it] == pytest.approx(eager[it], rel=1e-6), it  # the geometry moves it ~5e-5
