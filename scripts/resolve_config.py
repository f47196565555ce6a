"""Write the run's resolved configuration and its manifest: ``<run>/config.yaml`` and ``<run>/manifest.yaml``."""

from diffattr.atomic import write_text
from diffattr.cli import entry
from diffattr.config import manifest_yaml, resolved_yaml


@entry("config")
def main(run, device, plan):
    write_text(run.layout.path("config"), resolved_yaml(run.cfg))
    write_text(run.layout.path("manifest"), manifest_yaml(run))


if __name__ == "__main__":
    main()
