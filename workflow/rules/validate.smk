# Counterfactual validation (`snakemake --cores all validate`): models retrained on random subsets, trained and
# measured a chunk per job (diffattr.validation), then each run's LDS of every method against them.
rule validate_chunk:
    input:
        unpack(lambda wc: {**train_inputs(run_of("outputs", wc.outputs)),
                           "queries": path_of(run_of("outputs", wc.outputs), "query_table")}),
    output:
        # each subset model (subset_model) and its measured outputs (output_parts) are resumed from, not declared
        P("output_chunk"),
    threads: THREADS
    resources:
        **needs("validate"),
    params:
        cmd=lambda wc, threads: stage_cmd("outputs", wc.outputs, "validate_chunk", f"job.first_model={wc.first}",
                                          f"job.last_model={wc.last}", f"job.threads={threads}"),
    log:
        P("stage_log", job="validate_{outputs}_{first}_to_{last}"),
    shell:
        "{params.cmd} 2>&1 | tee {log}"


for _i, _run in enumerate(RUNS):

    rule:
        name:
            f"lds_report_{_i}"
        localrule: True
        input:
            config=path_of(_run, "config"),
            scores=score_dirs(_run, _run.cfg.attribution.methods),
            chunks=output_chunks(_run),
        output:
            lds=report(path_of(_run, "table", name="lds.csv"), caption="../report/lds_table.rst", category="Validation"),
            outputs=path_of(_run, "table", name="lds_outputs.csv"),
            lam=path_of(_run, "table", name="lds_lambda.csv"),
            pairs=path_of(_run, "table", name="lds_pairs.csv"),
            power=path_of(_run, "table", name="lds_power.csv"),
            steps=path_of(_run, "table", name="lds_steps.csv"),
            figure=report(path_of(_run, "figure", name="lds"), caption="../report/lds.rst", category="Validation"),
            cost=path_of(_run, "table", name="lds_cost.csv"),
            cost_figure=report(path_of(_run, "figure", name="lds_cost"), caption="../report/lds_cost.rst",
                               category="Validation"),
            masks=path_of(_run, "lds_masks"),
            arrays=path_of(_run, "lds_arrays"),
        resources:
            **job_resources("report", _run.cfg),
        params:
            cmd=hydra_cmd(_run, "lds_report"),
        log:
            path_of(_run, "run_log", job="lds_report"),
        shell:
            "{params.cmd} > {log} 2>&1"


if SWEEP.name:

    rule sweep_lds:
        localrule: True
        input:
            runs=[path_of(r, "config") for r in RUNS],
            tables=[path_of(r, "table", name="lds.csv") for r in RUNS],
        output:
            table=report(P("sweep_lds", sweep=SWEEP.name), caption="../report/sweep_lds.rst", category="Sweep"),
            figure=report(P("sweep_lds_figure", sweep=SWEEP.name), caption="../report/sweep_lds.rst",
                          category="Sweep"),
        params:
            cmd=script_cmd("sweep_summary", "--lds", "--table", P("sweep_lds", sweep=SWEEP.name), "--figure",
                           P("sweep_lds_figure", sweep=SWEEP.name), "--keys", ",".join(SWEEP.keys),
                           *[str(r.dir) for r in RUNS]),
        log:
            P("sweep_lds", sweep=SWEEP.name).replace("lds.csv", "lds.log"),
        shell:
            "{params.cmd} > {log} 2>&1"


rule validate:
    input:
        [path_of(r, "table", name="lds.csv") for r in RUNS],
        [P(name, sweep=SWEEP.name) for name in ("sweep_lds", "sweep_lds_figure")] if SWEEP.name else [],


# Counterfactual removal (`snakemake --cores all removal`): retrain without each method's top-k for a generated
# image, regenerate it, and measure how far it moved (diffattr.removal); a chunk of cases per job.
rule removal_chunk:
    input:
        unpack(lambda wc: {**train_inputs(run_of("removal", wc.removal)),
                           "queries": path_of(run_of("removal", wc.removal), "query_table"),
                           "scores": score_dirs(run_of("removal", wc.removal),
                                                removal_methods(run_of("removal", wc.removal).cfg))}),
    output:
        # the retrained models (removal_model) are shared between cases and resumed from, not declared
        table=P("removal_chunk"),
        images=P("removal_images"),
    threads: THREADS
    resources:
        **needs("removal"),
    params:
        cmd=lambda wc, threads: stage_cmd("removal", wc.removal, "removal_chunk", f"job.first_model={wc.first}",
                                          f"job.last_model={wc.last}", f"job.threads={threads}"),
    log:
        P("stage_log", job="removal_{removal}_{first}_to_{last}"),
    shell:
        "{params.cmd} 2>&1 | tee {log}"


for _i, _run in enumerate(RUNS):

    rule:
        name:
            f"removal_report_{_i}"
        localrule: True
        input:
            config=path_of(_run, "config"),
            chunks=[path_of(_run, artifact, first=a, last=b) for a, b in removal_chunks(_run.cfg)
                    for artifact in ("removal_chunk", "removal_images")],
        output:
            table=path_of(_run, "table", name="removal.csv"),
            summary=report(path_of(_run, "table", name="removal_summary.csv"), caption="../report/removal_table.rst",
                           category="Validation"),
            figure=report(path_of(_run, "figure", name="removal"), caption="../report/removal.rst",
                          category="Validation"),
        params:
            cmd=hydra_cmd(_run, "removal_report"),
        log:
            path_of(_run, "run_log", job="removal_report"),
        shell:
            "{params.cmd} > {log} 2>&1"


rule removal:
    input:
        [path_of(r, "table", name="removal_summary.csv") for r in RUNS],
