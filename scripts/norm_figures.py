"""Merge the gradient-norm shards into ``tables/`` and draw the two norm figures."""

from diffattr.cli import entry
from diffattr.figures.norms import plot_norm_at_recorded_timestep, plot_norm_vs_timestep
from diffattr.gradnorms import merge_shards


@entry
def main(run, device):
    shards = [f"shard_{i}_of_{run.cfg.grads.shards}" for i in range(run.cfg.grads.shards)]
    grads, tables, figures = run.dir / "grads", run.dir / "tables", run.dir / "figures"
    grid = merge_shards([grads / f"grid_{s}.parquet" for s in shards], tables / "grad_norms.parquet")
    recorded = merge_shards([grads / f"recorded_{s}.parquet" for s in shards], tables / "grad_norms_recorded.parquet")
    plot_norm_vs_timestep(grid, figures / "norm_vs_timestep.png")
    plot_norm_at_recorded_timestep(recorded, figures / "norm_at_recorded_timestep.png")


if __name__ == "__main__":
    main()
