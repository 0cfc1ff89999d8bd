"""scripts/compare_runs.py: pooled seeds, paired per-seed differences, recall columns."""

import json

from scripts.compare_runs import context_use_line, load_run, summary_table


def fake_run(root, seed, step, loss, acc=None, far=None):
    d = root / f"seed{seed}" / step
    d.mkdir(parents=True)
    summary = {"step": step, "final_val_loss": loss, "tokens_per_s": 100.0,
               "v_cache": {"elements_per_head": 64, "bytes_per_head": 256}}
    if acc is not None:
        summary.update(val_acc=acc, val_acc_far=far)
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.jsonl").write_text("")
    return load_run(d)


def test_seeded_steps_get_paired_differences(tmp_path):
    # V19 is 0.10 worse than V0 in every seed, though seeds differ by far more than that
    runs = [fake_run(tmp_path, 1, "V0", 3.0), fake_run(tmp_path, 2, "V0", 3.5), fake_run(tmp_path, 3, "V0", 4.0),
            fake_run(tmp_path, 1, "V19", 3.1), fake_run(tmp_path, 2, "V19", 3.6), fake_run(tmp_path, 3, "V19", 4.1)]
    lines = summary_table(runs).splitlines()
    assert lines[0].startswith("| step | runs | final val loss | ppl | vs V0 | vs V19 | V elements/head")
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|"
    v19 = lines[3].split(" | ")
    assert v19[2] == "3.6000 +- 0.5000"
    assert v19[4] == "+0.1000 +- 0.0000 (paired, 3 seeds)"
    assert "No V0 checkpoint" not in context_use_line(runs) and "unknown" in context_use_line(runs)


def test_recall_runs_show_accuracy_and_far_accuracy_vs_v0(tmp_path):
    runs = [fake_run(tmp_path, 1, "V0", 0.1, 1.0, 1.0), fake_run(tmp_path, 2, "V0", 0.2, 0.98, 0.96),
            fake_run(tmp_path, 1, "V19", 2.0, 0.6, 0.5), fake_run(tmp_path, 2, "V19", 2.2, 0.62, 0.46)]
    lines = summary_table(runs).splitlines()
    assert "| acc | far acc | far acc vs V0 |" in lines[0]
    v19 = lines[3].split(" | ")
    assert v19[6] == "0.610 +- 0.014" and v19[7] == "0.480 +- 0.028"
    assert v19[8] == "-0.5000 +- 0.0000 (paired, 2 seeds)"
