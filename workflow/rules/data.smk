rule resolve_config:
    output:
        f"{R}/config.yaml",
    params:
        # rerun (and so everything downstream) when the resolved settings change
        resolved=resolved_yaml(CFG),
        cmd=hydra_cmd("resolve_config"),
    conda:
        ENV
    log:
        f"{R}/logs/resolve_config.log",
    shell:
        "{params.cmd} > {log} 2>&1"


rule prepare_data:
    input:
        f"{R}/config.yaml",
    output:
        train=directory(f"{R}/data/train"),
        test=directory(f"{R}/data/test"),
    params:
        cmd=hydra_cmd("prepare_data"),
    conda:
        ENV
    log:
        f"{R}/logs/prepare_data.log",
    shell:
        "{params.cmd} 2>&1 | tee {log}"
