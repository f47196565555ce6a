"""Write the run's resolved configuration, ``<run>/config.yaml``: the run's identity for every later rule."""

from diffattr.atomic import write_text
from diffattr.cli import entry
from diffattr.config import resolved_yaml


@entry
def main(run, device):
    write_text(run.dir / "config.yaml", resolved_yaml(run.cfg))


if __name__ == "__main__":
    main()
