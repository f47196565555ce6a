"""The documentation a user reads: links that resolve, the specification the code cites, a configuration reference
equal to the schema, a short README whose commands run, and no path of one machine in any tracked file."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
REFERENCE_USE = re.compile(r"\]\[([^\]]+)\]")
REFERENCE_DEF = re.compile(r"^\s*\[([^\]]+)\]:\s*(\S+)")
CODE_SPAN = re.compile(r"`[^`]*`")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked (links and headings live in prose)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
            continue
        lines.append("" if fenced else CODE_SPAN.sub("``", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped but for - and _, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def raw_headings(page: Path) -> list[str]:
    """The headings outside code blocks, code spans kept (an anchor keeps their text)."""
    fenced, out = False, []
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,6}\s", line):
            out.append(line)
    return out


def links(page: Path) -> list[str]:
    text = "\n".join(prose(page.read_text()))
    defined = {m[1].lower(): m[2] for line in text.splitlines() if (m := REFERENCE_DEF.match(line))}
    found = INLINE_LINK.findall(text) + IMAGE_LINK.findall(text) + list(defined.values())
    for ref in REFERENCE_USE.findall(text):
        assert ref.lower() in defined, f"{page.relative_to(REPO)}: reference [{ref}] has no definition"
    return found


def test_slug_follows_github():
    assert slug("4. The TRAK family: TRAK, Journey-TRAK, D-TRAK") == "4-the-trak-family-trak-journey-trak-d-trak"
    assert slug("Counterfactual validation (`snakemake validate --cores all`)") == \
        "counterfactual-validation-snakemake-validate---cores-all"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in raw_headings(page):
        base = slug(re.sub(r"^#{1,6}\s+", "", line).rstrip("# "))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def cited_sections() -> dict[int, list[str]]:
    """``§N`` numbers cited after ``METHODS.md`` in the package, with where: ``§2-4, §7`` cites 2, 3, 4 and 7."""
    cited: dict[int, list[str]] = {}
    for file in sorted((REPO / "src").rglob("*.py")):
        text = file.read_text()
        for m in re.finditer(r"METHODS\.md`{0,2}((?:[^.\n]|\.\d)*)", text):
            for a, b in re.findall(r"§(\d+)(?:-§?(\d+))?", m[1]):
                for n in range(int(a), int(b or a) + 1):
                    cited.setdefault(n, []).append(str(file.relative_to(REPO)))
    return cited


def test_every_methods_citation_in_the_code_resolves_to_a_heading():
    cited = cited_sections()
    assert {2, 5, 8} <= set(cited), "the citations were not found: is the pattern still right?"
    headings = {int(m[1]) for line in raw_headings(REPO / "docs" / "METHODS.md")
                if (m := re.match(r"^##\s+(\d+)\.\s", line))}
    missing = {n: files for n, files in cited.items() if n not in headings}
    assert not missing, f"docs/METHODS.md has no heading '## N.' for these citations: {missing}"


def test_the_code_cites_the_repository_copy_of_the_specification():
    bare = [f"{f.relative_to(REPO)}:{i}" for f in sorted((REPO / "src").rglob("*.py"))
            for i, line in enumerate(f.read_text().splitlines(), 1)
            if re.search(r"(?<!docs/)(?<!``docs/)METHODS\.md", line) and "docs/METHODS.md" not in line]
    assert not bare, f"cite docs/METHODS.md, the file a clone has: {bare}"


def test_configuration_reference_is_generated_from_the_schema():
    env = {k: v for k, v in os.environ.items() if k != "DIFFATTR_PLUGINS"}  # the registry as shipped
    proc = subprocess.run([sys.executable, "-m", "diffattr.config_reference"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| `train.draws` |" in proc.stdout and "### `attribution`: the `tracin` family" in proc.stdout
    assert (REPO / "docs" / "configuration.md").read_text() == proc.stdout, \
        "docs/configuration.md is stale: python -m diffattr.config_reference > docs/configuration.md"


def test_readme_is_short_and_its_tables_are_narrow():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move depth to docs/"
    wide = [(i, len(cell.strip())) for i, line in enumerate(lines, 1) if line.startswith("|")
            for cell in line.strip().strip("|").split(" | ") if len(cell.strip()) > 200]
    assert not wide, f"README table cells over 200 characters (line, length): {wide}"


def tracked_text_files() -> list[Path]:
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if proc.returncode == 0:
        names = [n for n in proc.stdout.decode().split("\0") if n]
    else:  # not a git checkout: every file but what git would ignore here
        skip = {".git", ".venv", "results", "__pycache__", ".snakemake", ".pytest_cache"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(REPO).parts)]
    files = []
    for name in names:
        path = REPO / name
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def test_no_tracked_file_names_a_path_of_one_machine():
    roots = ["/" + part + "/" for part in ("work", "home", "tmp")]  # spelled apart, or this file would match
    found = [f"{f.relative_to(REPO)}:{i}: {root}" for f in tracked_text_files()
             for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
             for root in roots if root in line]
    assert len(tracked_text_files()) > 50
    assert not found, "machine paths (write /path/to/...): " + "; ".join(found)


def readme_commands() -> list[str]:
    """Every ``snakemake ...`` command of the README: in bash blocks (continuations joined, ``&&`` split) and in
    inline code."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            commands += [part.strip() for part in line.split("&&") if part.strip().startswith("snakemake ")]
    commands += [span for span in re.findall(r"`(snakemake [^`]*)`", text)]
    return list(dict.fromkeys(" ".join(c.split()) for c in commands))


def test_readme_commands_are_found():
    commands = readme_commands()
    assert "snakemake --cores all" in commands
    assert any(c.startswith("snakemake validate ") for c in commands)


@pytest.mark.dag
@pytest.mark.parametrize("command", [c for c in readme_commands() if "data.archive=" not in c])
def test_every_readme_snakemake_command_plans_its_jobs(command, tmp_path):
    """A dry run of each command (those that need a CIFAR archive excepted) in an empty directory: the workflow
    parses, the config validates and the DAG is planned. ``--report`` needs finished results, so its command is
    dry-run without it."""
    args = shlex.split(command)[1:]
    if "--report" in args:
        i = args.index("--report")
        del args[i:i + 2]
    if "--profile" in args:  # a path in the repository, as the README is read from its root
        i = args.index("--profile") + 1
        args[i] = str(REPO / args[i])
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Job stats:" in proc.stdout + proc.stderr
