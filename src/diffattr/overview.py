"""What a reader sees first: the report's landing page for the runs of one invocation, and ``index.html``, every run
and sweep under an experiment with its overrides and headline numbers.

Both are views over the files a run left on disk (its config, manifest and tables), so they hold whatever exists
when they are written: the LDS once ``snakemake validate`` ran, the removal once ``snakemake removal`` did. The
Snakefile writes them when it is parsed (so ``snakemake --report`` shows the tables of now) and after every
successful invocation (so the index lists the run just finished).
"""

from __future__ import annotations

import functools
import html
import math
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd
import yaml

from .atomic import write_text
from .checkpoints import read_index
from .layout import pattern
from .lds import ATTAINABLE, REFERENCES as REFERENCE_METHODS

# What to look for in each figure, one sentence each; topk_<method> share one.
FIGURE_GUIDE = {
    "norm_vs_timestep": "How far the per-sample gradient norm moves with the timestep t: a spread of orders of "
                        "magnitude is the bias that makes TracIn favour examples drawn at high-norm timesteps.",
    "norm_at_recorded_timestep": "The norms TracIn's training side actually uses, each example at the timestep it "
                                 "was drawn: a vertical spread wider than the differences between images means the "
                                 "draw, not the image, ranks the examples.",
    "general_influence": "A long right tail means a few training images top most unrelated queries (general "
                         "influence); a method that ranks by relevance keeps the tail short.",
    "score_vs_grad_norm": "A cloud that rises to the right means the method's score follows the gradient norm (the "
                          "timestep bias); a flat cloud is free of it.",
    "topk": "Whether the top-6 training images resemble their query (class, shape, colour); a training image "
            "queried should find itself first.",
    "lds": "Methods whose bar clears the grey band (random scores) towards the hatched one (the LDS attainable "
           "under the training noise) predict what retraining on a subset does; overlapping intervals do not "
           "separate methods.",
    "lds_cost": "Up and to the left is better: counterfactual accuracy per second of attribution.",
    "removal": "If a method's top-k really made an image, retraining without them moves the regenerated image "
               "further than removing as many random training images.",
}
SWEEP_GUIDE = {"summary": "How each headline metric moves with the swept values, a line per method.",
               "lds": "What each swept knob buys counterfactually: LDS against its values, a line per method it moves."}
FIGURE_ORDER = ("norm_vs_timestep", "norm_at_recorded_timestep", "general_influence", "score_vs_grad_norm", "lds",
                "lds_cost", "removal", "topk")
_CSS = ("table.diffattr{border-collapse:collapse;font-size:0.85em;margin:0.4em 0 1.2em}"
        "table.diffattr th,table.diffattr td{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "table.diffattr th:first-child,table.diffattr td:first-child{text-align:left}"
        "table.index th,table.index td{text-align:left;vertical-align:top;word-break:break-word;max-width:28em}")


def _read_yaml(path: Path) -> dict:
    """A run's config or manifest, parsed once per version of the file (the index and the landing page both read
    them, at every parse of the workflow); callers only read it."""
    if not path.is_file():
        return {}
    stat = path.stat()
    return _parse_yaml(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=512)
def _parse_yaml(path: str, mtime_ns: int, size: int) -> dict:
    # libyaml's loader where PyYAML has it: manifests are long, and the pure-Python one took most of an index's time
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _table(run_dir: Path, name: str) -> pd.DataFrame | None:
    path = run_dir / "tables" / name
    return pd.read_csv(path) if path.is_file() else None


def _interval(mean, low, high) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def overrides(run_dir: Path) -> list[str]:
    """The run's overrides as given, without the experiment."""
    return [o for o in _read_yaml(run_dir / "manifest.yaml").get("overrides", []) if not o.startswith("experiment=")]


def facts(run_dir: Path) -> list[str]:
    """One line each on the data, the model and its training, the queries and the methods of a run."""
    run_dir = Path(run_dir)
    cfg, manifest = _read_yaml(run_dir / "config.yaml"), _read_yaml(run_dir / "manifest.yaml")
    stages = {name: run_dir / s["dir"] for name, s in manifest.get("stages", {}).items() if "dir" in s}
    d, m, t, a = cfg.get("data", {}), cfg.get("model", {}), cfg.get("train", {}), cfg.get("attribution", {})
    lines = []
    split = {s: stages["data"] / s / "index.parquet" for s in ("train", "test")} if "data" in stages else {}
    if split and all(p.is_file() for p in split.values()):
        train, test = (pd.read_parquet(p) for p in split.values())
        outliers = int(train.is_outlier.sum()) if "is_outlier" in train else 0
        lines.append(f"data: {d.get('name')}, {len(train)} training and {len(test)} test images, "
                     f"{d.get('resolution')}x{d.get('resolution')} px, {d.get('channels')} channel(s), "
                     f"{train.label.nunique()} classes" + (f", {outliers} planted outliers" if outliers else ""))
    unet = m.get("unet", {})
    params = _parameter_count(stages.get("train"))
    lines.append(f"model: UNet2DModel '{m.get('name')}', channels {unet.get('block_out_channels')}, "
                 f"{', '.join(unet.get('down_block_types', []))}" + (f", {params / 1e6:.2f} M parameters"
                                                                    if params else "")
                 + f"; DDPM, T = {m.get('num_train_timesteps')}, {m.get('beta_schedule')} betas")
    if "train" in stages and (stages["train"] / "checkpoints" / "index.json").is_file():
        ckpts = read_index(stages["train"] / "checkpoints")
        last = ckpts[-1]
        lines.append(f"training: {last.epoch} epochs, {last.step + 1} steps of batch {last.batch_size} "
                     f"({t.get('optimizer')}, lr {t.get('lr')}, {t.get('loss')} loss, draws {t.get('draws')}), "
                     f"{len(ckpts)} checkpoints, final mean loss {last.mean_loss:.4f}")
    queries = stages["queries"] / "queries.parquet" if "queries" in stages else None
    if queries is not None and queries.is_file():
        q = pd.read_parquet(queries)
        counts = q[~q.heldout].query_kind.value_counts()
        lines.append("queries: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("train", "test", "generated"))
                     + f" reported; {int(q.heldout.sum())} held out to choose lambda")
    lines.append(f"methods ({len(a.get('methods', []))}): {', '.join(a.get('methods', []))}")
    tuned = _table(run_dir, "lds_lambda.csv")
    if tuned is not None and "bracketed" in tuned and tuned.chosen.any():  # (tables written before 2026-12-06: no)
        chosen = tuned[tuned.chosen]
        lines.append(f"lambda by the held-out queries' LDS on {chosen.n_subsets.iloc[0]} subsets set aside "
                     "(validate.tune_subsets): " + ", ".join(
                         f"{r.variant} {r.lam:g}" + ("" if r.bracketed else " (not bracketed: at the end of the "
                                                     "values tried)") for r in chosen.itertuples()))
    return lines


def _parameter_count(train_dir: Path | None) -> int | None:
    """From the last checkpoint's safetensors header: no model is built."""
    if train_dir is None:
        return None
    files = sorted((train_dir / "checkpoints").glob("epoch_*/unet/*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    with safe_open(files[-1], "numpy") as f:  # only shapes are read: no torch (Snakemake calls this as it parses)
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


def headline_tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    """The run's findings as small tables, titled, in reading order; only those whose source table exists."""
    run_dir = Path(run_dir)
    out = {}
    lds = _table(run_dir, "lds.csv")
    if lds is not None:
        lds = lds.assign(value=[_interval(*r) for r in lds[["lds_mean", "ci_low", "ci_high"]].to_numpy()])
        wide = lds.pivot_table(index="variant", columns="query_kind", values="value", aggfunc="first", sort=False)
        wide = wide.reindex(pd.unique(lds.variant))[list(pd.unique(lds.query_kind))]
        references = lds[lds.method.isin(list(REFERENCE_METHODS))].drop_duplicates("variant")
        wide = wide.rename(index={r.variant: f"{r.variant} ({r.method})" for r in references.itertuples()})
        out["LDS: Spearman correlation with retraining on random subsets, mean [95% interval]"] = \
            wide.rename_axis(None, axis=1).reset_index().rename(columns={"variant": "method"})
    general = _table(run_dir, "general_influence.csv")
    if general is not None:
        pooled = general[general.query_kind == "all"]
        wide = pooled.pivot_table(index="method", columns="threshold", values="n_general", aggfunc="first",
                                  sort=False)
        wide.columns = [f"n_general >= {c:.0%}" for c in wide.columns]
        per_method = pooled.groupby("method", sort=False)
        table = wide.assign(n_distinct=per_method.n_distinct.first(), n_queries=per_method.n_queries.first(),
                            ratio_to_tracin=per_method.ratio_to_tracin.first()).reindex(pd.unique(pooled.method))
        out[f"General influence: training images in the top-{int(pooled.k.iloc[0])} of at least the given share of "
            "the method's queries (every reported query it scores)"] = table.reset_index()
    tracing = _table(run_dir, "tracing.csv")
    if tracing is not None and len(tracing):
        out["Image tracing: share of training-image queries that rank themselves first / in the top 5"] = tracing
    outliers = _table(run_dir, "outliers.csv")
    if outliers is not None:
        out["Planted outliers: share among in-class queries' top-10, and self-influence AUROC"] = outliers[
            ["method", "outlier_fraction_top10", "outlier_fraction_in_train_set", "self_influence_auroc"]]
    removal = _table(run_dir, "removal_summary.csv")
    if removal is not None:
        removal = removal.assign(median_l2=[_interval(*r) for r in
                                            removal[["median_l2", "l2_ci_low", "l2_ci_high"]].to_numpy()])
        columns = ["method", "fraction", "k", "n_queries", "median_l2"]
        if "random_quantile" in removal:  # (tables written before 2026-12-06: beats_random)
            removal = removal.assign(random_quantile=[
                _interval(*r) if pd.notna(r[0]) else "" for r in
                removal[["random_quantile", "quantile_ci_low", "quantile_ci_high"]].to_numpy()])
            columns += ["random_quantile", "p_value"]
        out["Removal: median pixel L2 (pixels in [-1, 1]) of the regenerated image after retraining without the "
            "top-k [95% interval], and its quantile among random removals of as many images"] = removal[columns]
    return out


def _html_table(table: pd.DataFrame) -> str:
    return table.to_html(index=False, classes="diffattr", border=0, float_format=lambda v: f"{v:.3g}",
                         na_rep="-")


def figures(run_dir: Path) -> list[tuple[list[str], str]]:
    """The run's figures (file names) grouped with what to look for in them, in reading order; the top-k figures
    of every method share one entry."""
    groups: dict[str, list[str]] = {}
    for path in sorted((Path(run_dir) / "figures").glob("*.png")):
        groups.setdefault("topk" if path.stem.startswith("topk_") else path.stem, []).append(path.name)
    order = {name: i for i, name in enumerate(FIGURE_ORDER)}
    return [(names, FIGURE_GUIDE.get(kind, "")) for kind, names in
            sorted(groups.items(), key=lambda item: order.get(item[0], len(order)))]


def _rst_title(text: str, underline: str) -> str:
    return f"{text}\n{underline * len(text)}\n"


def _rst_html(markup: str) -> str:
    """A raw-HTML block, kept out of the Jinja templating Snakemake applies to the page."""
    body = "\n".join("   " + line for line in markup.splitlines())
    return f"{{% raw %}}\n.. raw:: html\n\n{body}\n\n{{% endraw %}}\n"


def _figure_list(groups: list[tuple[list[str], str]]) -> str:
    """Each figure as a link into the report where the report holds it (Snakemake's ``files``), else by name."""
    lines = ['{% set targets = files|map(attribute="target")|list %}']
    for names, sentence in groups:
        links = ", ".join(f'{{% if "{n}" in targets %}}`{n}`_{{% else %}}``{n}``{{% endif %}}' for n in names)
        lines.append(f"- {links}: {sentence}")
    return "\n".join(lines) + "\n"


def landing_page(experiment: str, run_dirs: Sequence[Path], sweep_dir: Path | None = None) -> str:
    """The report's first page (reStructuredText for Snakemake's ``report:``): for one run its overrides, sizes,
    headline tables and what to look for in each figure; for a sweep the same for each run, after the sweep's own."""
    run_dirs = [Path(r) for r in run_dirs]
    parts = [_rst_html(f"<style>{_CSS}</style>")]  # the report's own layout: profiles/default/report.css
    if sweep_dir is not None:
        parts.append(_rst_title(f"Sweep {Path(sweep_dir).name} of experiment {experiment}: {len(run_dirs)} runs",
                                "="))
        parts.append(_rst_html(_html_table(index_rows(run_dirs))))
        parts.append(_figure_list([([p.name], SWEEP_GUIDE.get(p.stem, ""))
                                   for p in sorted(Path(sweep_dir).glob("*.png"))]))
    for run_dir in run_dirs:
        title = f"Run {run_dir.name}" + ("" if sweep_dir else f" of experiment {experiment}")
        parts.append(_rst_title(title, "-" if sweep_dir else "="))
        given = overrides(run_dir)
        parts.append("Overrides: " + (", ".join(f"``{o}``" for o in given) if given else
                                      "none (the experiment's defaults)") + "\n")
        parts.append("\n".join(f"- {line}" for line in facts(run_dir)) + "\n")
        for caption, table in headline_tables(run_dir).items():
            parts.append(f"**{caption}**\n")
            parts.append(_rst_html(_html_table(table)))
        if sweep_dir is None:
            parts.append(_rst_title("Figures", "-"))
            parts.append(_figure_list(figures(run_dir)))
    return "\n".join(parts)


def index_rows(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """One row per run: its overrides and, per method family of headline numbers, the best method and its value."""
    rows = []
    for run_dir in map(Path, run_dirs):
        row = {"run": run_dir.name, "overrides": "\n".join(overrides(run_dir)) or "(the experiment's defaults)"}
        lds = _table(run_dir, "lds.csv")
        if lds is not None:
            real = lds[~lds.method.isin(list(REFERENCE_METHODS))]
            for kind, part in real.groupby("query_kind", sort=False):
                best = part.loc[part.lds_mean.idxmax()]
                row[f"best LDS ({kind})"] = f"{best.variant} {best.lds_mean:.3f}"
            attainable = lds[lds.variant == ATTAINABLE]
            if len(attainable):
                row["attainable LDS"] = ", ".join(f"{r.query_kind} {r.lds_mean:.3f}" for r in attainable.itertuples())
        general = _table(run_dir, "general_influence.csv")
        if general is not None:
            pooled = general[(general.query_kind == "all") & (general.threshold == general.threshold.min())]
            row[f"n_general >= {pooled.threshold.iloc[0]:.0%} (min / max)"] = \
                f"{pooled.n_general.min()} / {pooled.n_general.max()}"
        tracing = _table(run_dir, "tracing.csv")
        if tracing is not None and len(tracing):
            best = tracing.loc[tracing.top1.idxmax()]
            row["best tracing top-1"] = f"{best.method} {best.top1:.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def run_dirs_of(root: Path) -> list[Path]:
    """Every run directory under an experiment's results (those with a manifest), by name."""
    return sorted(p.parent for p in Path(root).glob("*/manifest.yaml"))


def index_page(root: Path) -> str:
    """``results/<experiment>/index.html``: every run and sweep under ``root``, linked, with overrides and headline
    numbers, and each run's headline tables folded below."""
    root = Path(root)
    runs = run_dirs_of(root)
    e = html.escape
    body = [f"<h1>Experiment {e(root.name)}: {len(runs)} run{'s' * (len(runs) != 1)}</h1>",
            "<p>Each run's tables and figures are in its directory; <code>snakemake --report</code> gives the report "
            "of the runs of one command.</p>"]
    if runs:
        # a run is named by its overrides: they are the link, one per line, so long lists wrap
        table = index_rows(runs)
        table.insert(0, "run (its overrides)", [
            f'<a href="{e(r.name)}/" title="{e(r.name)}">{e(o).replace(chr(10), "<br>")}</a>'
            for r, o in zip(runs, table.pop("overrides"))])
        body.append(table.drop(columns="run").to_html(index=False, classes="diffattr index", border=0, escape=False,
                                                      na_rep="-"))
    sweeps = sorted(p for p in (root / "sweeps").glob("*") if p.is_dir())
    if sweeps:
        body.append("<h2>Sweeps</h2><ul>")
        for sweep in sweeps:
            tables = [pd.read_csv(t) for t in sorted(sweep.glob("*.csv"))]
            members = sorted({r for t in tables if "run" in t for r in t.run.astype(str)})
            links = " ".join(f'<a href="sweeps/{e(sweep.name)}/{e(p.name)}">{e(p.name)}</a>'
                             for p in sorted(sweep.iterdir()) if p.suffix in (".csv", ".png"))
            body.append(f"<li><b>{e(sweep.name)}</b> ({len(members)} runs: {e(', '.join(members))}): {links}</li>")
        body.append("</ul>")
    if runs:
        body.append("<h2>Each run's headline tables</h2>")
    for run_dir in runs:
        body.append(f'<details><summary>{e(run_dir.name)}</summary><ul>'
                    + "".join(f"<li>{e(line)}</li>" for line in facts(run_dir)) + "</ul>")
        for caption, table in headline_tables(run_dir).items():
            body.append(f"<p><b>{e(caption)}</b></p>" + _html_table(table))
        body.append("<p>" + " ".join(f'<a href="{e(run_dir.name)}/figures/{e(name)}">{e(name)}</a>'
                                     for names, _ in figures(run_dir) for name in names) + "</p></details>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>diffattr: "
            f"{e(root.name)}</title><style>body{{font-family:sans-serif;margin:1.5em}}{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def refresh(experiment: str, root: Path, run_dirs: Sequence[Path], sweep_dir: Path | None = None) -> Path | None:
    """Rewrite the experiment's ``index.html`` and the landing page of these runs (the run's, or for a sweep the
    sweep's); return the landing page's path, None where no run has been computed yet."""
    root, run_dirs = Path(root), [Path(r) for r in run_dirs]
    computed = [r for r in run_dirs if (r / "manifest.yaml").is_file()]
    if not computed:
        return None
    landing = Path(pattern("sweep_landing", root, sweep=Path(sweep_dir).name) if sweep_dir else
                   pattern("landing", root, run=run_dirs[0].name))
    try:
        index, page = index_page(root), landing_page(experiment, computed, sweep_dir)
    except Exception as e:  # a view never stops the workflow: a damaged table is the DAG's to redo, not the parser's
        warnings.warn(f"the report's landing page and {root}/index.html were not refreshed: {e!r}")
        return None
    write_text(pattern("index", root), index)
    write_text(landing, page)
    return landing
