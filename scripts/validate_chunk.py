"""Train (or reuse) the validation's subset models at positions job.first_model..job.last_model and measure the
queries' outputs on each (diffattr.validation)."""

from diffattr.cli import entry
from diffattr.validation import run_chunk


@entry("validate")
def main(run, device, plan):
    run_chunk(run.cfg, run.layout, run.cfg.job.first_model, run.cfg.job.last_model, device)


if __name__ == "__main__":
    main()
