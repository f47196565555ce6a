rule sample:
    input:
        f"{R}/checkpoints/index.json",
    output:
        images=f"{R}/samples/{{ckpt}}.safetensors",
        grid=f"{R}/samples/{{ckpt}}.png",
    wildcard_constraints:
        ckpt=r"epoch_\d+",
    threads: THREADS
    resources:
        gpu=1,
    params:
        cmd=lambda wc, threads: hydra_cmd("sample", f"job.checkpoint={wc.ckpt}", f"job.threads={threads}"),
    conda:
        ENV
    log:
        f"{R}/logs/sample_{{ckpt}}.log",
    shell:
        "{params.cmd} 2>&1 | tee {log}"
