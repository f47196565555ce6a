# A sweep (several runs from one command): one summary table and figure over every run x method.
if SWEEP.name:

    rule sweep_summary:
        localrule: True
        input:
            runs=[path_of(r, "config") for r in RUNS],
            tables=[path_of(r, "table", name="general_influence.csv") for r in RUNS],
        output:
            table=report(P("sweep_summary", sweep=SWEEP.name), caption="../report/sweep_summary.rst", category="Sweep"),
            figure=report(P("sweep_figure", sweep=SWEEP.name), caption="../report/sweep_figure.rst", category="Sweep"),
        params:
            cmd=script_cmd("sweep_summary", "--table", P("sweep_summary", sweep=SWEEP.name), "--figure",
                           P("sweep_figure", sweep=SWEEP.name), "--keys", ",".join(SWEEP.keys),
                           *[str(r.dir) for r in RUNS]),
        log:
            P("sweep_summary", sweep=SWEEP.name).replace("summary.csv", "summary.log"),
        shell:
            "{params.cmd} > {log} 2>&1"
