"""The README and docs/ agree with the code: their commands parse, their snippets validate,
their links resolve, the config tables are what the code generates, and CI runs the README's
test command."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

import moe_serve.client
from moe_serve.cli import _parser
from moe_serve.config import WorldConfig, load_config, parse_config
from moe_serve.transport.auth import load_tokens

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def _script(name: str) -> ModuleType:
    """A module of scripts/ (a directory of programs, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_config_docs = _script("gen_config_docs")

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# config.json of the published checkpoints the examples name.
CHECKPOINT_CONFIGS = {
    "mixtral-2-machines.yaml": DATA / "mixtral-8x7b-config.json",
    "deepseek-moe-16b.yaml": DATA / "deepseek-moe-16b-config.json",
}
SECTIONS = set(WorldConfig.model_fields)
FENCE = re.compile(r"(?ms)^( *)```(\w*)\n(.*?)^\1```[ \t]*$")


def blocks(path: Path, lang: str | None = None) -> list[str]:
    """The fenced code blocks of `path` (in `lang` only, if given), de-indented."""
    out = []
    for m in FENCE.finditer(path.read_text()):
        if lang is None or m[2] == lang:
            out.append("\n".join(line[len(m[1]) :] for line in m[3].splitlines()))
    return out


def prose(path: Path) -> str:
    """`path` without its fenced blocks and inline code: what renders as text."""
    text = FENCE.sub("", path.read_text())
    return re.sub(r"`[^`\n]*`", "", text)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def readme_commands() -> list[str]:
    return blocks(ROOT / "README.md", "bash")


# --- the README's first commands, and CI --------------------------------------------------------


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


# --- the config reference -----------------------------------------------------------------------


def test_config_tables_are_what_the_fields_generate() -> None:
    current = (ROOT / "docs" / "config.md").read_text()
    assert gen_config_docs.render(current) == current, (
        "docs/config.md is stale: run python scripts/gen_config_docs.py"
    )


def test_every_config_key_has_a_description() -> None:
    missing = [
        f"{section}.{name}"
        for section, model in gen_config_docs.sections()
        for name, info in model.model_fields.items()
        if not info.description
    ]
    assert missing == []


def test_config_tables_cover_every_section_and_key() -> None:
    text = (ROOT / "docs" / "config.md").read_text()
    sections = dict(gen_config_docs.sections())
    assert set(sections) == {
        "model",
        "routing",
        "master",
        "batching",
        "security",
        "security.tls",
        "tracing",
        "workers[]",
    }
    rows = sum(len(m.model_fields) for m in sections.values())
    assert len(re.findall(r"(?m)^\| `\w+` \|", text)) == rows == 65


def test_the_config_table_types_and_defaults_come_from_the_annotations() -> None:
    from moe_serve.config import MasterConfig, SecurityConfig, TLSConfig

    table = gen_config_docs.table
    assert "| `max_request_tokens` | int > 0 | `65536` |" in table(MasterConfig)
    assert "| `metrics_port` | int 1..65535 or null | `9400` |" in table(MasterConfig)
    assert "| `token_file` | path or null | `null` |" in table(SecurityConfig)
    assert "| `cert` | path | required |" in table(TLSConfig)


# --- commands -----------------------------------------------------------------------------------


def doc_commands() -> list[tuple[str, str]]:
    """(file, command line) for every `moe-serve ...` line of a code block (fenced or
    indented, `$ ` prompts and `\\` continuations folded), synopses (`[...]`, `...`) aside."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip().removeprefix("$ ")
            if re.match(r"moe-serve [a-z]", line):
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                line = re.sub(r"\s+#.*$", "", line)
                if "[" not in line and "..." not in line:
                    out.append((rel(path), line))
            i += 1
    return out


COMMANDS = doc_commands()


def test_the_docs_show_the_commands_of_every_subcommand() -> None:
    used = {shlex.split(cmd)[1] for _, cmd in COMMANDS}
    assert used >= {"worker", "master", "up", "bench", "placement"}


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c}" for d, c in COMMANDS])
def test_every_moe_serve_command_line_in_the_docs_parses(doc: str, command: str) -> None:
    argv = shlex.split(command)[1:]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{command}` does not parse (exit {exc.code})")
    config = getattr(args, "config", None)
    if config is not None and (ROOT / config).is_file():  # a file of this repository
        assert load_config(ROOT / config).workers


# --- YAML ---------------------------------------------------------------------------------------


def yaml_snippets() -> list[tuple[str, int, str]]:
    return [(rel(path), i, text) for path in DOCS for i, text in enumerate(blocks(path, "yaml"))]


def _unknown_keys(model: type[BaseModel], data: Any, where: str) -> list[str]:
    if not isinstance(data, dict):
        return []
    bad = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            bad.append(f"{where}{key}")
            continue
        for inner in gen_config_docs._models(field.annotation):
            items = value if isinstance(value, list) else [value]
            for item in items:
                bad += _unknown_keys(inner, item, f"{where}{key}.")
    return bad


@pytest.mark.parametrize(
    ("doc", "index", "text"), yaml_snippets(), ids=[f"{d}[{i}]" for d, i, _ in yaml_snippets()]
)
def test_every_yaml_snippet_parses_and_world_configs_validate(
    doc: str, index: int, text: str, tmp_path: Path
) -> None:
    data = yaml.safe_load(text)
    assert isinstance(data, dict), f"{doc}: YAML block {index} is not a mapping"
    if not set(data) <= SECTIONS:
        return  # another file's YAML (compose, Kubernetes)
    if isinstance(data.get("model"), dict) and "checkpoint" in data["model"]:
        # The checkpoint is not here: every key must still be a key of the config.
        assert _unknown_keys(WorldConfig, data, "") == []
        return
    if "workers" not in data:  # a section alone: put it in a world of one worker
        data["workers"] = [{"id": "w0", "address": "127.0.0.1:50061", "experts": [0]}]
        data.setdefault("model", {"num_experts": 1, "top_k": 1})
    cfg = parse_config(data, f"{doc} block {index}", base=tmp_path)
    assert cfg.workers


# --- Python -------------------------------------------------------------------------------------


def python_snippets() -> list[tuple[str, int, str]]:
    return [(rel(path), i, text) for path in DOCS for i, text in enumerate(blocks(path, "python"))]


@pytest.mark.parametrize(
    ("doc", "index", "text"),
    python_snippets(),
    ids=[f"{d}[{i}]" for d, i, _ in python_snippets()],
)
def test_every_python_snippet_compiles_and_imports_what_exists(
    doc: str, index: int, text: str
) -> None:
    tree = compile(
        text, f"{doc} block {index}", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_serve"):
            module = importlib.import_module(node.module or "")
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert missing == [], f"{doc}: `from {node.module} import` names {missing}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("moe_serve"):
                    importlib.import_module(alias.name)


def test_the_sdk_signatures_in_the_reference_are_the_clients() -> None:
    stub = next(b for b in blocks(ROOT / "docs" / "reference.md", "python") if "class " in b)
    classes = [n for n in ast.parse(stub).body if isinstance(n, ast.ClassDef)]
    assert {c.name for c in classes} == {"MoEClient", "ClientTLS"}
    for cls in classes:
        real = getattr(moe_serve.client, cls.name)
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
            params = inspect.signature(getattr(real, fn.name)).parameters
            args = fn.args.args
            defaults = [None] * (len(args) - len(fn.args.defaults)) + fn.args.defaults
            documented = {
                a.arg: inspect.Parameter.empty if d is None else eval(ast.unparse(d))
                for a, d in zip(args, defaults, strict=True)
            }
            actual = {name: p.default for name, p in params.items()}
            assert documented == actual, f"{cls.name}.{fn.name}"


# --- links and tables ---------------------------------------------------------------------------


def slugs(path: Path) -> set[str]:
    """GitHub's anchors of `path`'s headings."""
    out: set[str] = set()
    for heading in re.findall(r"(?m)^#{1,6} (.+)$", FENCE.sub("", path.read_text())):
        base = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slug, n = base, 0
        while slug in out:
            n += 1
            slug = f"{base}-{n}"
        out.add(slug)
    return out


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_every_relative_link_resolves_to_a_file_and_anchor(path: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in slugs(dest)):
            broken.append(target)
    assert broken == [], f"{rel(path)}: broken links {broken}"


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_every_table_has_a_header_and_rows_of_its_width(path: Path) -> None:
    """A blank line inside a table splits it: the rest renders as a paragraph of pipes."""
    lines = FENCE.sub("", path.read_text()).splitlines()
    tables: list[list[str]] = []
    for before, line in zip(["", *lines], lines, strict=False):
        if line.startswith("|"):
            if not before.startswith("|"):
                tables.append([])
            tables[-1].append(line)
    for table in tables:
        assert len(table) >= 3 and re.fullmatch(r"\|( *:?-+:? *\|)+", table[1]), (
            f"{rel(path)}: a table without a header row: {table[0][:60]}"
        )
        width = len(re.findall(r"(?<!\\)\|", table[0]))
        ragged = [row[:60] for row in table if len(re.findall(r"(?<!\\)\|", row)) != width]
        assert ragged == [], f"{rel(path)}: rows of another width"


# --- the example configs ------------------------------------------------------------------------

EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    if data["model"].get("checkpoint"):  # stand in the published config.json for the weights
        (tmp_path / "config.json").write_text(CHECKPOINT_CONFIGS[path.name].read_text())
        data["model"]["checkpoint"] = str(tmp_path)
    cfg = parse_config(data, path.name)
    assert cfg.workers


def test_the_examples_table_lists_every_example_config() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("## Example world configs", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"(?m)^\| `([\w.-]+\.yaml)` \|", section))
    assert listed == {p.name for p in EXAMPLES}


def test_quickstart_writes_every_key_each_with_a_comment() -> None:
    path = ROOT / "deploy" / "examples" / "quickstart.yaml"
    text = path.read_text()
    data = yaml.safe_load(text)
    missing = []
    for section, model in gen_config_docs.sections():
        if section == "security.tls":  # `tls: null` here; its keys are shown commented out
            missing += [k for k in model.model_fields if not re.search(rf"(?m)^ *# +{k}:", text)]
            continue
        values = data[section.removesuffix("[]")]
        for item in values if isinstance(values, list) else [values]:
            missing += [f"{section}.{k}" for k in model.model_fields if k not in item]
    assert missing == []
    uncommented = [
        line
        for line in text.splitlines()
        if re.match(r" *(- )?\w+:", line) and "#" not in line and not line.endswith(":")
    ]
    assert uncommented == []


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


# --- the README's map of the code ---------------------------------------------------------------


def readme_tree() -> list[str]:
    """The paths the README's file tree names, directories with a trailing '/'."""
    tree = next(b for b in blocks(ROOT / "README.md", "") if b.startswith("pyproject.toml"))
    paths, stack = [], []
    for line in tree.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        stack = [*stack[:depth], name]
        paths.append("".join(stack))
    return paths


def test_the_readme_tree_names_only_files_that_exist() -> None:
    missing = [p for p in readme_tree() if not (ROOT / p).exists()]
    assert missing == []


def test_the_readme_tree_has_a_line_for_every_module() -> None:
    named = set(readme_tree())
    modules = {
        rel(p)
        for p in (ROOT / "moe_serve").rglob("*.py")
        if p.name != "__init__.py" and "v1" not in p.parts
    }
    assert sorted(modules - named) == []


# --- the token commands of docs/operations.md ---------------------------------------------------


def test_the_token_commands_make_two_tokens_the_config_reads(tmp_path: Path) -> None:
    """Run operations.md's `umask` and `python3 -c ... > FILE` lines in a directory, point a
    world config in that directory at the files by relative paths, and read them from the
    tests' working directory."""
    script = next(b for b in blocks(ROOT / "docs" / "operations.md", "bash") if "secrets" in b)
    # `cd` and `chown` name the production directory and user; the rest runs as written.
    lines = [ln for ln in script.splitlines() if ln.startswith(("umask", "python3 -c"))]
    run = "\n".join(re.sub(r"\s+#.*$", "", ln) for ln in lines)
    env_python = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    subprocess.run(
        ["bash", "-c", run.replace("python3 ", f"{shlex.quote(sys.executable)} ")],
        cwd=tmp_path,
        check=True,
        timeout=60,
        env=env_python,
    )
    section = next(
        yaml.safe_load(b)
        for b in blocks(ROOT / "docs" / "operations.md", "yaml")
        if "client.token" in b
    )
    world = {"workers": [{"id": "w0", "address": "127.0.0.1:50061", "experts": list(range(8))}]}
    (tmp_path / "world.yaml").write_text(yaml.safe_dump({**world, **section}))
    client, worker = load_tokens(load_config(tmp_path / "world.yaml").security)
    assert client is not None and worker is not None
    assert len(client) == len(worker) == 64 and client != worker
    assert (tmp_path / "client.token").stat().st_mode & 0o777 == 0o600  # umask 077
