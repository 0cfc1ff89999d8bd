"""gpt2/compare.py and scripts/compare_runs.py: pooled seeds, paired per-seed differences, recall columns,
iterations and tokens per step, and no comparison of runs that trained unequal tokens."""

import json

from gpt2.compare import INVALID, context_use_line, load_run, summary_table, write_comparison
from gpt2.compare_cli import main


def fake_run(root, seed, step, loss, acc=None, far=None, iters=100):
    d = root / f"seed{seed}" / step
    d.mkdir(parents=True)
    summary = {"step": step, "final_val_loss": loss, "tokens_per_s": 100.0, "iters": iters, "tokens": iters * 2048,
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
    assert lines[0].startswith("| step | runs | iters | tokens | final val loss | ppl | vs V0 | vs V19 | V elements/head")
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|---|---|"
    v19 = lines[3].split(" | ")
    assert v19[2:5] == ["100", "204,800", "3.6000 +- 0.5000"]
    assert v19[6] == "+0.1000 +- 0.0000 (paired, 3 seeds)"
    assert "No V0 checkpoint" not in context_use_line(runs) and "unknown" in context_use_line(runs)


def test_recall_runs_show_accuracy_and_far_accuracy_vs_v0(tmp_path):
    runs = [fake_run(tmp_path, 1, "V0", 0.1, 1.0, 1.0), fake_run(tmp_path, 2, "V0", 0.2, 0.98, 0.96),
            fake_run(tmp_path, 1, "V19", 2.0, 0.6, 0.5), fake_run(tmp_path, 2, "V19", 2.2, 0.62, 0.46)]
    lines = summary_table(runs).splitlines()
    assert "| acc | far acc | far acc vs V0 |" in lines[0]
    v19 = lines[3].split(" | ")
    assert v19[8] == "0.610 +- 0.014" and v19[9] == "0.480 +- 0.028"
    assert v19[10] == "-0.5000 +- 0.0000 (paired, 2 seeds)"


def test_steps_that_trained_different_token_counts_are_marked_invalid(tmp_path, capsys):
    # what a per-step time cap did: V21 stopped at 87 iterations while V0 ran 110
    runs = [fake_run(tmp_path, 1, "V0", 5.20, iters=110), fake_run(tmp_path, 1, "V19", 5.22, iters=110),
            fake_run(tmp_path, 1, "V21", 5.30, iters=87)]
    dirs = [r["dir"] for r in runs]
    text = write_comparison(dirs, tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert md == text and f"**{INVALID}: the runs trained different token counts (V0 225,280; V19 225,280; " \
                          f"V21 178,176)" in md
    rows = {line.split(" | ")[0]: line.split(" | ") for line in md.splitlines() if line.startswith("| V")}
    assert rows["| V21"][2:4] == ["87", "178,176"] and rows["| V0"][2:4] == ["110", "225,280"]
    assert rows["| V21"][6:8] == ["invalid", "invalid"]  # no difference to V0 or V19 presented as a result
    assert "%" not in md
    record = json.loads((tmp_path / "summary.json").read_text())
    assert record["valid"] is False and "different token counts" in record["invalid_reason"]
    assert record["steps"]["V21"]["tokens"] == [178176] and record["steps"]["V0"]["iters"] == [110]
    assert main([str(d) for d in dirs]) == 1  # the command says so too

    equal = tmp_path / "equal"
    runs = [fake_run(equal, 1, "V0", 5.20), fake_run(equal, 1, "V21", 5.30)]
    text = write_comparison([r["dir"] for r in runs], equal)
    assert INVALID not in text and "+0.1000 (+1.92%)" in text
    assert json.loads((equal / "summary.json").read_text())["valid"] is True


def test_a_difference_that_rests_on_one_run_says_so_in_the_table(tmp_path):
    """One seed per step: every difference is marked "single run: not resolved"; the
    reference's own row says "reference"; with several seeds of V0 and one of V19
    the table gives V0's seed-to-seed spread beside the mark."""
    runs = [fake_run(tmp_path, 1, "V0", 5.20), fake_run(tmp_path, 1, "V19", 5.30)]
    rows = {line.split(" | ")[0]: line.split(" | ") for line in summary_table(runs).splitlines()
            if line.startswith("| V")}
    assert rows["| V0"][6] == "reference" and rows["| V19"][7] == "reference"
    assert rows["| V19"][6] == "+0.1000 (+1.92%) (single run: not resolved)"
    assert rows["| V0"][7] == "-0.1000 (-1.89%) (single run: not resolved)"
    more = tmp_path / "more"
    runs = [fake_run(more, 1, "V0", 5.0), fake_run(more, 2, "V0", 5.2), fake_run(more, 1, "V19", 5.3)]
    v19 = [line for line in summary_table(runs).splitlines() if line.startswith("| V19")][0].split(" | ")
    assert v19[6] == "+0.2000 (+3.92%) (single run: not resolved, seed-to-seed sd 0.1414)"
