rule train:
    input:
        lambda wc: path_of(run_of("train", wc.train), "data", split="train"),
    output:
        # checkpoints/<epoch>/ directories are written atomically during training and resumed from when a job is
        # interrupted; they are not declared, so Snakemake never deletes them on failure.
        index=P("checkpoint_index"),
        log=P("train_log"),
    threads: THREADS
    resources:
        **needs("train"),
    params:
        cmd=lambda wc, threads: stage_cmd("train", wc.train, "train", f"job.threads={threads}"),
    log:
        P("stage_log", job="train_{train}"),
    shell:
        "{params.cmd} 2>&1 | tee {log}"
