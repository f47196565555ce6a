"""Attribution methods: Diffusion-TracIn / Diffusion-ReTrac (``tracin``) and TRAK / D-TRAK / Journey-TRAK (``trak``)."""

from .tracin import (NORMALIZATIONS, QueryGradients, TracInScores, evenly_spaced_timesteps, merge_shards,
                     query_gradients, recorded_draws, shard_blocks, tracin_shard, tracin_shard_sides,
                     tracin_weights)
from .trak import (JOURNEY_TRAK_TRAIN, LAMBDA_GRID, FeatureSpec, LambdaChoice, d_trak_spec, ensemble_scores,
                   heldout_mask, journey_query_features, label_agreement, predicted_x0, select_lambda, trak_features,
                   trak_scores, trak_spec)

__all__ = [
    "NORMALIZATIONS", "QueryGradients", "TracInScores", "evenly_spaced_timesteps", "merge_shards", "query_gradients",
    "recorded_draws", "shard_blocks", "tracin_shard", "tracin_shard_sides", "tracin_weights",
    "JOURNEY_TRAK_TRAIN", "LAMBDA_GRID", "FeatureSpec", "LambdaChoice", "d_trak_spec", "ensemble_scores",
    "heldout_mask", "journey_query_features", "label_agreement", "predicted_x0", "select_lambda", "trak_features",
    "trak_scores", "trak_spec",
]
