rule prepare_data:
    output:
        train=directory(P("data", split="train")),
        test=directory(P("data", split="test")),
    resources:
        **needs("data"),
    params:
        cmd=lambda wc: stage_cmd("data", wc.data, "prepare_data"),
    log:
        P("stage_log", job="prepare_data_{data}"),
    shell:
        "{params.cmd} 2>&1 | tee {log}"
