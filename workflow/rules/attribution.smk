rule queries:
    localrule: True
    input:
        lambda wc: query_inputs(run_of("queries", wc.queries)),
    output:
        images=P("query_images"),
        table=P("query_table"),
    params:
        cmd=lambda wc: stage_cmd("queries", wc.queries, "queries"),
    log:
        P("stage_log", job="queries_{queries}"),
    shell:
        "{params.cmd} > {log} 2>&1"


# One job of any registered method family (diffattr.methods): shard {shard} of {shards} (1 unless it is sharded).
rule attribute:
    input:
        unpack(lambda wc: {**train_inputs(run_of(f"attribution/{wc.family}", wc.method_key)),
                           "queries": path_of(run_of(f"attribution/{wc.family}", wc.method_key), "query_table")}),
    output:
        directory(P("method_shard")),
    threads: THREADS
    resources:
        **needs("attribution"),
    params:
        cmd=lambda wc, threads: stage_cmd(f"attribution/{wc.family}", wc.method_key, "attribute",
                                          f"job.family={wc.family}", f"job.shard={wc.shard}", f"job.threads={threads}"),
    log:
        P("stage_log", job="{family}_{method_key}_{shard}_of_{shards}"),
    benchmark:
        P("stage_benchmark", job="{family}_{method_key}_{shard}_of_{shards}")
    shell:
        "{params.cmd} 2>&1 | tee {log}"


# The dense score files of every method of a sharded family's job, from its shards.
rule merge_scores:
    localrule: True
    input:
        lambda wc: method_shards(run_of(f"attribution/{wc.family}", wc.method_key), families()[wc.family]),
    output:
        directory(P("method_merged")),
    resources:
        **needs("merge"),
    params:
        cmd=lambda wc: stage_cmd(f"attribution/{wc.family}", wc.method_key, "merge_scores", f"job.family={wc.family}"),
    log:
        P("stage_log", job="merge_{family}_{method_key}"),
    shell:
        "{params.cmd} > {log} 2>&1"
