"""Top-k tables, general influence, image tracing and outlier metrics."""

import numpy as np
import pytest

from diffattr import metrics

# 4 queries x 6 training examples; with k = 2 the top lists are {0,1}, {0,2}, {0,3}, {4,3}; example 5 never appears.
HAND = np.array([
    [5.0, 4.0, 0.0, 0.0, 0.0, -1.0],
    [5.0, 0.0, 4.0, 0.0, 0.0, -1.0],
    [5.0, 0.0, 0.0, 4.0, 0.0, -1.0],
    [0.0, 0.0, 0.0, 4.0, 5.0, -1.0],
])
TRAIN_IDS = np.array([10, 11, 12, 13, 14, 15])


def test_topk_table_lists_each_querys_best_examples_in_rank_order():
    table = metrics.topk_table(HAND, [100, 101, 102, 103], TRAIN_IDS, k=2)
    assert list(table.columns) == ["query_id", "rank", "train_id", "score"]
    assert table[table.query_id == 103].train_id.tolist() == [14, 13]
    assert table[table.query_id == 103].score.tolist() == [5.0, 4.0]
    assert table["rank"].tolist() == [1, 2] * 4


def test_topk_ties_break_by_training_set_order():
    table = metrics.topk_table(np.zeros((1, 4)), [0], [7, 5, 9, 1], k=3)
    assert table.train_id.tolist() == [7, 5, 9]


def test_topk_counts_is_the_number_of_queries_whose_topk_holds_the_example():
    assert metrics.topk_counts(HAND, 2).tolist() == [3, 1, 1, 2, 1, 0]


@pytest.mark.parametrize("threshold, expected", [(0.25, 5), (0.5, 2), (0.75, 1), (1.0, 0)])
def test_general_influence_counts_examples_in_at_least_a_fraction_of_topk_lists(threshold, expected):
    result = metrics.general_influence(HAND, k=2, threshold=threshold)
    assert result["n_general"] == expected
    assert result["n_distinct"] == 5


def test_general_influence_table_pools_all_queries_and_compares_with_tracin():
    retrac = HAND.copy()
    retrac[:, 0] = -2.0  # example 0, in 3 of 4 TracIn lists, leaves every list
    scores = {"tracin": {"train": HAND[:2], "generated": HAND[2:]}, "retrac": {"train": retrac[:2],
                                                                                 "generated": retrac[2:]}}
    table = metrics.general_influence_table(scores, ks=[2], thresholds=[0.5], reference="tracin")
    assert set(table.query_kind) == {"train", "generated", "all"}
    row = table[(table.method == "tracin") & (table.query_kind == "all")].iloc[0]
    assert (row.n_general, row.n_distinct, row.n_queries, row.ratio_to_tracin) == (2, 5, 4, 1.0)
    expected = metrics.general_influence(retrac, 2, 0.5)["n_general"]
    got = table[(table.method == "retrac") & (table.query_kind == "all")].iloc[0]
    assert got.n_general == expected
    assert got.ratio_to_tracin == pytest.approx(expected / 2)


def test_self_retrieval_rates_count_queries_ranking_their_own_id_first_or_in_top5():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 8))
    train_ids = np.arange(20, 28)
    scores[0, 2] = 10  # query 22 ranks itself 1st
    scores[1, 5] = np.sort(scores[1])[-3] + 1e-6  # query 25 ranks itself 3rd... at worst
    scores[2, 7] = -10  # query 27 ranks itself last
    ranks = metrics.self_ranks(scores, [22, 25, 27], train_ids)
    assert ranks[0] == 1 and 2 <= ranks[1] <= 3 and ranks[2] == 8
    assert metrics.self_retrieval_rates(scores, [22, 25, 27], train_ids) == {"top1": pytest.approx(1 / 3),
                                                                                "top5": pytest.approx(2 / 3)}


def test_self_retrieval_rejects_queries_that_are_not_training_images():
    with pytest.raises(ValueError, match="not training images"):
        metrics.self_ranks(HAND, [10, 99, 11, 12], TRAIN_IDS)


def test_outlier_topk_fraction_averages_outlier_share_over_in_class_queries():
    is_outlier = np.array([True, False, False, True, False, False])
    # top-2 lists: {0,1} -> 1/2, {0,2} -> 1/2, {0,3} -> 2/2, {4,3} -> 1/2
    assert metrics.outlier_topk_fraction(HAND, is_outlier, k=2) == pytest.approx(5 / 8)
    assert metrics.outlier_topk_fraction(HAND, is_outlier, k=2, query_mask=[True, True, False, False]) == 0.5


def test_outlier_auroc_is_one_when_self_influence_separates_outliers():
    assert metrics.outlier_auroc([0.1, 5.0, 0.2, 7.0], [False, True, False, True]) == 1.0
    assert metrics.outlier_auroc([5.0, 0.1, 7.0, 0.2], [False, True, False, True]) == 0.0
