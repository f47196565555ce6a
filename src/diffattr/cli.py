"""The shared shape of every ``scripts/*.py`` entry point: Hydra config in, a validated run and a device out,
and bad input turned into a one-line error instead of a traceback."""

from __future__ import annotations

import errno
import functools
import sys
from typing import Callable

import torch

from . import memory
from .config import CONF_DIR, Run, from_hydra, register_schema
from .exceptions import ConfigError, DiffattrError
from .memory import Estimate
from .resources import GPU_STAGES


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"job.device={name} but no CUDA device is visible; use job.device=cpu")
    return torch.device(name)


def entry(stage: str) -> Callable[[Callable[[Run, torch.device, Estimate], None]], Callable[[], None]]:
    """Wrap ``task(run, device, plan)`` as a Hydra main over ``conf/``. ``plan`` is the job's memory plan for
    ``stage`` (``diffattr.memory``), checked against its budget before the task starts; its peak is logged after."""
    import hydra

    register_schema()

    def wrap(task):
        @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
        @functools.wraps(task)
        def main(cfg) -> None:
            try:
                run = from_hydra(cfg)
                if run.cfg.job.threads > 0:
                    torch.set_num_threads(run.cfg.job.threads)
                # light stages (configs, data, queries, merges, reports) run on the CPU wherever they run: on a
                # cluster that is a node without a GPU, or Snakemake's own process (its local rules)
                device = pick_device(run.cfg.job.device) if stage in GPU_STAGES else torch.device("cpu")
                plan = memory.check(run.cfg, stage, device)
                task(run, device, plan)
                print(memory.peak_line(plan, device), flush=True)
            except DiffattrError as e:  # its message already names the problem and the fix
                sys.exit(f"error: {e}")
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    sys.exit(f"error: disk full while writing {e.filename or 'an output'}; nothing partial was kept. "
                             "Free space or point results_dir= at a larger disk, then rerun.")
                raise

        return main

    return wrap
