"""The quality benchmark's smoke run: its five rows and JSON keys, on a small synthetic stream."""

from __future__ import annotations

import math

from bench import quality


def test_quality_benchmark_runs_every_row_on_a_small_stream(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(quality, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr("bench.results.RESULTS_DIR", tmp_path)
    figures = quality.main(["--dataset", "synthetic", "--limit", "4000", "--eval-users", "50", "--quick"])
    rows = figures["rows"]
    assert len(rows) == 7 and all(len(r["recall10"]) == 9 for r in rows.values())
    for key in ("online_auc", "frozen_auc", "hashed_auc", "nofilter_auc"):
        assert 0.5 < figures[key] <= 1.0, (key, figures[key])  # synthetic clusters are learnable
    for key in ("online_recall10", "popularity_recall10", "frozen_recall10"):
        assert 0.0 <= figures[key] <= 1.0 and not math.isnan(figures[key])
    assert (tmp_path / "quality_synthetic_quick.png").stat().st_size > 10_000
    assert (tmp_path / "quality_synthetic_quick.json").exists()
