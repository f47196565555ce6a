rule queries:
    input:
        data=[f"{R}/data/train", f"{R}/data/test"],
        samples=f"{R}/samples/{CHECKPOINTS[-1]}.safetensors",
    output:
        images=f"{R}/attribution/queries/images.safetensors",
        table=f"{R}/attribution/queries/queries.parquet",
    params:
        cmd=hydra_cmd("queries"),
    conda:
        ENV
    log:
        f"{R}/logs/queries.log",
    shell:
        "{params.cmd} > {log} 2>&1"


rule tracin:
    input:
        queries=rules.queries.output.table,
        index=f"{R}/checkpoints/index.json",
        log=f"{R}/train_log.parquet",
    output:
        [f"{R}/attribution/tracin/{side}_shard_{{shard}}_of_{SHARDS}.safetensors" for side in TRACIN_SIDES],
    wildcard_constraints:
        shard=r"\d+",
    threads: THREADS
    resources:
        gpu=1,
    params:
        cmd=lambda wc, threads: hydra_cmd("tracin", f"job.shard={wc.shard}", f"job.threads={threads}"),
    conda:
        ENV
    log:
        f"{R}/logs/tracin_{{shard}}.log",
    shell:
        "{params.cmd} 2>&1 | tee {log}"


rule trak:
    input:
        queries=rules.queries.output.table,
        index=f"{R}/checkpoints/index.json",
    output:
        scores=f"{R}/scores/{{method}}.safetensors",
        features=f"{R}/attribution/{{method}}/features.safetensors",
        lam=f"{R}/attribution/{{method}}/lambda.csv",
    wildcard_constraints:
        method="trak|dtrak",
    threads: THREADS
    resources:
        gpu=1,
    params:
        cmd=lambda wc, threads: hydra_cmd("trak", f"job.method={wc.method}", f"job.threads={threads}"),
    conda:
        ENV
    log:
        f"{R}/logs/{{method}}.log",
    shell:
        "{params.cmd} 2>&1 | tee {log}"


rule journey_trak:
    input:
        queries=rules.queries.output.table,
        index=f"{R}/checkpoints/index.json",
    output:
        scores=f"{R}/scores/journey_trak.safetensors",
        lam=f"{R}/attribution/journey_trak/lambda.csv",
    threads: THREADS
    resources:
        gpu=1,
    params:
        cmd=lambda wc, threads: hydra_cmd("journey_trak", f"job.threads={threads}"),
    conda:
        ENV
    log:
        f"{R}/logs/journey_trak.log",
    shell:
        "{params.cmd} 2>&1 | tee {log}"


rule attribution_report:
    input:
        attribution_inputs(),
    output:
        topk=report(f"{R}/tables/topk.parquet", caption="../report/topk_table.rst", category="Tables"),
        general=report(f"{R}/tables/general_influence.csv", caption="../report/general_influence_table.rst",
                       category="Tables"),
        tracing=report(f"{R}/tables/tracing.csv", caption="../report/tracing.rst", category="Tables"),
        hist=report_figure("general_influence", "general_influence"),
        topk_figs=[report_figure(f"topk_{m}", "topk", "Top-k") for m in METHODS],
        scores=[f"{R}/scores/{m}.parquet" for m in METHODS],
        extra=attribution_extras(),
    params:
        cmd=hydra_cmd("report"),
    conda:
        ENV
    log:
        f"{R}/logs/attribution_report.log",
    shell:
        "{params.cmd} > {log} 2>&1"
