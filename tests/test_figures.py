"""The figures: one palette, one way to save, legible log axes, and labels a reader can use without the tables."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from PIL import Image

from diffattr import metrics
from diffattr.data import ImageSet
from diffattr.figures import attribution as figs
from diffattr.figures import style
from diffattr.figures.lds import lds_cost_figure, lds_figure
from diffattr.figures.norms import norm_at_recorded_timestep_figure, norm_vs_timestep_figure
from diffattr.figures.sweep import lds_summary_figure, summary_figure
from diffattr.methods import colours, variants

SCORES = np.array([[5.0, 4.0, 0.0, 0.0, 0.0, -1.0],
                   [5.0, 0.0, 4.0, 0.0, 0.0, -1.0],
                   [0.0, 0.0, 0.0, 4.0, 5.0, -1.0]])
TRAIN_IDS = np.array([10, 11, 12, 13, 14, 15])


def _rendered(fig: Figure):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _lds_table(methods, kinds=("test", "generated")) -> pd.DataFrame:
    rows = [(m, m, 0.1 * i) for i, m in enumerate(methods)] + [("control", "random", 0.0),
                                                                ("seeds", "reliability", 0.16), ("seeds", "attainable", 0.4)]
    return pd.DataFrame([{"method": m, "variant": v, "query_kind": kind, "n_queries": 8, "n_subsets": 16,
                          "n_seeds": 1, "lds_mean": x, "ci_low": x - 0.1, "ci_high": x + 0.1}
                         for m, v, x in rows for kind in kinds])


def test_every_registered_method_has_its_own_colour():
    registered = list(variants())
    assert set(colours()) == set(registered)  # every built-in family declares its variants' colours
    drawn = [to_hex(style.method_colour(m)) for m in registered]
    assert len(set(drawn)) == len(drawn)
    greys = {to_hex(c) for c in (*style.REFERENCE_COLOURS.values(), style.OUTLIER_COLOUR)}
    assert not greys & set(drawn)  # no method can be read as a reference line


def test_an_unknown_method_gets_the_same_colour_in_every_process():
    here = to_hex(style.method_colour("toy_random"))
    code = "from matplotlib.colors import to_hex; from diffattr.figures.style import method_colour; " \
           "print(to_hex(method_colour('toy_random')))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert here == there


def test_a_method_has_the_same_colour_in_every_figure():
    methods = ["tracin", "retrac", "trak"]
    want = {m: to_rgb(style.method_colour(m)) for m in methods}
    hist = figs.general_influence_histograms({m: metrics.topk_counts(SCORES, 2) for m in methods},
                                             dict.fromkeys(methods, 3), 2, 0.5)
    scatter = figs.score_vs_grad_norm({m: SCORES.mean(0) for m in methods}, np.arange(1, 7.0))
    bars = lds_figure(_lds_table(methods))
    cost = _lds_table(methods).query("method in @methods").assign(job_variants=lambda t: t.variant,
                                                                   job_wall_s=lambda t: 10.0 + t.index)
    points = lds_cost_figure(cost)
    table = pd.DataFrame([{"run": r, "k": r, "method": m, "tracing_top1": 0.5} for r in ("a", "b") for m in methods])
    lines = summary_figure(table, ["k"])
    bars_of = lambda ax: next(c for c in ax.containers if isinstance(c, BarContainer))  # noqa: E731
    for i, m in enumerate(methods):
        assert to_rgb(hist.axes[i].patches[0].get_facecolor()) == want[m]
        assert to_rgb(scatter.axes[i].collections[0].get_facecolor()[0]) == want[m]
        assert to_rgb(bars_of(bars.axes[0]).patches[i].get_facecolor()) == want[m]
        assert to_rgb(points.axes[0].containers[i].lines[0].get_color()) == want[m]
        assert to_rgb(next(ln for ln in lines.axes[0].get_lines() if ln.get_label() == m).get_color()) == want[m]


def test_save_writes_the_pdf_then_the_150_dpi_png_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    written = []
    real = style.save_figure
    monkeypatch.setattr(style, "save_figure", lambda fig, path, **kw: (real(fig, path, **kw), written.append(path)))
    fig = Figure(figsize=(4, 2))
    fig.subplots().plot([0, 1], [1, 0])
    style.save(fig, tmp_path / "f.png")
    assert [p.name for p in written] == ["f.pdf", "f.png"]  # the declared output last
    dpi = Image.open(tmp_path / "f.png").info["dpi"]
    assert dpi == pytest.approx((150, 150), abs=0.5)
    assert (tmp_path / "f.pdf").read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pdf", "f.png"]
    with pytest.raises(ValueError, match="png"):
        style.save(fig, tmp_path / "g.pdf")


@pytest.mark.parametrize("low, high", [(0.4, 0.6), (0.15, 0.9), (0.2, 30.0), (1.0, 1e4)])
def test_a_log_axis_has_a_few_short_distinct_labels_that_do_not_overlap(low, high):
    fig = Figure(figsize=(3.2, 2.8))
    ax = fig.subplots()
    ax.scatter(np.geomspace(low, high, 50), np.arange(50))
    style.log_axis(ax, "x")
    renderer = _rendered(fig)
    lo, hi = ax.get_xlim()
    labels = [t for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
    texts = [t.get_text() for t in labels]
    assert 2 <= len(texts) <= 8 and len(set(texts)) == len(texts), texts
    assert all(len(t) <= 5 and "10^" not in t and "times" not in t for t in texts), texts
    assert not any(t.get_text() for t in ax.xaxis.get_minorticklabels())
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), texts


def test_score_panels_share_the_norm_axis_but_not_the_score_axis():
    fig = figs.score_vs_grad_norm({"tracin": SCORES.mean(0), "retrac": 100 * SCORES.mean(0)},
                                  np.linspace(0.4, 0.6, 6), is_outlier=np.arange(6) < 2)
    _rendered(fig)
    a, b = fig.axes[:2]
    assert a.get_xlim() == b.get_xlim() and a.get_ylim() != b.get_ylim()
    assert to_hex(a.collections[1].get_facecolor()[0]) == to_hex(style.OUTLIER_COLOUR)  # planted outliers


def test_topk_titles_name_the_query_kind_and_class_not_its_id():
    train_set = ImageSet(torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor(TRAIN_IDS),
                         torch.zeros(6, dtype=torch.bool), ["cat", "dog"])
    queries = pd.DataFrame({"query_id": [11, 1_000_003, 2_000_001], "query_kind": ["train", "test", "generated"],
                            "label": [1, 0, -1]})
    table = metrics.topk_table(SCORES, queries.query_id, TRAIN_IDS, k=6)
    fig = figs.topk_figure(table, queries, torch.rand(3, 1, 8, 8) * 2 - 1, train_set, k=6)
    titles = [ax.get_title() for ax in fig.axes]
    assert [titles[0], titles[7], titles[14]] == ["train\ndog", "held-out test\ncat", "generated"]
    assert titles[1] == "cat\n5"  # the top-1 training image of the first query: id 10, label 0
    assert not any("query" in t or "2000001" in t for t in titles)


def _norm_tables():
    rng = np.random.default_rng(0)
    grid = pd.DataFrame([{"checkpoint": c, "loss_type": "l2", "sample_id": s, "timestep": t,
                          "norm": 1 / (1 + t) + rng.random()} for c in ("epoch_0001", "epoch_0002")
                         for s in range(4) for t in (0, 10, 100, 999)])
    recorded = pd.DataFrame([{"checkpoint": c, "loss_type": "l2", "sample_id": s, "timestep": int(rng.integers(1000)),
                              "norm": rng.random() + 0.5} for c in ("epoch_0001", "epoch_0002") for s in range(20)])
    return grid, recorded


def test_the_norm_figures_draw_t_plus_one_on_a_log_timestep_axis(tmp_path):
    grid, recorded = _norm_tables()
    fig = norm_vs_timestep_figure(grid, recorded, "log")
    curve, hist = fig.axes
    assert curve.get_xscale() == hist.get_xscale() == "log" and "t + 1" in hist.get_xlabel()
    assert curve.get_lines()[0].get_xdata().min() == 1  # t = 0 is shown
    assert sum(len(p.get_xy()) > 0 for p in hist.patches) == 2  # a histogram of the recorded t per checkpoint
    style.save(fig, tmp_path / "n.png")
    style.save(norm_at_recorded_timestep_figure(recorded, "log"), tmp_path / "r.png")
    assert norm_vs_timestep_figure(grid, recorded).axes[1].get_xscale() == "linear"


def test_method_figures_fit_the_page_with_a_dozen_methods():
    methods = list(colours())[:15]
    assert lds_figure(_lds_table(methods)).get_size_inches()[0] <= 9
    keys = [f"attribution.k{i}" for i in range(5)]
    sweep = pd.concat([_lds_table(methods).assign(run=f"r{v}", **{k: v for k in keys}) for v in (1, 2)])
    assert lds_summary_figure(sweep.reset_index(drop=True), keys).get_size_inches()[0] <= 10


def test_each_general_influence_panel_counts_what_the_table_counts_over_its_own_queries():
    rng = np.random.default_rng(0)
    scores = {"tracin": rng.normal(size=(12, 30)), "journey_trak": rng.normal(size=(4, 30))}  # generated only
    scores["journey_trak"][:, :3] += 5  # three examples top every query of Journey-TRAK
    fig = figs.general_influence_histograms({m: metrics.topk_counts(s, 3) for m, s in scores.items()},
                                            {m: len(s) for m, s in scores.items()}, 3, 0.5)
    for ax, (method, s) in zip(fig.axes, scores.items()):
        shown = int(next(t.get_text() for t in ax.texts if "in >=" in t.get_text()).split()[0])
        assert shown == metrics.general_influence(s, 3, 0.5)["n_general"]
    assert fig.axes[1].get_title() == "journey_trak (4 queries)" and fig.axes[0].get_title() == "tracin"
