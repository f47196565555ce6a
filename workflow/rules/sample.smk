rule sample:
    input:
        lambda wc: path_of(run_of("samples", wc.samples), "checkpoint_index"),
    output:
        images=P("samples"),
        grid=P("samples_grid"),
    threads: THREADS
    resources:
        **needs("sample"),
    params:
        cmd=lambda wc, threads: stage_cmd("samples", wc.samples, "sample", f"job.checkpoint={wc.checkpoint}",
                                          f"job.threads={threads}"),
    log:
        P("stage_log", job="sample_{samples}_{checkpoint}"),
    shell:
        "{params.cmd} 2>&1 | tee {log}"
