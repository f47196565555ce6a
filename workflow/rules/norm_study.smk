rule norm_study:
    input:
        unpack(lambda wc: train_inputs(run_of("norm_study", wc.norm_study))),
    output:
        # per-checkpoint parts (norm_parts) are resumed from after an interruption (not declared)
        grid=P("norm_shard", kind="grid"),
        recorded=P("norm_shard", kind="recorded"),
    threads: THREADS
    resources:
        **needs("norm_study"),
    params:
        cmd=lambda wc, threads: stage_cmd("norm_study", wc.norm_study, "norm_study", f"job.shard={wc.shard}",
                                          f"job.threads={threads}"),
    log:
        P("stage_log", job="norm_study_{norm_study}_{shard}_of_{shards}"),
    shell:
        "{params.cmd} 2>&1 | tee {log}"
