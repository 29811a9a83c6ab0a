"""The README is a short user's guide: at most 250 lines, no development history, every setting named."""

from __future__ import annotations

import re

import pytest
from support.paths import REPO

import em_assets.settings as settings_module

README = (REPO / "README.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))


def test_the_readme_is_at_most_250_lines():
    assert len(README.splitlines()) <= 250


@pytest.mark.parametrize("phrase", ["last landing", "side run", "the commit before", "as issue"])
def test_the_docs_speak_of_the_software_not_of_its_history(phrase):
    assert phrase not in DOCS.lower()


def test_every_environment_setting_is_documented():
    names = [v for k, v in vars(settings_module).items() if k.endswith("_ENV") and v.startswith("EM_")]
    assert names and not [n for n in names if n not in DOCS]


def test_the_readme_links_the_operations_and_benchmark_docs_that_exist():
    linked = set(re.findall(r"\]\((docs/[a-z-]+\.md)", README))
    assert {"docs/operations.md", "docs/benchmarks.md"} <= linked
    assert all((REPO / d).exists() for d in ("docs/operations.md", "docs/benchmarks.md"))
