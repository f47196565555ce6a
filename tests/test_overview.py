"""The landing page and the experiment index, from run directories written by hand: what they show, and that the
landing page survives the templating and reStructuredText rendering Snakemake's report applies to it."""

import re

import pandas as pd
import pytest
import yaml
from docutils.core import publish_parts
from jinja2 import Environment

from diffattr import overview


def make_run(root, name, overrides=(), lds=True, figures=("general_influence", "topk_tracin", "topk_trak")):
    run = root / name
    (run / "tables").mkdir(parents=True)
    (run / "figures").mkdir()
    (run / "manifest.yaml").write_text(yaml.safe_dump({"run": name, "overrides": ["experiment=digits", *overrides],
                                                       "stages": {}}))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"name": "digits"}, "model": {"name": "tiny"},
                                                     "attribution": {"methods": ["tracin", "trak"]}}))
    general = [{"method": m, "query_kind": kind, "k": 10, "threshold": t, "n_general": n + i, "n_distinct": 40 + i,
                "n_queries": 84, "ratio_to_tracin": (n + i) / n}
               for i, m in enumerate(["tracin", "trak"]) for kind in ("train", "all")
               for t, n in ((0.1, 22), (0.25, 13))]
    pd.DataFrame(general).to_csv(run / "tables" / "general_influence.csv", index=False)
    pd.DataFrame({"method": ["tracin", "trak"], "n_queries": [32, 32], "top1": [0.03125, 0.5625],
                  "top5": [0.0625, 0.65625]}).to_csv(run / "tables" / "tracing.csv", index=False)
    if lds:
        rows = [(m, v, kind, mean) for (m, v, mean) in (("tracin", "tracin", -0.118), ("trak", "trak", 0.04),
                                                        ("control", "random", -0.027), ("seeds", "reliability", 0.25),
                                                        ("seeds", "attainable", 0.5))
                for kind in ("test", "generated")]
        pd.DataFrame([{"method": m, "variant": v, "query_kind": k, "n_queries": 36, "n_subsets": 64, "n_seeds": 1,
                       "lds_mean": mean + (k == "generated") * 0.01, "ci_low": mean - 0.1, "ci_high": mean + 0.1}
                      for m, v, k, mean in rows]).to_csv(run / "tables" / "lds.csv", index=False)
    for f in figures:
        (run / "figures" / f"{f}.png").write_bytes(b"png")
    return run


def render_like_snakemake(rst: str, report_files: list[str]) -> str:
    """What snakemake.report does with the workflow description: Jinja with its ``files``, then docutils."""

    class Record:
        def __init__(self, target):
            self.target = target

    links = "\n\n" + "\n".join(f".. _{t}: javascript:app.showResultInfo('{t}')" for t in report_files)
    text = Environment(trim_blocks=True, lstrip_blocks=True).from_string(rst + links).render(
        files=[Record(t) for t in report_files])
    return publish_parts(text, writer_name="html")["html_body"]


def test_headline_tables_carry_the_runs_numbers_lds_first(tmp_path):
    run = make_run(tmp_path, "default")
    tables = overview.headline_tables(run)
    captions = list(tables)
    assert captions[0].startswith("LDS") and len(captions) == 3
    lds = tables[captions[0]].set_index("method")
    assert lds.loc["trak", "test"] == "0.040 [-0.060, 0.140]"
    assert lds.loc["trak", "generated"] == "0.050 [-0.060, 0.140]"
    assert lds.loc["attainable (seeds)", "test"] == "0.500 [0.400, 0.600]"
    assert lds.loc["reliability (seeds)", "test"] == "0.250 [0.150, 0.350]"
    general = tables[captions[1]].set_index("method")  # the pooled query kind only
    assert general.loc["trak", "n_general >= 10%"] == 23 and general.loc["trak", "n_general >= 25%"] == 14
    assert general.loc["trak", "ratio_to_tracin"] == pytest.approx(23 / 22)
    assert "top-10" in captions[1] and general.loc["trak", "n_queries"] == 84
    assert tables[captions[2]].top1.tolist() == [0.03125, 0.5625]
    (run / "tables" / "lds.csv").unlink()
    assert not any(c.startswith("LDS") for c in overview.headline_tables(run))


def test_the_landing_page_renders_its_tables_and_links_only_the_figures_the_report_holds(tmp_path):
    run = make_run(tmp_path, "default", overrides=["attribution.proj_dim=512"])
    html = render_like_snakemake(overview.landing_page("digits", [run]), ["general_influence.png", "topk_trak.png"])
    assert "<h1" in html and "Run default of experiment digits" in html
    assert "attribution.proj_dim=512" in html and "experiment=digits" not in html
    for table in overview.headline_tables(run).values():
        rows = re.findall(r"<tr>\s*<td>(.*?)</td>", overview._html_table(table), re.S)
        for method in table.iloc[:, 0]:
            assert method in rows
        assert overview._html_table(table) in html  # the raw block reaches the page untouched
    assert "0.040 [-0.060, 0.140]" in html
    assert "showResultInfo('general_influence.png')" in html and "showResultInfo('topk_trak.png')" in html
    assert "showResultInfo('topk_tracin.png')" not in html and "topk_tracin.png" in html  # named, not linked
    assert html.count(overview.FIGURE_GUIDE["topk"]) == 1  # one sentence for every method's top-k figure
    assert "System Message" not in html and "problematic" not in html  # docutils met nothing it could not parse


def test_the_index_lists_every_run_and_sweep_with_overrides_and_headline_numbers(tmp_path):
    root = tmp_path / "digits"
    make_run(root, "default")
    make_run(root, "attribution.proj_dim=512", overrides=["attribution.proj_dim=512"], lds=False)
    (root / "stages").mkdir()  # not a run
    sweep = root / "sweeps" / "proj"
    sweep.mkdir(parents=True)
    pd.DataFrame({"run": ["default", "attribution.proj_dim=512"], "method": ["trak", "trak"]}).to_csv(
        sweep / "summary.csv", index=False)
    rows = overview.index_rows(overview.run_dirs_of(root)).set_index("run")
    assert list(rows.index) == ["attribution.proj_dim=512", "default"]
    assert rows.loc["default", "best LDS (test)"] == "trak 0.040"  # the references are not candidates
    assert rows.loc["default", "attainable LDS"] == "test 0.500, generated 0.510"
    assert pd.isna(rows.loc["attribution.proj_dim=512", "best LDS (test)"])
    assert rows.loc["default", "best tracing top-1"] == "trak 0.56"
    assert rows.loc["attribution.proj_dim=512", "overrides"] == "attribution.proj_dim=512"
    page = overview.index_page(root)
    assert 'href="attribution.proj_dim=512/"' in page and 'href="default/"' in page
    assert "Experiment digits: 2 runs" in page and "stages" not in re.sub(r"<style>.*?</style>", "", page)
    assert "proj</b> (2 runs" in page and 'href="sweeps/proj/summary.csv"' in page


def test_refresh_writes_nothing_before_a_run_and_both_pages_after(tmp_path):
    root = tmp_path / "digits"
    assert overview.refresh("digits", root, [root / "default"]) is None
    assert not root.exists()
    run = make_run(root, "default")
    landing = overview.refresh("digits", root, [run])
    assert landing == run / "report.rst" and "Run default" in landing.read_text()
    assert "default" in (root / "index.html").read_text()
    assert not list(root.rglob("*.tmp"))


def test_a_damaged_table_leaves_the_pages_as_they_were_and_says_so(tmp_path):
    root = tmp_path / "digits"
    run = make_run(root, "default")
    landing = overview.refresh("digits", root, [run])
    before = landing.read_text()
    (run / "tables" / "tracing.csv").write_bytes(b"\x00\xff not a table")
    with pytest.warns(UserWarning, match="not refreshed"):
        assert overview.refresh("digits", root, [run]) is None
    assert landing.read_text() == before
