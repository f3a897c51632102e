"""The README's commands, CI and the shipped example configs agree with the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from moe_serve.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
# config.json of the published checkpoints the examples name.
CHECKPOINT_CONFIGS = {
    "mixtral-2-machines.yaml": DATA / "mixtral-8x7b-config.json",
    "deepseek-moe-16b.yaml": DATA / "deepseek-moe-16b-config.json",
}


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
def test_example_config_is_valid(path: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    if "checkpoint" in data["model"]:  # stand in the published config.json for the weights
        (tmp_path / "config.json").write_text(CHECKPOINT_CONFIGS[path.name].read_text())
        data["model"]["checkpoint"] = str(tmp_path)
    cfg = parse_config(data, path.name)
    assert cfg.workers


def test_deepseek_moe_16b_example_has_seed_004_layout(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(CHECKPOINT_CONFIGS["deepseek-moe-16b.yaml"].read_text())
    data = yaml.safe_load((ROOT / "deploy" / "examples" / "deepseek-moe-16b.yaml").read_text())
    data["model"]["checkpoint"] = str(tmp_path)
    cfg = parse_config(data)
    assert cfg.model.moe_layers == tuple(range(1, 28))
    assert (cfg.model.num_experts, cfg.model.top_k, cfg.model.expert_ffn_size) == (64, 6, 1408)
    assert cfg.model.shared_expert_ffn_size == 2 * 1408  # two shared experts, on the master
    assert not cfg.routing.normalize_topk
    assert [len(w.experts) for w in cfg.workers] == [32, 32]
