"""compare_lightly.py: the side-by-side table (by hand), our side of the comparison on tiny
settings, and the peer side when lightly is installed (it is an optional extra:
requirements-peer.txt)."""

import importlib.util

import pytest

import compare_lightly

TINY = ["--synthetic-size", "32", "--batch-size", "8", "--hidden-dim", "32", "--proj-dim", "16",
        "--image-size", "32"]


def test_table_reports_mean_and_spread_per_epoch_and_the_gain():
    curves = {"ours": [{0: 80.0, 5: 84.0}, {0: 82.0, 5: 88.0}],
              "peer": [{0: 80.0, 5: 83.0}, {0: 82.0, 5: 83.0}]}
    lines = compare_lightly.table(curves, {"ours": 10.0, "peer": 20.0}).splitlines()
    # stdev of (80, 82) = sqrt(2)
    assert lines[2] == "| 0 (random init) | 81.0 +- 1.4 | 81.0 +- 1.4 |"
    assert lines[3] == "| 5 | 86.0 +- 2.8 | 83.0 +- 0.0 |"
    assert lines[4] == "| gain over init | 5.0 +- 1.4 | 2.0 +- 1.4 |"  # gains (4, 6) and (3, 1)
    assert lines[5] == "| wall time per run (s) | 10 | 20 |"


def test_our_side_runs_byol_with_the_passed_flags_and_reads_its_knn_curve():
    curve = compare_lightly.run_ours("synthetic", 2, 1, 0, TINY)
    assert sorted(curve) == [0, 1, 2] and all(0 <= value <= 100 for value in curve.values())


@pytest.mark.skipif(importlib.util.find_spec("lightly") is None,
                    reason="lightly not installed (optional extra)")
def test_peer_side_trains_and_scores_with_the_same_monitor():
    curve = compare_lightly.run_peer("synthetic", 1, 1, 0, batch_size=64, synthetic_size=128)
    assert sorted(curve) == [0, 1] and all(0 <= value <= 100 for value in curve.values())


def test_report_header_repeats_the_whole_command_with_byol_flags(tmp_path):
    report = tmp_path / "table.md"
    command = ["--data", "synthetic", "--epochs", "1", "--knn-every", "1", "--seeds", "0",
               "--synthetic-size", "32", "--only", "ours", "--report", str(report), "--", *TINY]
    curves = compare_lightly.main(command)
    header = report.read_text().splitlines()[0]
    assert header.startswith(f"`python compare_lightly.py {' '.join(command)}`"), header
    assert list(curves) == ["ours"] and sorted(curves["ours"][0]) == [0, 1]
