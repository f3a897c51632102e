"""The README's commands, CI and the shipped example configs agree with the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moe_serve.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_demo_then_test_command() -> None:
    first, second = readme_commands()[:2]
    assert first.endswith("moe-serve demo")
    assert "pytest" in second


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci_lines = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == [readme_commands()[1]]


@pytest.mark.parametrize(
    "path", sorted((ROOT / "deploy" / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_example_config_is_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.workers
