"""The package type-checks: mypy, configured in pyproject.toml ([tool.mypy]), reports nothing.

The package ships `py.typed`, so its annotations are part of what users get. mypy runs here,
as a test, because CI runs the test suite (.ci/run); a cold run takes about a minute on two
cores (most of it reading torch's annotations), later ones reuse `.mypy_cache`.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What [tool.mypy] must keep: loosening any of these lets untyped or wrong code back in.
STRICT = (
    "disallow_untyped_defs",
    "disallow_incomplete_defs",
    "check_untyped_defs",
    "no_implicit_optional",
    "warn_unused_ignores",
)


def test_mypy_config_is_strict_and_uses_the_pydantic_plugin() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert cfg["packages"] == ["moe_serve"]
    # Without the plugin, every pydantic model constructed in code is a false positive
    # (22 of them when mypy first ran) and field types are not checked at construction.
    assert "pydantic.mypy" in cfg["plugins"]
    assert {flag: cfg.get(flag) for flag in STRICT} == dict.fromkeys(STRICT, True)
    # Missing stubs are ignored per package (overrides), never for everything at once.
    assert "ignore_missing_imports" not in cfg


@pytest.mark.timeout(900)  # a cold cache on a loaded two-core machine: minutes, not seconds
def test_mypy_reports_no_errors_in_the_package() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"mypy exited {done.returncode}:\n{report}"
    assert "Success: no issues found" in done.stdout, report
