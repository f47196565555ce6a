"""The counterfactual validation's two stages: a job that trains and measures a chunk of subset models, and the
run's LDS report (``snakemake validate``; docs/METHODS.md §5).

The report compares every method of ``attribution.methods`` on the same queries, those of ``validate.query_kinds``
that are not held out, and on the same subsets, those :func:`diffattr.subsets.report_subsets` keeps. The held-out
queries, on the other subsets (``validate.tune_subsets``), choose the ridge lambda of every family that can be
re-scored at another lambda (``Family.retune``: TRAK, D-TRAK, DAS, K-FAC, EK-FAC) by their mean LDS, as D-TRAK and
TRAK tune it (``tables/lds_lambda.csv``): the subset models' training noise is shared by every query, so a lambda
chosen on the reported subsets would partly fit the very noise the reported LDS is measured against, an edge the
untuned methods never get. Beside the methods the report gives a random-score control (LDS about 0), the
reliability r of the measured outputs (how well one training seed's outputs predict another's; under coupled draws,
how well seed 0's predict those of the same draws in other batches) and the LDS attainable against the target
actually used (``validate.seeds`` averaged: docs/METHODS.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from . import lds
from .artifacts import read_scores, read_table, read_tensors
from .atomic import atomic_path, write_csv, write_parquet
from .checkpoints import last_checkpoint, load_checkpoint_unet
from .data import ImageSet
from .exceptions import StageError
from .layout import Layout
from .methods import comparisons, family_of, requested_families, shard_count, step_target_family
from .models import build_scheduler
from .queries import load_queries
from .subsets import (MIN_SUBSETS, chunks, masks, masks_table, model_outputs, output_timesteps, report_subsets,
                      subset_models, train_subset_model)


def measured_queries(cfg: DictConfig, layout: Layout) -> tuple[pd.DataFrame, torch.Tensor]:
    """The queries whose outputs are measured: those of ``validate.query_kinds`` (held-out ones included: they
    choose tuned knobs)."""
    table, images = load_queries(layout)
    keep = table.query_kind.isin(list(cfg.validate.query_kinds)).to_numpy(copy=True)  # pandas' view is read-only
    return table[keep].reset_index(drop=True), images[torch.from_numpy(keep)]


def run_chunk(cfg: DictConfig, layout: Layout, first: int, last: int, device: torch.device) -> None:
    """Train (or reuse) the models at positions ``first..last`` of the validation's list, measure F on the queries
    (and the per-step targets of ``Family.step_targets``), and write their ``output_chunk``. Each model's
    outputs are kept as a part, so an interrupted job resumes."""
    models = subset_models(cfg)[first:last + 1]
    if not models:
        raise StageError(f"no validation model at positions {first}..{last}; the list has {len(subset_models(cfg))}")
    train_set = ImageSet.load(layout.path("data", split="train"))
    queries, images = measured_queries(cfg, layout)
    ids = queries.query_id.to_numpy()
    scheduler = build_scheduler(cfg.model)
    timesteps = output_timesteps(cfg)
    use_ema = cfg.sample.use_ema  # the generating weights: what sampled the queries
    full_directory = layout.path("checkpoint_index").parent
    generating = lambda: load_checkpoint_unet(last_checkpoint(full_directory), ema=use_ema).to(device)  # noqa: E731
    stepped = step_target_family()
    steps = stepped.step_targets.measurer(cfg, queries, generating, scheduler) if stepped else None
    frames = []
    for model in tqdm(models, desc="validate", unit="model"):
        part = layout.path("output_parts", model=model.name)
        if not part.exists():
            if model.is_full:
                directory = full_directory
            else:
                directory = layout.path("subset_model", model=model.name)
                if not (directory / "checkpoints" / "index.json").exists():  # written last: the model is complete
                    train_subset_model(cfg, directory, train_set, model, device)
                directory = directory / "checkpoints"
            last_ckpt = last_checkpoint(directory)
            unet = load_checkpoint_unet(last_ckpt, ema=use_ema).to(device)
            out = model_outputs(unet, scheduler, images, ids, timesteps, cfg.validate.output_noises,
                                cfg.validate.seed, cfg.train.loss, cfg.validate.batch_size)
            targets = steps.measure(unet) if steps else None
            measured = pd.concat([pd.DataFrame({"query_id": ids, "step": -1, "output": out}),
                                  pd.DataFrame(columns=PART_COLUMNS) if targets is None else targets],
                                 ignore_index=True)
            if not np.isfinite(measured.output).all():
                raise StageError(f"non-finite measured output of {model.name} ({last_ckpt}); its training diverged: "
                                 "lower train.lr or enable train.grad_clip")
            write_parquet(measured, part)
        frames.append(read_table(part, "validate_chunk", PART_COLUMNS)
                      .assign(model=model.name, subset=model.subset, seed=model.slot))
    table = pd.concat(frames, ignore_index=True)[CHUNK_COLUMNS]
    write_parquet(table, layout.path("output_chunk", first=first, last=last))


def output_arrays(table: pd.DataFrame, n_subsets: int, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From the chunks' F rows (step -1): outputs [M, S, Q] (NaN where subset m has no seed s) and the full
    model's [Q]."""
    table = table[table.step < 0]
    n_seeds = int(table.seed.max()) + 1
    col = pd.Index(query_ids).get_indexer(table.query_id)
    if (col < 0).any():
        raise StageError("measured outputs name queries the run does not have; delete the outputs stage and rerun")
    full = table.subset < 0
    outputs = np.full((n_subsets, n_seeds, len(query_ids)), np.nan)
    sub = table[~full]
    outputs[sub.subset.to_numpy(), sub.seed.to_numpy(), col[~full.to_numpy()]] = sub.output.to_numpy()
    full_outputs = np.full(len(query_ids), np.nan)
    full_outputs[col[full.to_numpy()]] = table.output[full].to_numpy()
    return outputs, full_outputs


def step_arrays(table: pd.DataFrame, n_subsets: int, query_ids: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """From the chunks' per-step rows: Journey-TRAK's targets [M, S, Q, T] at the sampling ``steps`` (NaN where a
    query has none: every kind but generated images)."""
    sub = table[(table.step >= 0) & (table.subset >= 0)]
    col, step = pd.Index(query_ids).get_indexer(sub.query_id), pd.Index(steps).get_indexer(sub.step)
    if (col < 0).any() or (step < 0).any():
        raise StageError("the measured per-step targets name queries or steps the run's Journey-TRAK scores do not "
                         "have; delete the outputs stage and rerun")
    out = np.full((n_subsets, int(table.seed.max()) + 1, len(query_ids), len(steps)), np.nan)
    out[sub.subset.to_numpy(), sub.seed.to_numpy(), col, step] = sub.output.to_numpy()
    return out


def chunk_files(cfg: DictConfig, layout: Layout) -> list:
    return [layout.path("output_chunk", first=first, last=last) for first, last in chunks(cfg)]


@dataclass
class Evaluation:
    """What every number of the LDS report is computed from: the training ids, the measured queries (``reported``:
    not held out), the subsets' masks [M, N] and which subsets are reported, the measured outputs [M, S, Q] of every
    subset's models and the full model's [Q], and the target [M, Q] (the mean over ``validate.seeds``); and how one
    method's LDS is bootstrapped from them."""

    cfg: DictConfig
    table: pd.DataFrame  # every chunk's measured outputs (CHUNK_COLUMNS)
    train_ids: np.ndarray
    query_ids: np.ndarray
    kinds: np.ndarray
    reported: np.ndarray
    masks: np.ndarray
    report: np.ndarray
    outputs: np.ndarray
    full_outputs: np.ndarray
    target: np.ndarray

    @classmethod
    def load(cls, cfg: DictConfig, layout: Layout) -> "Evaluation":
        v = cfg.validate
        train_ids = ImageSet.load(layout.path("data", split="train")).ids.numpy()
        queries, _ = measured_queries(cfg, layout)
        query_ids = queries.query_id.to_numpy()
        table = pd.concat([read_table(f, "validate_chunk", CHUNK_COLUMNS) for f in chunk_files(cfg, layout)],
                          ignore_index=True)
        outputs, full_outputs = output_arrays(table, v.n_subsets, query_ids)
        return cls(cfg, table, train_ids, query_ids, queries.query_kind.to_numpy(), ~queries.heldout.to_numpy(),
                   masks(len(train_ids), v), report_subsets(v), outputs, full_outputs,
                   np.nanmean(outputs[:, :v.seeds], axis=1))  # the seeds every subset has: what the LDS predicts

    @property
    def n_report(self) -> int:
        return int(self.report.sum())

    def arrays(self) -> dict:
        """The plain arrays of ``lds/arrays.npz`` that do not depend on a method."""
        regrouped = any(model.regrouped for model in subset_models(self.cfg))
        slots = [f"seed {s}" for s in range(self.outputs.shape[1])] if not regrouped else ["seed 0", "seed 0 regrouped"]
        return {"masks": self.masks, "train_ids": self.train_ids, "query_ids": self.query_ids,
                "query_kinds": self.kinds.astype(str), "query_heldout": ~self.reported, "report_subsets": self.report,
                "outputs": self.outputs, "slots": np.array(slots), "full_outputs": self.full_outputs}

    def of_scores(self, scores: np.ndarray, measured: np.ndarray | None = None):
        """``per_query(rows, cols)`` of scores [Q, N]: the LDS of the queries ``cols`` on the reported subsets
        ``rows`` against ``measured`` [M, Q] (default: the target)."""
        measured = self.target if measured is None else measured
        predicted = lds.predicted_outputs(scores, self.masks[self.report])
        effect = lds.measured_effect(measured[self.report])
        return lambda r, c: lds.spearman_columns(predicted[r][:, c], effect[r][:, c])

    def per_kind(self, per_query, n_subsets: int, of_mean=float):
        """Each reported kind that ``per_query(rows, cols)`` scores: its queries and the mean with its interval."""
        v = self.cfg.validate
        for kind in pd.unique(self.kinds[self.reported]):
            sel = np.flatnonzero(self.reported & (self.kinds == kind))
            mean, low, high = lds.bootstrap_ci(lambda r, c: per_query(r, sel[c]), n_subsets, len(sel), v.bootstrap,
                                               seed=v.seed, of_mean=of_mean)
            if np.isfinite(mean):  # else the method does not score this kind of query
                yield kind, sel, mean, low, high

    def rows(self, method: str, variant: str, per_query, n_subsets: int, n_seeds: int, of_mean=float) -> list[dict]:
        """``lds.csv`` rows of one variant (or control, or the target's reliability), one per kind."""
        return [{"method": method, "variant": variant, "query_kind": kind,
                 "n_queries": int(np.isfinite(per_query(np.arange(n_subsets), sel)).sum()), "n_subsets": n_subsets,
                 "n_seeds": n_seeds, "lds_mean": mean, "ci_low": low, "ci_high": high}
                for kind, sel, mean, low, high in self.per_kind(per_query, n_subsets, of_mean)]


def write_lds_report(cfg: DictConfig, layout: Layout) -> None:
    """``tables/lds.csv``, ``lds_pairs.csv``, ``lds_power.csv``, ``lds_steps.csv``, ``lds_outputs.csv``,
    ``lds_lambda.csv`` and ``lds_cost.csv``, ``figures/lds.png`` and ``lds_cost.png``, and the plain arrays of
    ``lds/``: load what was measured, score every method (lambda chosen on the tuning subsets), then the LDS of
    each, Journey-TRAK's per step, the paired differences, the control and the target's reliability."""
    from .figures.lds import lds_cost_figure, lds_figure
    from .figures.style import save

    v = cfg.validate
    ev = Evaluation.load(cfg, layout)
    arrays = ev.arrays()
    scores, tuned = method_scores(cfg, layout, ev)
    arrays.update({f"scores_{variant}": s for variant, s in scores.items()})
    per_query_of = {variant: ev.of_scores(s) for variant, s in scores.items()}
    rows = [row for variant, per_query in per_query_of.items()
            for row in ev.rows(family_of(variant).name, variant, per_query, ev.n_report, v.seeds)]
    step_rows = _step_lds(cfg, layout, ev, arrays)
    pair_rows, power_rows = paired_differences(ev, per_query_of)
    control = lds.random_scores(len(ev.query_ids), len(ev.train_ids), v.seed)
    rows += ev.rows("control", lds.CONTROL, ev.of_scores(control), ev.n_report, v.seeds) + reliability_rows(ev)

    result = pd.DataFrame(rows)
    write_csv(result, layout.path("table", name="lds.csv"))
    write_csv(pd.DataFrame(pair_rows, columns=PAIR_COLUMNS), layout.path("table", name="lds_pairs.csv"))
    write_csv(pd.DataFrame(power_rows, columns=POWER_COLUMNS), layout.path("table", name="lds_power.csv"))
    write_csv(pd.DataFrame(step_rows, columns=STEP_COLUMNS), layout.path("table", name="lds_steps.csv"))
    write_csv(_outputs_summary(ev.outputs[ev.report], ev.full_outputs, ev.kinds, ev.reported),
              layout.path("table", name="lds_outputs.csv"))
    write_csv(pd.concat(tuned, ignore_index=True)[LAMBDA_COLUMNS] if tuned else pd.DataFrame(columns=LAMBDA_COLUMNS),
              layout.path("table", name="lds_lambda.csv"))
    cost = cost_table(cfg, layout, result, n_train=len(ev.train_ids),
                      n_queries=len(read_table(layout.path("query_table"), "queries")))
    write_csv(cost, layout.path("table", name="lds_cost.csv"))
    save(lds_cost_figure(cost), layout.path("figure", name="lds_cost"))
    write_parquet(masks_table(ev.train_ids, v), layout.path("lds_masks"))
    with atomic_path(layout.path("lds_arrays")) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    save(lds_figure(result), layout.path("figure", name="lds"))


def method_scores(cfg: DictConfig, layout: Layout, ev: Evaluation) -> tuple[dict[str, np.ndarray], list]:
    """Every method's scores [Q, N] on the measured queries, in ``attribution.methods`` order (NaN rows: the query
    kinds it does not score; Journey-TRAK scores generated images only), each family that can be rescored
    (``Family.retune``) at the lambda its held-out queries choose on the tuning subsets; and those choices' tables."""
    scores, tuned = {}, []
    for variant in cfg.attribution.methods:
        family, path = family_of(variant), layout.scores(variant)
        dense = read_scores(path, ev.train_ids)
        rows_of = pd.Index(dense["query_ids"].numpy()).get_indexer(ev.query_ids)
        has = rows_of >= 0

        def at(matrix):
            out = np.full((len(ev.query_ids), len(ev.train_ids)), np.nan)
            out[has] = np.asarray(matrix)[rows_of[has]]
            return out

        scores[variant] = at(dense["scores"].numpy())
        if family.retune is not None:
            grid = family.saved_lambdas(path.parent) if family.saved_lambdas is not None \
                else cfg.attribution.lambda_grid
            q, m = ev.reported, ev.report  # the reported queries and subsets
            scores[variant], lambdas = lambda_by_lds(
                lambda lam: at(family.retune(path.parent, variant, lam).numpy()), [float(lam) for lam in grid],
                ~q & has, ev.masks[~m], ev.target[~m], scores[variant],
                reported_lds=lambda s: np.nanmean(lds.lds(s[q], ev.masks[m], ev.target[m][:, q])))
            tuned.append(lambdas.assign(method=family.name, variant=variant))
    return scores, tuned


def paired_differences(ev: Evaluation, per_query_of: dict) -> tuple[list[dict], list[dict]]:
    """``lds_pairs.csv`` and ``lds_power.csv`` rows: every comparison the families claim among the run's methods, its
    paired difference on the same subsets and queries, and what resolving :data:`POWER_EFFECT` would take."""
    v, n = ev.cfg.validate, ev.n_report
    pair_rows, power_rows = [], []
    for a, b in comparisons(list(per_query_of)):
        fa, fb = per_query_of[a], per_query_of[b]
        paired = lambda r, c: fa(r, c) - fb(r, c)  # noqa: E731
        for kind, sel, mean, low, high in ev.per_kind(paired, n):
            pair_rows.append({"variant": a, "versus": b, "query_kind": kind, "n_subsets": n,
                              "difference": mean, "ci_low": low, "ci_high": high})
            n_queries = int(np.isfinite(paired(np.arange(n), sel)).sum())
            se_m, se_q = lds.standard_errors(lambda r, c: paired(r, sel[c]), n, len(sel), v.bootstrap, seed=v.seed)
            power_rows.append({"variant": a, "versus": b, "query_kind": kind, "n_subsets": n,
                               "n_queries": n_queries, "difference": mean, "se_subsets": se_m, "se_queries": se_q,
                               "effect": POWER_EFFECT,
                               "subsets_needed": lds.needed(se_m, se_q, n, POWER_EFFECT),
                               "queries_needed": lds.needed(se_q, se_m, n_queries, POWER_EFFECT),
                               "balanced_subsets": lds.balanced(se_m, n, POWER_EFFECT),
                               "balanced_queries": lds.balanced(se_q, n_queries, POWER_EFFECT)})
    return pair_rows, power_rows


def reliability_rows(ev: Evaluation) -> list[dict]:
    """The reliability r of the protocol's target, from the reported subsets that have a second model (another seed;
    under coupled draws seed 0 regrouped, so r is the coupled protocol's own noise floor), and the LDS it allows."""
    seeded = ev.outputs[ev.report][np.isfinite(ev.outputs[ev.report]).all(axis=(1, 2))]
    if ev.outputs.shape[1] < 2 or len(seeded) < MIN_SUBSETS:
        return []
    seeds = ev.cfg.validate.seeds
    r_of = lambda r, c: lds.seed_reliability(seeded[r][:, :, c])  # noqa: E731
    return (ev.rows("seeds", lds.RELIABILITY, r_of, len(seeded), ev.outputs.shape[1])
            + ev.rows("seeds", lds.ATTAINABLE, r_of, len(seeded), seeds, of_mean=lambda r: lds.attainable(r, seeds)))


def _step_lds(cfg: DictConfig, layout: Layout, ev: Evaluation, arrays: dict) -> list[dict]:
    """Journey-TRAK's per-step LDS (``lds_steps.csv``), as its paper evaluates it: at each kept sampling step, the
    step's scores (``step_scores``, the same for both aggregates up to a positive per-step factor, which a rank
    correlation ignores) against that step's target measured on every subset model; then the mean over steps.
    Adds the per-step targets and scores to the arrays. No rows without Journey-TRAK or generated queries."""
    v = cfg.validate
    stepped = [(f, m) for f, m in requested_families(cfg.attribution.methods).items() if f.step_targets is not None]
    if not stepped or not (ev.table.step >= 0).any():
        return []
    family, chosen = stepped[0]
    dense = read_tensors(layout.scores(chosen[0]), "attribute", ("step_scores", "steps", "query_ids"))
    steps = dense["steps"].numpy()
    targets = step_arrays(ev.table, v.n_subsets, ev.query_ids, steps)
    target = np.nanmean(targets[:, :v.seeds], axis=1)  # [M, Q, T]
    rows_of = pd.Index(dense["query_ids"].numpy()).get_indexer(ev.query_ids)
    scores = np.full((len(ev.query_ids), len(steps), len(ev.train_ids)), np.nan)
    scores[rows_of >= 0] = dense["step_scores"].double().numpy()[rows_of[rows_of >= 0]]
    arrays.update({"journey_steps": steps, "step_outputs": targets, f"step_scores_{family.name}": scores})
    per_step = [ev.of_scores(scores[:, j], target[:, :, j]) for j in range(len(steps))]
    mean_over_steps = lambda r, c: np.nanmean([f(r, c) for f in per_step], axis=0)  # noqa: E731
    rows = []
    for timestep, per_query in [*zip(steps.tolist(), per_step), (None, mean_over_steps)]:
        for kind, sel, mean, low, high in ev.per_kind(per_query, ev.n_report):
            rows.append({"method": family.name, "timestep": timestep,
                         "target": "step" if timestep is not None else "mean over steps", "query_kind": kind,
                         "n_queries": int(np.isfinite(per_query(np.arange(ev.n_report), sel)).sum()),
                         "n_subsets": ev.n_report, "n_seeds": v.seeds, "lds_mean": mean, "ci_low": low,
                         "ci_high": high})
    return rows


PART_COLUMNS = ["query_id", "step", "output"]  # step -1: F; else a sampling step's Journey-TRAK target
CHUNK_COLUMNS = ["model", "subset", "seed", "query_id", "step", "output"]
STEP_COLUMNS = ["method", "timestep", "target", "query_kind", "n_queries", "n_subsets", "n_seeds", "lds_mean",
                "ci_low", "ci_high"]
PAIR_COLUMNS = ["variant", "versus", "query_kind", "n_subsets", "difference", "ci_low", "ci_high"]
# the paired difference the papers' comparisons should resolve (issue 24): lds_power.csv says what it would take
POWER_EFFECT = 0.05
POWER_COLUMNS = ["variant", "versus", "query_kind", "n_subsets", "n_queries", "difference", "se_subsets",
                 "se_queries", "effect", "subsets_needed", "queries_needed", "balanced_subsets", "balanced_queries"]

LAMBDA_COLUMNS = ["method", "variant", "lam", "heldout_lds", "n_heldout", "n_subsets", "refused", "in_grid", "chosen",
                  "bracketed", "report_lds"]
EXTEND = 4  # decades tried past the end of attribution.lambda_grid that the choice sits at


COST_COLUMNS = ["job_variants", "train_grads", "query_grads", "job_wall_s", "wall_per_train_s", "wall_per_query_s"]


def cost_table(cfg: DictConfig, layout: Layout, lds_table: pd.DataFrame, n_train: int, n_queries: int) -> pd.DataFrame:
    """``tables/lds_cost.csv``: every method's LDS rows beside what its attribution job cost. ``train_grads`` /
    ``query_grads``: the gradient evaluations its family counts per training example and per query
    (``Family.cost``); ``job_wall_s``: the wall time of its job (Snakemake's benchmark of every shard, summed; NaN
    where the job ran before benchmarks were recorded), shared by the variants one job computes (``job_variants``);
    the per-example and per-query times split it in proportion to the gradient counts. Kept out of ``lds.csv``:
    wall times differ between runs, the LDS does not."""
    rows = []
    for family, variants in requested_families(cfg.attribution.methods).items():
        in_job = family.job_variants(variants)
        grads = family.cost(cfg, in_job) if family.cost is not None else {"train": np.nan, "query": np.nan}
        shards = shard_count(family, cfg)
        key = layout.keys[f"attribution/{family.name}"]
        files = [layout.path("stage_benchmark", job=f"{family.name}_{key}_{s}_of_{shards}") for s in range(shards)]
        wall = sum(float(pd.read_csv(f, sep="\t")["s"].iloc[0]) for f in files) \
            if all(f.exists() for f in files) else np.nan
        total = n_train * grads["train"] + n_queries * grads["query"]
        per_grad = wall / total if total > 0 else np.nan
        for variant in variants:
            rows.append({"variant": variant, "job_variants": " ".join(in_job), "train_grads": grads["train"],
                         "query_grads": grads["query"], "job_wall_s": wall, "wall_per_train_s": per_grad * grads["train"],
                         "wall_per_query_s": per_grad * grads["query"]})
    cost = pd.DataFrame(rows, columns=["variant", *COST_COLUMNS])
    return lds_table.merge(cost, on="variant", how="inner")[[*lds_table.columns, *COST_COLUMNS]]


def lambda_by_lds(scores_at, grid, heldout, masks, outputs, fallback, reported_lds=None):
    """The ridge lambda whose scores (``scores_at(lam)``, [Q, N]) have the highest mean LDS over the ``heldout``
    queries on the subsets of ``masks`` [M, N] and ``outputs`` [M, Q] (the tuning subsets; ties: the largest lambda),
    those scores, and the table of every candidate. The candidates are ``grid``, extended a decade at a time (at most
    :data:`EXTEND` decades) past whichever end the choice sits at, so that a better value beyond the grid is found;
    ``bracketed`` says whether the choice has a scored neighbour on both sides (or is lambda = 0). A lambda the family
    cannot give (a ``LinAlgError``, or a ``StageError``: not saved by its job) is a refused row. Without a measured
    held-out query or tuning subset the job's own choice (``fallback``, its label-free proxy) is kept, and the table
    says so. ``reported_lds(scores)``: what the reported queries get at each lambda on the reported subsets, recorded
    (``report_lds``) so a reader sees how much lambda matters, and never used to choose."""
    rows, candidates = {}, {}
    usable = bool(heldout.any()) and len(masks) >= MIN_SUBSETS

    def trial(lam: float, in_grid: bool) -> None:
        refused, value = "", float("nan")
        if not usable:
            refused = "no held-out query or tuning subset (validate.tune_subsets): lambda stays the attribution " \
                      "job's choice"
        else:
            try:
                candidates[lam] = scores_at(lam)
                value = float(np.nanmean(lds.lds(candidates[lam][heldout], masks, outputs[:, heldout])))
            except (np.linalg.LinAlgError, StageError) as err:
                refused = str(err).splitlines()[0]
        reported = float(reported_lds(candidates[lam])) if reported_lds is not None and lam in candidates \
            else float("nan")
        rows[lam] = {"lam": lam, "heldout_lds": value, "n_heldout": int(heldout.sum()), "n_subsets": len(masks),
                     "refused": refused, "in_grid": in_grid, "report_lds": reported}

    def best():
        scored = [(row["heldout_lds"], lam) for lam, row in rows.items() if np.isfinite(row["heldout_lds"])]
        return max(scored)[1] if scored else None  # ties: the largest lambda

    for lam in grid:
        trial(float(lam), True)
    for _ in range(EXTEND):
        chosen, scored = best(), sorted(lam for lam, row in rows.items() if np.isfinite(row["heldout_lds"]))
        if chosen is None:
            break
        if chosen == scored[-1] and chosen > 0 and chosen * 10 not in rows:
            trial(chosen * 10, False)
        elif chosen == scored[0] and chosen > 0 and chosen / 10 not in rows:
            trial(chosen / 10, False)
        else:
            break
    table = pd.DataFrame(sorted(rows.values(), key=lambda row: row["lam"]))
    chosen = best()
    scored = table.lam[np.isfinite(table.heldout_lds)]
    table["chosen"] = table.lam == chosen
    table["bracketed"] = chosen is not None and (scored > chosen).any() and (chosen == 0 or (scored < chosen).any())
    return (candidates[chosen] if chosen is not None else fallback), table[LAMBDA_COLUMNS[2:]]


def _outputs_summary(outputs, full_outputs, kinds, reported) -> pd.DataFrame:
    """How much the measured output moves, on the reported subsets: the full model's F, the mean and standard
    deviation of F over subsets (seed 0), and the standard deviation between seeds of one subset (pooled over the
    subsets that have two seeds or more: the training noise an LDS has to see through); per-query deviations are
    averaged over the kind's queries."""
    rows = []
    seeded = np.isfinite(outputs).all(axis=(1, 2)) if outputs.shape[1] >= 2 else np.zeros(len(outputs), bool)
    for kind in pd.unique(kinds[reported]):
        sel = reported & (kinds == kind)
        seed0 = outputs[:, 0, sel]
        seed_sd = float(np.sqrt(outputs[seeded][:, :, sel].var(axis=1, ddof=1).mean(axis=0)).mean()) \
            if seeded.any() else float("nan")
        rows.append({"query_kind": kind, "n_queries": int(sel.sum()), "full_model_F": float(full_outputs[sel].mean()),
                     "subset_F_mean": float(seed0.mean()), "subset_F_sd": float(seed0.std(axis=0).mean()),
                     "seed_F_sd": seed_sd})
    return pd.DataFrame(rows)
