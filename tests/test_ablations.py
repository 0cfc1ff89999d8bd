import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from gpt2.ablations import STEPS, format_steps, step_overrides
from gpt2.cli import build_parser, parse_args
from gpt2.method_flags import method_record


def test_every_step_overrides_declared_flags_only():
    dests = {a.dest for a in build_parser()._actions}
    for step in STEPS:
        assert set(step_overrides(step, dests)) <= dests


def test_step_table_lookup():
    assert step_overrides("V0") == {"v_cache": "", "kv_prune": False, "kvsplice_enable": False, "rmlp": False}
    assert step_overrides("V19")["kv_prune"] is True
    v20 = step_overrides("V20")
    assert v20["kv_prune"] and v20["kvsplice_enable"] and v20["kvsplice_k"] == 16 and not v20["rmlp"]
    assert step_overrides("V21")["rmlp"] is True
    args = parse_args(["--ablation-step", "V21"])
    assert args.rmlp and args.kv_prune and args.kvsplice_enable and args.kvsplice_k == 16
    v22 = parse_args(["--ablation-step", "V22", "--kv-prune-k-min", "16"])
    assert method_record(v22) == {"select": {"kind": "prune", "keep_ratio": v22.kv_prune_keep_ratio, "k_min": 16,
                                             "recency": 64}, "codec": {"kind": "int4"}}


def test_unknown_step_lists_the_known_ones():
    with pytest.raises(KeyError, match="known steps: V0, V19, V20, V21, V22, V23, V24"):
        step_overrides("V99")
    r = subprocess.run([sys.executable, str(ROOT / "train_ra_mla.py"), "--ablation-step", "V99"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "known steps: V0, V19, V20, V21, V22, V23, V24" in r.stderr


def test_list_steps_prints_the_table():
    r = subprocess.run([sys.executable, str(ROOT / "train_ra_mla.py"), "--list-steps"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    for step in STEPS:
        assert f"\n{step} " in r.stdout
    methods = {"V0": "full", "V19": "prune(keep_ratio=0.382, k_min=64, recency=64)",
               "V20": "prune(keep_ratio=0.382, k_min=64, recency=64) + splinepca(k=16, knots=7)"}
    methods["V21"] = methods["V20"]
    methods["V22"] = "prune(keep_ratio=0.382, k_min=64, recency=64) + int4(group_size=32)"
    methods["V23"] = "full + int(bits=2, group_size=32)"
    methods["V24"] = ("sinks(sinks=4, window=8) + transform(basis=pca, bits=1.500, allocate=variance, spline=False, "
                      "spline_k=16, knots=7, seed=0)")
    assert r.stdout.strip() == format_steps(methods.get)
    assert "   V cache: prune(keep_ratio=0.382, k_min=64, recency=64)\n" in r.stdout


def tiny_config(path, data_dir, out_dir, extra=()):
    lines = [f'CONFIG_DATA_DIR="{data_dir}"', f'CONFIG_OUT_DIR="{out_dir}"', "CONFIG_N_LAYER=1",
             "CONFIG_N_HEAD=2", "CONFIG_N_EMBD=32", "CONFIG_BLOCK_SIZE=64", "CONFIG_BATCH_SIZE=4",
             "CONFIG_MAX_ITERS=8", "CONFIG_WARMUP_ITERS=2", "CONFIG_EVAL_INTERVAL=4", "CONFIG_EVAL_ITERS=1",
             'CONFIG_TRACKER="none"', 'CONFIG_DEVICE="cpu"', "CONFIG_KV_PRUNE_K_MIN=16",
             "CONFIG_KV_PRUNE_RECENCY=8", 'CONFIG_ABLATION_STEPS="V0,V19"', *extra]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_matrix(config, *flags):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run_ablation.py"), "--config", str(config),
                           *flags], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_two_step_matrix_writes_summary_and_plot_and_skips_completed(tiny_data_dir, tmp_path):
    out = tmp_path / "runs" / "tiny"
    config = tiny_config(tmp_path / ".config", tiny_data_dir, out, ['CONFIG_MATRIX_TIME="600"'])
    r = run_matrix(config)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"\[budget\] pace measured: V0 [\d,]+ ms/iter, V19 [\d,]+ ms/iter", r.stdout)
    assert "[budget] --matrix-time 600 s for 2 runs: 8 iterations per run (the --max-iters cap)" in r.stdout
    for step in ("V0", "V19"):
        assert (out / step / "summary.json").exists() and (out / step / "metrics.jsonl").exists()
    summary = (out / "summary.md").read_text()
    assert "| V0 | 1 | 8 | 2,048 |" in summary and "| V19 | 1 | 8 | 2,048 |" in summary
    assert "V elements/head" in summary and "vs V19" in summary
    assert "Context use: keeping only the last" in summary and "paired SE over 20 batches" in summary
    assert (out / "val_loss.png").stat().st_size > 5000
    # V19 keeps V for max(16, int(64 * 0.382)) = 24 tokens x 16 dims, V0 all 64
    assert "| 1,024 |" in summary and "| 384 |" in summary

    again = run_matrix(config)
    assert again.returncode == 0 and again.stdout.count("already complete") == 2


def test_a_failing_step_is_reported_and_the_others_still_run(tiny_data_dir, tmp_path):
    out = tmp_path / "runs" / "broken"
    # recency 64 > budget max(8, 24): V19's pruner refuses to build; V0 is unaffected
    config = tiny_config(tmp_path / ".config", tiny_data_dir, out,
                         ["CONFIG_KV_PRUNE_K_MIN=8", "CONFIG_KV_PRUNE_RECENCY=64",
                          'CONFIG_ABLATION_STEPS="V19,V0"'])
    r = run_matrix(config)
    assert r.returncode == 1
    assert "V19 FAILED" in r.stdout and (out / "V0" / "summary.json").exists()


def test_the_matrix_runs_once_per_recall_dataset_with_accuracy_in_the_summary(tmp_path):
    out = tmp_path / "runs" / "recall"
    config = tiny_config(tmp_path / ".config", tmp_path / "no-data-needed", out,
                         ['CONFIG_ABLATION_DATASETS="copy,mqar"', 'CONFIG_ABLATION_STEPS="V0"',
                          "CONFIG_RECALL_VOCAB=16", "CONFIG_RECALL_SEGMENT=12",
                          "CONFIG_RECALL_PAIRS=4", "CONFIG_RECALL_QUERIES=8", "CONFIG_RECALL_PAIR_TOKENS=1"])
    r = run_matrix(config)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for dataset in ("copy", "mqar"):
        summary = json.loads((out / dataset / "V0" / "summary.json").read_text())
        assert summary["recall_tasks"] == [dataset] and f"val_acc_{dataset}_far" in summary
        assert "| acc | far acc | far acc vs V0 |" in (out / dataset / "summary.md").read_text()
    combined = (out / "summary.md").read_text()
    assert "# Ablation summary: copy" in combined and "# Ablation summary: mqar" in combined
    assert "[ablation] run 2/2: mqar V0" in r.stdout
    assert not (tmp_path / "no-data-needed").exists()  # generated on the fly: nothing prepared


def test_a_matrix_out_dir_on_the_command_line_is_not_every_runs_out_dir():
    """`make train ARGS="--out-dir runs/x"` names the matrix's directory: each
    step still trains into its own OUT_DIR/<step>/, not all into runs/x."""
    from gpt2.ablation_runner import step_command

    cmd = step_command(".config", "V19", Path("runs/x/V19"), "x", ["--out-dir", "runs/x", "--max-iters", "5"], False)
    assert parse_args(cmd[cmd.index("--config") + 2:]).out_dir == "runs/x/V19"


def test_the_trainers_seed_is_not_taken_for_the_runners_seeds():
    from gpt2.ablation_runner import runner_parser

    ours, extra = runner_parser().parse_known_args(["--config", ".config", "--seed", "2", "--seeds", "3,4"])
    assert ours.seeds == "3,4" and extra == ["--seed", "2"]
    ours, extra = runner_parser().parse_known_args(["--config", ".config", "--seed", "2"])
    assert ours.seeds is None and extra == ["--seed", "2"]
