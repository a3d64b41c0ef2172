"""Smoke tests of the quality benchmark on tiny settings (seconds), plus its pure parts.

The real run (docs/benchmarks.md) takes minutes; here the same code runs on a
few hundred digits rows with a few epochs, and the assertions check numbers
that hold even at that size (retraining is its own reference; an original that
saw a whole class is far from a model that never did).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import __main__ as bench_main
from bench import quality
from bench.datasets import forget_set, load
from unlearn import audit

pytestmark = pytest.mark.job

torch.set_num_threads(1)


def test_forget_sets_of_three_kinds() -> None:
    digits = load("digits")
    n = len(digits.train)
    random = forget_set(digits, "random", 0)
    assert len(random.forget) == round(0.1 * n)
    assert np.array_equal(random.labels, digits.train.y)  # random forgetting keeps the true labels
    klass = forget_set(digits, "class", 1)
    assert set(digits.train.y[klass.forget]) == {1}
    assert np.count_nonzero(digits.train.y == 1) == len(klass.forget)
    assert 1 not in set(digits.test.y[klass.test_rows])  # TA counts the remaining classes only
    flipped = forget_set(digits, "mislabelled", 0)
    assert np.all(flipped.labels[flipped.forget] != digits.train.y[flipped.forget])  # every label is wrong
    keep = np.setdiff1d(np.arange(n), flipped.forget)
    assert np.array_equal(flipped.labels[keep], digits.train.y[keep])
    assert np.array_equal(forget_set(digits, "mislabelled", 0).forget, flipped.forget)  # deterministic


def _logits(confidence: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Two-class logits whose softmax gives each sample ``confidence`` on its label."""
    logits = np.zeros((len(labels), 2))
    logits[np.arange(len(labels)), labels] = np.log(confidence / (1 - confidence))
    return logits


def test_mia_efficacy_tells_memorised_from_unseen() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    members = _logits(rng.uniform(0.97, 0.999, 400), labels)  # the model is sure of its training rows
    unseen = _logits(rng.uniform(0.55, 0.9, 400), labels)
    retain, heldout = (members[:200], labels[:200]), (unseen[:200], labels[:200])
    still_remembered = audit.mia_efficacy(retain, heldout, (members[200:], labels[200:]))
    forgotten = audit.mia_efficacy(retain, heldout, (unseen[200:], labels[200:]))
    assert still_remembered.value < 5.0
    assert forgotten.value > 95.0
    assert forgotten.n == 200
    assert forgotten.low < forgotten.value <= forgotten.high  # Clopper-Pearson, in percent


def _row(method: str, seed: int, gap_metrics: tuple[float, float, float, float], seconds: list[float]) -> dict:
    ua, ra, ta, mia = gap_metrics
    return {
        "dataset": "d",
        "kind": "random",
        "method": method,
        "seed": seed,
        "ua": ua,
        "ra": ra,
        "ta": ta,
        "mia": mia,
        "gap": 0.0,
        "seconds": seconds,
    }


def test_summary_gap_of_means_floor_goal_and_speedup() -> None:
    rows = [
        _row(quality.RETRAIN, 0, (10, 100, 90, 20), [10.0]),
        _row(quality.RETRAIN, 1, (12, 100, 90, 22), [14.0]),
        _row(quality.FLOOR, 0, (14, 100, 88, 20), [12.0]),
        _row(quality.FLOOR, 1, (14, 100, 88, 26), [12.0]),
        _row("m", 0, (9, 100, 90, 21), [1.0, 2.0]),
        _row("m", 1, (13, 100, 90, 21), [1.0, 0.0]),
    ]
    summary = {e["method"]: e for e in quality.summarise(rows)}
    # Gap of the means (SalUn's tables): m's means equal retrain's, whatever each seed's difference.
    assert summary["m"]["avgGap"] == pytest.approx(0.0)
    assert summary[quality.FLOOR]["avgGap"] == pytest.approx((3 + 0 + 2 + 2) / 4)
    assert summary["m"]["ua"]["std"] == pytest.approx(np.std([9, 13], ddof=1))  # ddof 1
    # Speed-up: every retraining's mean time over the method's mean time (a ratio of repeated timings).
    assert summary["m"]["speedup"] == pytest.approx(12.0 / 1.0)
    target, floor = quality.goal(list(summary.values()), "d", "random")
    assert floor == pytest.approx(1.75)
    assert target == pytest.approx(1.75)  # the floor, being above 1.0


def test_avg_gap_is_the_mean_absolute_difference() -> None:
    ref = {"ua": 10.0, "ra": 100.0, "ta": 90.0, "mia": 20.0}
    assert quality.avg_gap({"ua": 12.0, "ra": 99.0, "ta": 90.0, "mia": 17.0}, ref) == pytest.approx(1.5)


def test_variant_parsing_and_errors() -> None:
    variant = quality.parse_variant("scrub:retain_epochs=2,retain_subset=300,forget_lr=0.001")
    hyper = variant.hyper(seed=4)
    assert (hyper.method, hyper.retain_epochs, hyper.retain_subset, hyper.forget_lr, hyper.seed) == (
        "scrub",
        2,
        300,
        0.001,
        4,
    )
    assert isinstance(hyper.retain_epochs, int)
    with pytest.raises(ValueError, match="not a hyper-parameter"):
        quality.parse_variant("scrub:epochs=2")
    with pytest.raises(ValueError, match="unknown method"):
        quality.parse_variant("sgd:forget_lr=1")


def test_docs_update_touches_only_the_generated_part(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\n\n## Job throughput\nkeep me\n\n{quality.DOCS_BEGIN}\nold\n{quality.DOCS_END}\n\ntail\n")
    quality.update_docs(doc, "new table")
    assert doc.read_text() == (
        f"# B\n\n## Job throughput\nkeep me\n\n{quality.DOCS_BEGIN}\nnew table\n{quality.DOCS_END}\n\ntail\n"
    )
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="markers not found"):
        quality.update_docs(tmp_path / "bare.md", "x")


def test_tiny_quality_run_writes_tables_plot_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, md, png = tmp_path / "q.json", tmp_path / "q.md", tmp_path / "q.png"
    tiny = [
        "--datasets",
        "digits",
        "--kinds",
        "class",
        "--seeds",
        "1",
        "--epochs",
        "4",
        "--samples",
        "240",
        "--repeats",
        "2",
    ]
    code = quality.main([*tiny, "--out", str(out), "--markdown", str(md), "--plot", str(png)])
    assert code == 0
    result = json.loads(out.read_text())
    methods = [row["method"] for row in result["runs"]]
    assert methods == [quality.RETRAIN, quality.FLOOR, quality.ORIGINAL, *quality.VARIANTS]
    rows = {row["method"]: row for row in result["runs"]}
    assert rows["retrain"]["gap"] == 0.0
    assert rows["retrain"]["ua"] == 100.0  # a model that never saw class 0 never predicts it
    # The reference and the floor are retrained from seeds that share nothing with the original's (seed 0).
    assert rows[quality.RETRAIN]["hyper"]["seed"] == quality.REFERENCE_SEED
    assert rows[quality.FLOOR]["hyper"]["seed"] == quality.FLOOR_SEED
    # The original saw the whole class: far from the retrained model, whatever the tiny recipe.
    assert rows["original"]["gap"] > 10.0
    for row in result["runs"]:
        for metric in ("ua", "ra", "ta", "mia"):
            assert 0.0 <= row[metric] <= 100.0
        if row["method"] not in ("original", "retrain"):
            assert len(row["seconds"]) == (1 if row["method"] == quality.FLOOR else 2)
            assert min(row["seconds"]) > 0
    summary = {e["method"]: e for e in result["summary"]}
    assert summary[quality.FLOOR]["avgGap"] == pytest.approx(rows[quality.FLOOR]["gap"])  # one seed
    assert all(e["speedup"] > 0 for e in summary.values() if e["method"] != quality.ORIGINAL)
    assert rows[quality.TUNED]["attempts"][0]["verdict"] in ("Passed", "Failed")
    tables = md.read_text()
    assert "#### digits, class forgetting" in tables
    assert f"**{quality.default_method()}** (default)" in tables
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Avg. Gap" in capsys.readouterr().out


def test_bench_command_lists_and_rejects(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main.main([]) == 0
    assert "quality" in capsys.readouterr().out
    assert bench_main.main(["nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_published_tables_match_the_published_results() -> None:
    """docs/benchmarks.md's generated part is exactly what bench/results/quality.json renders (no drift)."""
    root = Path(__file__).resolve().parents[2]
    result = json.loads((root / "bench" / "results" / "quality.json").read_text())
    doc = (root / "docs" / "benchmarks.md").read_text()
    published = doc.split(quality.DOCS_BEGIN, 1)[1].split(quality.DOCS_END, 1)[0]
    assert published.strip() == quality.render(result).strip()
    assert result["settings"]["seeds"] >= 3
    assert set(result["settings"]["datasets"]) == {"digits", "mnist1d"}
    assert set(result["settings"]["kinds"]) == {"random", "class", "mislabelled"}


def test_results_run_in_parts_merge_into_the_whole() -> None:
    """``--from A.json B.json``: runs split by dataset (as the calibrated results were run) give the summary of
    all of them at once, with the seeds counted per dataset and every command kept."""
    root = Path(__file__).resolve().parents[2]
    whole = json.loads((root / "bench" / "results" / "quality-calibrated.json").read_text())
    datasets = list(dict.fromkeys(r["dataset"] for r in whole["runs"]))
    assert len(datasets) > 1
    parts = [
        {**whole, "command": f"run {d}", "runs": [r for r in whole["runs"] if r["dataset"] == d]} for d in datasets
    ]
    merged = quality.merge(parts)
    assert merged["runs"] == whole["runs"]
    assert merged["summary"] == quality.summarise(whole["runs"])
    assert merged["command"] == "; ".join(f"run {d}" for d in datasets)
    seeds = {d: len({r["seed"] for r in whole["runs"] if r["dataset"] == d}) for d in datasets}
    assert merged["settings"]["seeds"] == " and ".join(f"{n} ({d})" for d, n in seeds.items())
    assert merged["wallSeconds"] == pytest.approx(len(datasets) * whole["wallSeconds"])


def test_published_calibrated_tables_match_their_results() -> None:
    """docs/benchmarks.md's calibrated section is what bench/results/quality-calibrated.json renders, real MNIST
    (the third dataset) included."""
    root = Path(__file__).resolve().parents[2]
    result = json.loads((root / "bench" / "results" / "quality-calibrated.json").read_text())
    doc = (root / "docs" / "benchmarks.md").read_text()
    begin, end = "<!-- bench quality calibrated: begin", "<!-- bench quality calibrated: end -->"
    published = doc.split(begin, 1)[1].split("-->", 1)[1].split(end, 1)[0]
    assert published.strip() == quality.render(result).strip()
    assert set(result["settings"]["datasets"]) == {"digits", "mnist1d", "mnist"}
    assert result["settings"]["defaultMethod"] == "calibrated"
