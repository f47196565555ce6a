"""Counterfactual removal (``snakemake removal``; docs/METHODS.md §6): for a generated image, remove a method's top-k
training images, retrain from scratch with the run's seed, regenerate from the same initial noise, and measure how
far the image moved; compare with removing k random images.

A case is (method or ``random``, generated query, removed fraction, random draw). Its retrained model depends only on
the training settings and the removed ids, so it lives in a directory named by a hash of the removed set under the
train stage's key: two methods that remove the same images share one model. Measured per case (D-TRAK's protocol,
Zheng et al. ICLR 2024, with two more distances):

- ``l2``: the pixel L2 distance between the regenerated and the original image, pixels in [-1, 1] (D-TRAK's units:
  their CIFAR-10 anchors are random removal 4.71, TRAK 5.90, D-TRAK 8.97);
- ``feature_distance``: the cosine distance between the two images' features under the full model's UNet encoder
  (its mid-block activation at t = 0, mean-pooled over space: offline, nothing downloaded);
- ``loss_increase``: F(q; theta_removed) - F(q; theta_full), F being the validation's measured output (the loss over
  ``validate.output_timesteps`` x ``validate.output_noises`` fixed draws).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from .artifacts import read_scores, read_table, read_tensors
from .atomic import save_tensors, write_csv, write_parquet
from .checkpoints import last_checkpoint, load_checkpoint_unet
from .data import ImageSet
from .exceptions import StageError
from .layout import Layout, digest
from .models import build_scheduler
from .noise import REMOVAL_RANDOM, derive_seeds
from .subsets import model_outputs, output_timesteps, position_ranges, train_last_only

# torch is imported where it is used: the workflow imports this module when it parses (no torch there)
if TYPE_CHECKING:
    import torch

RANDOM = "random"
COLUMNS = ["method", "fraction", "k", "query_id", "draw", "removed", "l2", "feature_distance", "loss_increase"]


@dataclass(frozen=True)
class Case:
    method: str  # a variant of attribution.methods, or "random"
    query_id: int
    fraction: float
    draw: int = 0  # which random draw (0 for a method)


def removal_methods(cfg: DictConfig) -> list[str]:
    return list(cfg.removal.methods) if cfg.removal.methods is not None else list(cfg.attribution.methods)


def removal_queries(queries: pd.DataFrame, cfg: DictConfig) -> pd.DataFrame:
    """The first ``removal.n_queries`` generated queries (all generated queries are reported)."""
    return queries[queries.query_kind == "generated"].head(cfg.removal.n_queries)


def n_cases(cfg: DictConfig) -> int:
    """How many cases a run has, known at plan time (the queries are the first generated ones)."""
    r = cfg.removal
    n_queries = min(r.n_queries, cfg.attribution.n_generated_queries, cfg.sample.n)
    return n_queries * len(r.fractions) * (len(removal_methods(cfg)) + r.random_draws)


def cases(cfg: DictConfig, queries: pd.DataFrame) -> list[Case]:
    r = cfg.removal
    out = []
    for q in removal_queries(queries, cfg).query_id:
        for fraction in r.fractions:
            out += [Case(m, int(q), float(fraction)) for m in removal_methods(cfg)]
            out += [Case(RANDOM, int(q), float(fraction), d) for d in range(r.random_draws)]
    return out


def chunks(cfg: DictConfig) -> list[tuple[int, int]]:
    return position_ranges(n_cases(cfg), cfg.removal.cases_per_job)


def removed_ids(case: Case, train_ids: np.ndarray, scores: dict[str, dict], seed: int) -> np.ndarray:
    """The k = round(fraction N) training ids a case removes: the method's top-k for the query (highest scores
    first), or k drawn at random from (removal seed, query id, fraction, draw). Sorted."""
    k = round(case.fraction * len(train_ids))
    if not 0 < k < len(train_ids):
        raise StageError(f"removal.fractions: {case.fraction} removes {k} of {len(train_ids)} training images; choose "
                         "fractions that remove at least one image and keep at least one")
    if case.method == RANDOM:
        key = derive_seeds(seed, REMOVAL_RANDOM, case.query_id, round(case.fraction * 1e6), case.draw)
        chosen = np.random.default_rng(int(key)).choice(len(train_ids), k, replace=False)
    else:
        dense = scores[case.method]
        row = dense["scores"][int(np.nonzero(dense["query_ids"] == case.query_id)[0][0])]
        if not np.isfinite(row).all():
            raise StageError(f"{case.method} has non-finite scores for query {case.query_id}")
        chosen = np.argsort(-row, kind="stable")[:k]
    return np.sort(train_ids[chosen])


def retrain_without(cfg: DictConfig, layout: Layout, train_set: ImageSet, removed: np.ndarray, device):
    """The run's training (seed, draws, epochs) on the training set minus ``removed``, last checkpoint only; reused
    when a model without exactly those ids exists. Returns its last checkpoint's directory."""
    directory = layout.path("removal_model", removed=digest(removed.tolist()))
    if not (directory / "checkpoints" / "index.json").exists():  # written last: the model is complete
        keep = np.flatnonzero(~np.isin(train_set.ids.numpy(), removed))
        train_last_only(cfg, directory, train_set.subset(keep), device)
    return last_checkpoint(directory / "checkpoints")


def unet_features(unet, images: torch.Tensor) -> torch.Tensor:
    """The UNet's mid-block activation at t = 0, mean-pooled over space: [B, C] (an encoder trained in the pipeline)."""
    import torch

    with torch.no_grad():  # not a decorator: torch is imported inside
        captured = []
        handle = unet.mid_block.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            unet.eval()
            device = next(unet.parameters()).device
            unet(images.to(device), torch.zeros(len(images), dtype=torch.long, device=device))
        finally:
            handle.remove()
        return captured[0].mean(dim=(-2, -1)).double().cpu()


def pixel_l2(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image L2 distance of images in the model's [-1, 1] pixels."""
    return (a.double() - b.double()).flatten(1).norm(dim=1).numpy()


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    import torch

    return (1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).numpy()


def run_chunk(cfg: DictConfig, layout: Layout, first: int, last: int, device: torch.device) -> None:
    """Retrain, regenerate and measure the cases at positions ``first..last``; write their ``removal_chunk``."""
    import torch

    from .queries import load_queries
    from .sampling import generate

    queries, query_images = load_queries(layout)
    todo = cases(cfg, queries)[first:last + 1]
    if not todo:
        raise StageError(f"no removal case at positions {first}..{last}; the run has {len(cases(cfg, queries))}")
    train_set = ImageSet.load(layout.path("data", split="train"))
    train_ids = train_set.ids.numpy()
    scores = {}
    for method in {c.method for c in todo} - {RANDOM}:
        dense = read_scores(layout.scores(method), train_ids)
        scores[method] = {"scores": dense["scores"].numpy(), "query_ids": dense["query_ids"].numpy()}
    scheduler = build_scheduler(cfg.model)
    timesteps, v = output_timesteps(cfg), cfg.validate
    position = pd.Index(queries.query_id)
    full = load_checkpoint_unet(last_checkpoint(layout.path("checkpoint_index").parent),
                                ema=cfg.sample.use_ema).to(device)

    def measure(unet, ids):
        rows = position.get_indexer(ids)
        return model_outputs(unet, scheduler, query_images[rows], np.asarray(ids), timesteps, v.output_noises,
                             v.seed, cfg.train.loss, v.batch_size)

    ids = sorted({c.query_id for c in todo})
    seeds = queries.set_index("query_id").loc[ids, "source_id"].tolist()
    # the originals regenerated by the full model exactly as the cases are (one image per call): equal to the query
    # images up to float rounding, so a distance measures the weights alone
    originals = torch.cat([generate(full, scheduler, [s], cfg.sample.num_inference_steps)[0] for s in seeds])
    base_loss, base_features = measure(full, ids), unet_features(full, originals)
    rows, images = [], []
    for case in todo:
        removed = removed_ids(case, train_ids, scores, cfg.removal.seed)
        unet = load_checkpoint_unet(retrain_without(cfg, layout, train_set, removed, device),
                                    ema=cfg.sample.use_ema).to(device)
        j = ids.index(case.query_id)
        image, _ = generate(unet, scheduler, [seeds[j]], cfg.sample.num_inference_steps)
        rows.append({"method": case.method, "fraction": case.fraction, "k": len(removed), "query_id": case.query_id,
                     "draw": case.draw, "removed": digest(removed.tolist()),
                     "l2": float(pixel_l2(image, originals[j:j + 1])[0]),
                     "feature_distance": float(cosine_distance(unet_features(full, image),
                                                               base_features[j:j + 1])[0]),
                     "loss_increase": float(measure(unet, [case.query_id])[0] - base_loss[j])})
        images.append(image[0])
    save_tensors({"images": torch.stack(images)}, layout.path("removal_images", first=first, last=last))
    write_parquet(pd.DataFrame(rows, columns=COLUMNS), layout.path("removal_chunk", first=first, last=last))


# the measures a method's removal is also placed among the random removals by (beside the pixel L2, whose columns
# keep their names), each with its own random generator so that adding one leaves the others' numbers as they were
OTHER_MEASURES = ("loss_increase", "feature_distance")


def against_random(mine: pd.Series, draws: list[np.ndarray], rng: np.random.Generator,
                   n_resamples: int) -> dict[str, float]:
    """Where a method's per-query value (``mine``, indexed by query) falls among the same queries' random removals
    (``draws``, one array per query, in ``mine``'s order): see :func:`summary`."""
    quantile = np.array([((d < x).sum() + 0.5 * (d == x).sum()) / len(d) for x, d in zip(mine, draws)])
    means = quantile[rng.integers(0, len(quantile), (n_resamples, len(quantile)))].mean(axis=1)
    random_mean = np.array([d.mean() for d in draws])
    gap = mine.to_numpy() - random_mean
    flipped = (rng.choice([-1.0, 1.0], (n_resamples, len(gap))) * gap).mean(axis=1)
    return {"quantile": float(quantile.mean()), "quantile_ci_low": float(np.quantile(means, 0.025)),
            "quantile_ci_high": float(np.quantile(means, 0.975)),
            "p_value": float((1 + (flipped >= gap.mean()).sum()) / (1 + n_resamples))}


def summary(table: pd.DataFrame, n_resamples: int, seed: int) -> pd.DataFrame:
    """Per method and fraction: the median over queries of each distance (a query's mean over its draws) with a 95%
    bootstrap interval over queries. For a method, its L2 against the random removals of the same query and
    fraction:

    - ``random_quantile``: the share of that query's random removals that moved the image less (ties count half),
      averaged over queries, with a bootstrap interval (0.5: no better than random; 1: beyond every random draw);
    - ``l2_over_random``: the median over queries of the method's L2 over the mean random L2 (D-TRAK's comparison);
    - ``p_value``: a one-sided paired sign-flip permutation test over queries of the method's L2 minus the mean
      random L2 (``n_resamples`` flips): how often a method no better than random moves the images this far.

    The same for each of :data:`OTHER_MEASURES`, in columns named after it (``loss_increase_quantile``,
    ``loss_increase_quantile_ci_low``/``_high``, ``loss_increase_p_value``; no ratio: a loss increase can be
    negative): the loss increase is what Mlodozeniec et al. measure after a removal."""
    rng = np.random.default_rng(seed)
    others = {measure: np.random.default_rng([seed, i + 1]) for i, measure in enumerate(OTHER_MEASURES)}
    random = table[table.method == RANDOM].groupby(["fraction", "query_id"])
    rows = []
    for (method, fraction), part in table.groupby(["method", "fraction"], sort=False):
        row = {"method": method, "fraction": fraction, "k": int(part.k.iloc[0]), "n_queries": part.query_id.nunique()}
        for metric in ("l2", "feature_distance", "loss_increase"):
            values = part.groupby("query_id")[metric].mean().to_numpy()
            medians = np.median(values[rng.integers(0, len(values), (n_resamples, len(values)))], axis=1)
            row.update({f"median_{metric}": float(np.median(values)),
                        f"{metric}_ci_low": float(np.quantile(medians, 0.025)),
                        f"{metric}_ci_high": float(np.quantile(medians, 0.975))})
        if method != RANDOM:
            per_query = part.groupby("query_id")
            mine = per_query.l2.mean()
            draws = {m: [random.get_group((fraction, q))[m].to_numpy() for q in mine.index]
                     for m in ("l2", *OTHER_MEASURES)}
            l2 = against_random(mine, draws["l2"], rng, n_resamples)
            ratio = mine.to_numpy() / np.array([d.mean() for d in draws["l2"]])
            row.update({"n_random": int(min(len(d) for d in draws["l2"])), "random_quantile": l2["quantile"],
                        "quantile_ci_low": l2["quantile_ci_low"], "quantile_ci_high": l2["quantile_ci_high"],
                        "l2_over_random": float(np.median(ratio)), "p_value": l2["p_value"]})
            for measure, generator in others.items():
                placed = against_random(per_query[measure].mean(), draws[measure], generator, n_resamples)
                row.update({f"{measure}_{key}": value for key, value in placed.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def write_removal_report(cfg: DictConfig, layout: Layout) -> None:
    """``tables/removal.csv`` (every case), ``tables/removal_summary.csv`` and ``figures/removal.png``."""
    import torch

    from .figures.removal import removal_figure
    from .figures.style import save
    from .queries import load_queries

    parts = chunks(cfg)
    table = pd.concat([read_table(layout.path("removal_chunk", first=a, last=b), "removal_chunk", COLUMNS)
                       for a, b in parts], ignore_index=True)
    regenerated = torch.cat([read_tensors(layout.path("removal_images", first=a, last=b), "removal_chunk",
                                          ("images",))["images"] for a, b in parts])
    if len(regenerated) != len(table):
        raise StageError(f"the removal chunks hold {len(table)} cases but {len(regenerated)} images; rerun the "
                         "same snakemake command with --forcerun removal_chunk")
    write_csv(table, layout.path("table", name="removal.csv"))
    result = summary(table, cfg.validate.bootstrap, cfg.removal.seed)
    write_csv(result, layout.path("table", name="removal_summary.csv"))
    queries, query_images = load_queries(layout)
    originals = query_images[pd.Index(queries.query_id).get_indexer(table.query_id)]
    save(removal_figure(table, result, originals, regenerated), layout.path("figure", name="removal"))
