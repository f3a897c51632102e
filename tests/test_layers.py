"""The package's layers, as `ls moe_serve` shows them, and what each may import.

Every import is counted, including those inside functions: a lazy import is still a
dependency. A layer importing what it must not fails here with the file and the import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moe_serve"

# Each group: (its modules' name prefixes, the moe_serve groups it may import).
BASE = ("moe_serve.errors", "moe_serve.config", "moe_serve.families", "moe_serve.dtypes")
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "base": (BASE, ("base",)),
    "v1": (("moe_serve.v1",), ()),
    "weights": (("moe_serve.weights",), ("base", "weights")),
    "layer": (("moe_serve.layer",), ("base", "weights", "layer")),
    "transport": (("moe_serve.transport",), ("base", "v1", "transport")),
    "runtime": (
        ("moe_serve.metrics", "moe_serve.batching", "moe_serve.tracing"),
        ("base", "runtime"),
    ),
    "master": (
        ("moe_serve.master",),
        ("base", "v1", "weights", "layer", "transport", "runtime", "master"),
    ),
    "worker": (
        ("moe_serve.worker",),
        ("base", "v1", "weights", "layer", "transport", "runtime", "worker"),
    ),
    "client": (
        ("moe_serve.client",),
        ("base", "v1", "weights", "layer", "transport", "runtime", "master", "client"),
    ),
    "integrations": (("moe_serve.integrations",), ("base", "client", "integrations")),
    "tools": (
        ("moe_serve.tools",),
        (
            "base",
            "v1",
            "weights",
            "layer",
            "transport",
            "runtime",
            "master",
            "worker",
            "client",
            "integrations",
            "tools",
        ),
    ),
    "cli": (("moe_serve.cli", "moe_serve.__main__", "moe_serve"), ()),  # may import anything
}
# Third-party modules a layer must not touch: the maths runs in any process (a client, a
# notebook) without an event loop or a socket.
FORBIDDEN = {
    "layer": ("grpc", "asyncio", "google.protobuf", "prometheus_client", "moe_serve.v1"),
    "weights": ("grpc", "asyncio", "google.protobuf", "prometheus_client"),
    "base": ("asyncio", "prometheus_client"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group_of(module: str) -> str:
    best, best_len = "", -1
    for group, (prefixes, _) in GROUPS.items():
        for prefix in prefixes:
            hit = module == prefix or module.startswith(prefix + ".")
            if hit and len(prefix) > best_len:
                best, best_len = group, len(prefix)
    assert best, f"{module} belongs to no layer: add it to GROUPS in tests/test_layers.py"
    return best


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from moe_serve.transport import wire` imports the submodule.
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "v1" not in p.parts)


def test_every_module_belongs_to_a_layer() -> None:
    for path in SOURCES:
        group_of(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_a_module_imports_only_the_layers_below_it(path: Path) -> None:
    module = module_name(path)
    group = group_of(module)
    allowed = GROUPS[group][1]
    bad = []
    for line, name in imports_of(path):
        if name.startswith("moe_serve") and group != "cli":
            target = group_of(name) if name != "moe_serve" else "cli"
            if target not in allowed:
                bad.append(f"{path.name}:{line} imports {name} ({group} may not import {target})")
        for forbidden in FORBIDDEN.get(group, ()):
            if name == forbidden or name.startswith(forbidden + "."):
                bad.append(f"{path.name}:{line} imports {name} ({group} must not use it)")
    assert not bad, "\n".join(bad)


def test_config_errors_need_no_torch() -> None:
    # `moe-serve --help` and a config error come back in ~0.3 s instead of torch's ~2 s import.
    code = "import sys, moe_serve.cli, moe_serve.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_contract_paths_exist() -> None:
    for module in ("client", "cli", "integrations/hf", "v1/moe_pb2"):
        assert (PACKAGE / f"{module}.py").is_file(), module
