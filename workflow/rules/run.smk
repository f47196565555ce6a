# What a user reads, one set of rules per run: its config and manifest, the norm-study tables and figures, and the
# attribution report. Their outputs depend on the run's settings (methods, dataset), so each run gets its own rules.
from diffattr.layout import report_extras

for _i, _run in enumerate(RUNS):
    _methods = list(_run.cfg.attribution.methods)

    rule:
        name:
            f"resolve_config_{_i}"
        localrule: True
        output:
            config=path_of(_run, "config"),
            manifest=path_of(_run, "manifest"),
        params:
            # rerun (and so every report of the run) when the resolved settings change
            resolved=resolved_yaml(_run.cfg),
            cmd=hydra_cmd(_run, "resolve_config"),
        log:
            path_of(_run, "run_log", job="resolve_config"),
        shell:
            "{params.cmd} > {log} 2>&1"

    rule:
        name:
            f"norm_report_{_i}"
        localrule: True
        input:
            config=path_of(_run, "config"),
            shards=[path_of(_run, "norm_shard", kind=k, shard=s, shards=_run.cfg.shards)
                    for k in ("grid", "recorded") for s in range(_run.cfg.shards)],
        output:
            grid=path_of(_run, "norm_table"),
            recorded=path_of(_run, "norm_recorded_table"),
            fig_grid=report(path_of(_run, "figure", name="norm_vs_timestep"),
                            caption="../report/norm_vs_timestep.rst", category="Gradient norms"),
            fig_recorded=report(path_of(_run, "figure", name="norm_at_recorded_timestep"),
                                caption="../report/norm_at_recorded_timestep.rst", category="Gradient norms"),
        params:
            cmd=hydra_cmd(_run, "norm_report"),
        log:
            path_of(_run, "run_log", job="norm_report"),
        shell:
            "{params.cmd} > {log} 2>&1"

    rule:
        name:
            f"attribution_report_{_i}"
        localrule: True
        input:
            config=path_of(_run, "config"),
            scores=[str(_run.layout.scores(m).parent) for m in _methods],
            queries=path_of(_run, "query_table"),
        output:
            topk=report(path_of(_run, "table", name="topk.parquet"), caption="../report/topk_table.rst",
                        category="Tables"),
            general=report(path_of(_run, "table", name="general_influence.csv"),
                           caption="../report/general_influence_table.rst", category="Tables"),
            tracing=report(path_of(_run, "table", name="tracing.csv"), caption="../report/tracing.rst",
                           category="Tables"),
            hist=report(path_of(_run, "figure", name="general_influence"), caption="../report/general_influence.rst",
                        category="Attribution"),
            topk_figs=[report(path_of(_run, "figure", name=f"topk_{m}"), caption="../report/topk.rst",
                              category="Top-k") for m in _methods],
            scores=[path_of(_run, "scores_long", method=m) for m in _methods],
            extra=[report(path_of(_run, kind, name=name), caption=f"../report/{caption}.rst", category=category)
                   for kind, name, caption, category in report_extras(_run.cfg)],
        resources:
            **job_resources("report", _run.cfg),
        params:
            cmd=hydra_cmd(_run, "report"),
        log:
            path_of(_run, "run_log", job="attribution_report"),
        shell:
            "{params.cmd} > {log} 2>&1"


def run_targets(run):
    # every method's own output too, so that a method added to a finished run is computed even where Snakemake's
    # metadata (which notices the changed config) was lost
    return [path_of(run, "manifest"), *sample_outputs(run), path_of(run, "figure", name="norm_vs_timestep"),
            path_of(run, "figure", name="norm_at_recorded_timestep"), path_of(run, "table", name="general_influence.csv"),
            *(path_of(run, "scores_long", method=m) for m in run.cfg.attribution.methods)]
