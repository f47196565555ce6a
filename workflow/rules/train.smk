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
        gpu=1,
        mem_mb=needs("mem_mb", "train"),
        runtime=needs("runtime", "train"),
    params:
        cmd=lambda wc, threads: stage_cmd("train", wc.train, "train", f"job.threads={threads}"),
    log:
        P("stage_log", job="train_{train}"),
    shell:
        "{params.cmd} 2>&1 | tee {log}"
