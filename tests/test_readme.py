"""The README stays a newcomer's page: at most 250 lines, the sections a first hour needs, every link to a docs
page resolving, and every `embedrank` command it shows parsing with its config loading (its Python snippet runs
in tests/pipelines/output/test_reader.py::test_the_documented_snippets_run_as_written)."""

import pathlib
import re
import shlex

import pytest

from pipelines.cli import JOBS, build_parser
from pipelines.config import load_config
from pipelines.config_doc import config_type

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]


def test_the_readme_fits_and_has_what_a_first_hour_needs():
    assert len(README.splitlines()) <= 250
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    for needed in ("Install", "The two commands", "Embed a corpus", "Rerank candidate sets", "Reindex a changing corpus",
                   "On a cluster", "Reading the output", "Troubleshooting", "More"):
        assert needed in headings, headings
    assert "make demo" in README and "make test" in README  # what .ci/run and a newcomer type


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    text = (REPO / page).read_text()
    for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert ((REPO / page).parent / target).exists(), (page, target)


def test_every_embedrank_command_of_the_readme_parses_and_its_config_loads():
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if "embedrank " in line:
                commands.append(shlex.split(line[line.index("embedrank "):])[1:])
    assert len(commands) >= 8
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        if args.command in JOBS:
            cfg = load_config(REPO / args.config, args.set, schema=config_type(args.command))
            assert cfg.model.path.startswith("Qwen/Qwen3-")
