"""What a suite shows: summary and significance tables, the exported models' latency beside
static, the plots, and the docs/RESULTS.md markers rebuilt from files."""

from __future__ import annotations

import csv
import math

import pytest

from padnet.cli.main import main
from padnet.train.evidence import (
    curve_stats,
    holm_adjust,
    plot_curves,
    plot_layer_ratios,
    render_table,
    significance_table,
    summary_table,
    welch_test,
)
from tiny_data import write_tiny_npz

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(spec: dict[str, list[float]]) -> list[dict[str, str]]:
    return [{"variant": v, "method": "none" if v == "static" else "dyconv",
             "dynamic_ratio": "0.0" if v == "static" else "1.0" if v == "dynamic" else v[4:],
             "stored_params": "100", "val_acc": str(a), "test_acc": str(a)}
            for v, accs in spec.items() for a in accs]


def test_summary_table_gives_mean_and_sample_std_per_variant() -> None:
    rows = [{"variant": "pad", "dynamic_ratio": "0.3", "stored_params": "1000",
             "val_acc": v, "test_acc": t} for v, t in (("0.5", "0.6"), ("0.7", "0.8"))]
    table = summary_table(rows).splitlines()
    assert table[2] == "| pad | 2 | 0.300 | 1,000 | 0.6000 ± 0.1414 | 0.7000 ± 0.1414 |"


def test_summary_table_puts_the_exported_latency_beside_each_accuracy() -> None:
    rows = _rows({"static": [0.5, 0.5], "pad_0.3": [0.6, 0.6]})
    latency = [{"variant": v, "batch": b, "ratio_to_static": r, "deployed_params": p}
               for v, b, r, p in (("static", 1, 1.02, 50), ("static", 32, 0.99, 50),
                                  ("pad_0.3", 1, 1.5, 70), ("pad_0.3", 32, 2.25, 70))]
    table = summary_table(rows, latency).splitlines()
    assert table[0].endswith("| exported params | latency ×static b=1 | latency ×static b=32 |")
    assert table[3].endswith("| 70 | 1.50 | 2.25 |")


def test_welch_test_matches_the_textbook_value() -> None:
    # means 2 and 5, variances 1 and 1, n = 3 each: t = -3/sqrt(2/3) = -3.674, df = 4,
    # two-sided p = 0.02131 (t tables)
    diff, p = welch_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert diff == -3.0
    assert math.isclose(p, 0.02131, abs_tol=5e-5)


def test_welch_test_of_constant_samples_and_too_few_values() -> None:
    assert welch_test([0.5, 0.5], [0.5, 0.5]) == (0.0, 1.0)
    assert welch_test([0.6, 0.6], [0.5, 0.5])[1] == 0.0
    with pytest.raises(ValueError, match="at least 2 values per side, got 1 and 3"):
        welch_test([1.0], [1.0, 2.0, 3.0])


def test_welch_test_with_one_constant_sample_is_the_one_sample_test() -> None:
    # var_a = 0: t = (mean_a - mean_b) / sqrt(var_b / n_b) with n_b - 1 degrees of freedom,
    # i.e. the one-sample t-test of b against mean_a (three seeds with the same accuracy happen)
    from scipy import stats

    b = [0.75, 0.772, 0.761]
    diff, p = welch_test([0.76] * 3, b)
    assert diff == pytest.approx(0.76 - sum(b) / 3)
    assert p == pytest.approx(stats.ttest_1samp(b, 0.76).pvalue, rel=1e-9)


def test_significance_table_compares_every_variant_with_the_reference() -> None:
    rows = _rows({"static": [0.80, 0.81, 0.79], "dynamic": [0.90, 0.91, 0.89],
                  "pad_0.3": [0.905, 0.895, 0.90], "pad_0.5": [0.9]})
    table = significance_table(rows).splitlines()
    assert table[0] == "| variant | test_acc − dynamic | Welch p | Holm p | at 0.05 (Holm) |"
    assert table[2] == "| static | -0.1000 | 0.000 | 0.001 | lower |"  # p 0.00026, x 2
    assert table[3] == "| pad_0.3 | +0.0000 | 1.000 | 1.000 | no difference shown |"
    assert table[4] == "| pad_0.5 | | | | too few seeds |"
    with pytest.raises(ValueError, match="reference variant 'moe' is not in the results"):
        significance_table(rows, reference="moe")


def test_holm_adjustment_matches_the_hand_computation() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 with m = 4: 4 x 0.005, 3 x 0.01, 2 x 0.03, then 1 x 0.04
    # raised to the running maximum 0.06; returned in the input order
    got = holm_adjust([0.01, 0.04, 0.03, 0.005])
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.6, 0.9]) == [1.0, 1.0] and holm_adjust([]) == []
    assert holm_adjust([0.02]) == [0.02]  # one comparison: unchanged


def test_one_borderline_p_among_ten_is_not_significant_after_holm() -> None:
    spread = [0.0, 0.01, -0.01]
    rows = _rows({"ref": [0.5 + d for d in spread],
                  "up": [0.525 + d for d in spread],  # alone: p < 0.05
                  **{f"v{i}": [0.5 + d + 0.001 * i for d in spread] for i in range(9)}})
    table = significance_table(rows, reference="ref").splitlines()
    (up,) = [line for line in table if line.startswith("| up |")]
    cells = [c.strip() for c in up.strip("|").split("|")]
    assert float(cells[2]) < 0.05 <= float(cells[3]) and cells[4] == "no difference shown"


def test_render_table_reads_its_marker(tmp_path) -> None:
    path = tmp_path / "r.csv"
    rows = _rows({"static": [0.5, 0.6], "dynamic": [0.7, 0.8]})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert render_table("r.csv", tmp_path) == summary_table(rows)
    assert render_table("significance r.csv reference=static", tmp_path) == \
        significance_table(rows, reference="static")
    other = tmp_path / "ablations.csv"
    abl = _rows({"pad_0.3": [0.9, 0.92]})
    for r in abl:
        r["variant"] = "no_scale"
    with other.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(abl[0]))
        writer.writeheader()
        writer.writerows(abl)
    assert render_table("significance ablations.csv reference=dynamic from=r.csv",
                        tmp_path) == significance_table(
        [r for r in rows if r["variant"] == "dynamic"] + abl, reference="dynamic")
    with pytest.raises(ValueError, match="unknown kind 'plot'"):
        render_table("plot r.csv", tmp_path)


def test_latency_and_report_of_a_finished_suite(tmp_path, capsys) -> None:
    npz = write_tiny_npz(tmp_path / "tiny.npz")
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: tiny\n"
        f"out_dir: {tmp_path / 'out'}\n"
        "config: {dataset: npz, data_root: " + str(npz) + ", model: resnet8, width: 4, "
        "batch_size: 16, epochs: 1, lr: 0.05, method: dyconv, num_kernels: 2, "
        "test_fraction: 0.25}\n"
        "seeds: [0, 1]\n"
        "variants:\n"
        "  static: {method: none}\n"
        "  dynamic: {}\n"
        "  pad_0.5: {dynamic_ratio: 0.5, imp_mode: interleaved, imp_iterations: 1}\n")
    assert main(["sweep", str(suite), "--report", str(tmp_path / "doc")]) == 2
    assert "results.csv does not exist: run `padnet sweep" in capsys.readouterr().err
    assert main(["sweep", str(suite)]) == 0
    assert main(["sweep", str(suite), "--latency", "--reps", "2", "--batch-sizes", "1,4"]) == 0
    lat = list(csv.DictReader((tmp_path / "out" / "latency.csv").open()))
    assert [(r["variant"], r["batch"]) for r in lat] == [
        (v, b) for v in ("static", "dynamic", "pad_0.5") for b in ("1", "4")]
    assert all(float(r["ratio_to_static"]) > 0 for r in lat)
    params = {r["variant"]: int(r["deployed_params"]) for r in lat}
    assert params["static"] < params["pad_0.5"] < params["dynamic"]
    capsys.readouterr()
    assert main(["sweep", str(suite), "--report", str(tmp_path / "doc")]) == 0
    out = capsys.readouterr().out
    for name in ("tiny.csv", "tiny_latency.csv", "tiny_kappa.png", "tiny_params.png",
                 "tiny_layers.png", "tiny_curves.png"):
        assert (tmp_path / "doc" / name).stat().st_size > 0
    # the learning curves are every run's metrics.csv, row for row
    curves = list(csv.DictReader((tmp_path / "doc" / "tiny_curves.csv").open()))
    assert sorted({r["run"] for r in curves}) == sorted(
        f"{v}-seed{s}" for v in ("static", "dynamic", "pad_0.5") for s in (0, 1))
    for row in curves:
        metrics = list(csv.DictReader((tmp_path / "out" / row["run"] / "metrics.csv").open()))
        (same,) = [m for m in metrics if m["epoch"] == row["epoch"]]
        assert (row["val_acc"], row["train_loss"]) == (same["val_acc"], same["train_loss"])
    assert "<!-- table: summary" in out and "latency ×static b=4" in out
    assert "<!-- table: significance" in out and "| pad_0.5 |" in out
    # a moved suite: --out-dir (and any config key) reaches --latency and --report as well
    (tmp_path / "out").rename(tmp_path / "moved")
    flags = ["--out-dir", str(tmp_path / "moved"), "--threads", "1"]
    assert main(["sweep", str(suite), "--latency", "--reps", "1", "--batch-sizes", "2",
                 *flags]) == 0
    assert (tmp_path / "moved" / "latency.csv").is_file()
    assert main(["sweep", str(suite), "--report", str(tmp_path / "doc2"), *flags]) == 0
    assert (tmp_path / "doc2" / "tiny_latency.csv").stat().st_size > 0


def test_curve_stats_average_each_epoch_over_the_seeds() -> None:
    rows = [{"variant": "a", "epoch": "1", "val_acc": "0.5"},
            {"variant": "a", "epoch": "1", "val_acc": "0.7"},
            {"variant": "a", "epoch": "2", "val_acc": "0.8"},
            {"variant": "a", "epoch": "2", "val_acc": ""},  # not evaluated that epoch
            {"variant": "b", "epoch": "2", "val_acc": "0.9"},
            {"variant": "b", "epoch": "1", "val_acc": "0.6"}]
    stats = curve_stats(rows, "val_acc")
    assert list(stats) == ["a", "b"]
    (e1, m1, s1, n1), (e2, m2, s2, n2) = stats["a"]
    assert (e1, n1, e2, n2) == (1.0, 2, 2.0, 1)
    assert m1 == pytest.approx(0.6) and s1 == pytest.approx(math.sqrt(0.02))
    assert (m2, s2) == (pytest.approx(0.8), 0.0)
    assert [p[0] for p in stats["b"]] == [1.0, 2.0]  # sorted by epoch


def test_paper_table_puts_our_gain_beside_the_paper_claim(tmp_path) -> None:
    rows = _rows({"dynamic": [0.80, 0.82], "pad_0.3": [0.83, 0.85]})
    with (tmp_path / "r.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "claims.csv").write_text(
        "setting,kappa,paper_setting,paper_gain,results,variant,reference\n"
        "ours,0.3,ResNet-50 ImageNet,0.7,r.csv,pad_0.3,dynamic\n"
        "text,0.5,BERT GLUE,1.9,missing.csv,pad_0.5,moe\n")
    _, p = welch_test([0.83, 0.85], [0.80, 0.82])
    table = render_table("paper claims.csv", tmp_path).splitlines()
    assert table[2] == f"| ours | 0.3 | +3.00 | {p:.3f} | 2 / 2 | ResNet-50 ImageNet | +0.7 |"
    assert table[3] == "| text | 0.5 | not run yet |  |  | BERT GLUE | +1.9 |"


def test_update_tables_fills_placeholders_and_refreshes_tables(tmp_path) -> None:
    from padnet.train.evidence import update_tables

    rows = _rows({"static": [0.5, 0.6], "dynamic": [0.7, 0.8]})
    with (tmp_path / "r.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    doc = tmp_path / "doc.md"
    doc.write_text("# R\n\n<!-- table: summary r.csv -->\nTABLE\n\ntext\n\n"
                   "<!-- table: significance r.csv -->\n| old | table |\n|---|---|\n\nend\n")
    assert update_tables(doc, tmp_path) == 2
    text = doc.read_text()
    assert summary_table(rows) + "\n\ntext" in text
    assert significance_table(rows) + "\n\nend" in text and "old" not in text


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the plotting functions write, kept open for inspection."""
    import padnet.train.evidence as evidence

    figures = []
    real = evidence._save_figure
    monkeypatch.setattr(evidence, "_save_figure",
                        lambda fig, path: (figures.append(fig), real(fig, path)))
    return figures


def test_learning_curves_of_eleven_variants_have_eleven_colours(tmp_path, saved_figures):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    rows = [{"variant": f"v{i}", "epoch": e, "train_loss": 1 / e + i, "val_acc": 0.1 * e}
            for i in range(11) for e in (1, 2)]
    plot_curves(rows, tmp_path / "curves.png")
    (fig,) = saved_figures
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == 11 and len({to_rgba(line.get_color()) for line in lines}) == 11


def test_layer_ratio_plot_of_eleven_runs_and_a_run_without_imp(tmp_path, saved_figures) -> None:
    pytest.importorskip("matplotlib")
    import json

    runs = []
    for i in range(11):  # more runs than the default colour cycle has colours
        run = tmp_path / f"v{i}-seed0"
        run.mkdir()
        layers = [{"name": f"layer{j}", "dynamic_ratio": (i + j) / 20} for j in range(3)]
        (run / "summary.json").write_text(json.dumps({"imp": {"layers": layers}}))
        runs.append(run)
    out = plot_layer_ratios(runs, tmp_path / "plots" / "layers.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bars = saved_figures[0].axes[0].containers  # one group of bars per run, each its colour
    assert len({tuple(group.patches[0].get_facecolor()) for group in bars}) == 11
    static = tmp_path / "static-seed0"
    static.mkdir()
    (static / "summary.json").write_text(json.dumps({"imp": None}))
    with pytest.raises(ValueError, match="no IMP record"):
        plot_layer_ratios([static], tmp_path / "x.png")
