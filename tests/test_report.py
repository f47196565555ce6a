"""The attribution stages and the report in one process, as the DAG chains them, on CIFAR-MNIST at smoke scale
(a fake archive)."""

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_data import write_archive

from diffattr.checkpoints import read_index
from diffattr.config import compose
from diffattr.data import ImageSet, load_dataset
from diffattr.methods import requested_families, shard_count
from diffattr.methods.jobs import merge_job, run_job
from diffattr.queries import build_queries
from diffattr.report import write_report
from diffattr.sampling import write_samples
from diffattr.train import train

WITH_SELF_INFLUENCE = ["tracin", "retrac", "retrac_train_only", "retrac_test_only", "trak", "dtrak"]


def run_stages(run, device):
    """Every stage of ``run`` but the norm study, in DAG order."""
    cfg, layout = run.cfg, run.layout
    for split in ("train", "test"):
        load_dataset(cfg.data, split).save(layout.path("data", split=split))
    train(cfg, layout.path("train_log").parent, ImageSet.load(layout.path("data", split="train")), device)
    last = read_index(layout.path("checkpoint_index").parent)[-1].name
    write_samples(cfg, layout, last, device)
    build_queries(cfg, layout, last)
    for family in requested_families(cfg.attribution.methods):
        for shard in range(shard_count(family, cfg)):
            run_job(run, family.name, shard, device)
        if family.sharded:
            merge_job(run, family.name)
    write_report(cfg, layout)


# the tests that read it are marked dag: it trains the smoke model and runs two families' jobs
@pytest.fixture(scope="module")
def outlier_run(tmp_path_factory):
    """8 airplanes + 4 planted zeros; the self-influence grid equals the queries' (S=3, R=2)."""
    work = tmp_path_factory.mktemp("cifar_mnist")
    archive = write_archive(work / "cifar-10-python.tar.gz")
    run = compose("smoke", ["data=cifar_mnist", f"data.archive={archive}", "data.verify_checksum=false",
                            "data.per_class=8", "data.n_outliers=4", "attribution.self_influence=true",
                            "attribution.self_influence_timesteps=3",
                            "attribution.self_influence_noises=2", f"results_dir={work / 'results'}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation
    try:
        run_stages(run, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.mark.dag
def test_outlier_table_scores_self_influence_over_the_whole_training_set(outlier_run):
    table = pd.read_csv(outlier_run.dir / "tables" / "outliers.csv").set_index("method")
    outlier = ImageSet.load(outlier_run.layout.path("data", split="train")).is_outlier.numpy()
    assert (table.n_train == 12).all() and outlier.sum() == 4
    assert (table.outlier_fraction_in_train_set == 4 / 12).all()
    assert table.loc[WITH_SELF_INFLUENCE, "self_influence_auroc"].between(0, 1).all()
    assert table.loc[WITH_SELF_INFLUENCE, "outlier_fraction_top10"].between(0, 1).all()
    # Journey-TRAK attributes generated images only: no in-class query, no self-influence
    assert table.loc["journey_trak", ["self_influence_auroc", "outlier_fraction_top10"]].isna().all()
    from sklearn.metrics import roc_auc_score

    for method in WITH_SELF_INFLUENCE:
        own = load_file(str(outlier_run.layout.scores(method)))["self_influence"].numpy()
        assert own.shape == (12,) and np.isfinite(own).all()
        assert table.loc[method, "self_influence_auroc"] == pytest.approx(roc_auc_score(outlier, own))


@pytest.mark.dag
@pytest.mark.parametrize("method", WITH_SELF_INFLUENCE)
def test_self_influence_of_a_training_query_is_its_own_score(outlier_run, method):
    """The stage wires ids and seeds so that a training image's self-influence is its tracing diagonal."""
    dense = load_file(str(outlier_run.layout.scores(method)))
    train_ids = dense["train_ids"].tolist()
    pairs = [(row, train_ids.index(q)) for row, q in enumerate(dense["query_ids"].tolist()) if q in train_ids]
    assert len(pairs) == 8  # smoke: 8 training-image queries
    rows, cols = map(list, zip(*pairs))
    diagonal, own = dense["scores"][rows, cols], dense["self_influence"][cols]
    torch.testing.assert_close(diagonal, own, rtol=1e-3, atol=1e-6 * own.abs().max().item())
