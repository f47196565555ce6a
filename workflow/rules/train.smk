rule train:
    input:
        config=f"{R}/config.yaml",
        data=f"{R}/data/train",
    output:
        # checkpoints/<epoch>/ directories are written atomically during training and resumed from when a job is
        # interrupted; they are not declared, so Snakemake never deletes them on failure.
        index=f"{R}/checkpoints/index.json",
        log=f"{R}/train_log.parquet",
    threads: THREADS
    resources:
        gpu=1,
    params:
        cmd=lambda wc, threads: hydra_cmd("train", f"job.threads={threads}"),
    conda:
        ENV
    log:
        f"{R}/logs/train.log",
    shell:
        "{params.cmd} 2>&1 | tee {log}"
