rule grad_norms:
    input:
        index=f"{R}/checkpoints/index.json",
        log=f"{R}/train_log.parquet",
        data=f"{R}/data/train",
    output:
        # per-checkpoint parts under grads/parts/ are resumed from after an interruption (not declared)
        grid=f"{R}/grads/grid_shard_{{shard}}_of_{CFG.grads.shards}.parquet",
        recorded=f"{R}/grads/recorded_shard_{{shard}}_of_{CFG.grads.shards}.parquet",
    wildcard_constraints:
        shard=r"\d+",
    threads: THREADS
    resources:
        gpu=1,
    params:
        cmd=lambda wc, threads: hydra_cmd("grad_norms", f"job.shard={wc.shard}", f"job.threads={threads}"),
    conda:
        ENV
    log:
        f"{R}/logs/grad_norms_{{shard}}.log",
    shell:
        "{params.cmd} 2>&1 | tee {log}"


rule norm_figures:
    input:
        expand(f"{R}/grads/{{kind}}_shard_{{shard}}_of_{CFG.grads.shards}.parquet", kind=["grid", "recorded"],
               shard=range(CFG.grads.shards)),
    output:
        grid=f"{R}/tables/grad_norms.parquet",
        recorded=f"{R}/tables/grad_norms_recorded.parquet",
        fig_grid=report(f"{R}/figures/norm_vs_timestep.png", caption="../report/norm_vs_timestep.rst",
                        category="Gradient norms"),
        fig_recorded=report(f"{R}/figures/norm_at_recorded_timestep.png",
                            caption="../report/norm_at_recorded_timestep.rst", category="Gradient norms"),
    params:
        cmd=hydra_cmd("norm_figures"),
    conda:
        ENV
    log:
        f"{R}/logs/norm_figures.log",
    shell:
        "{params.cmd} > {log} 2>&1"
