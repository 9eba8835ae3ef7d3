"""The deployment's monitoring config is valid and bound to metrics the server really exports
(no Grafana panel or alert rule watching a name that does not exist)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.server.helpers import Server, metric_values

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\b(stts_[a-z_]+|vllm:[a-z_]+)\b")
RECORDED = re.compile(r"\b(stts:[a-z0-9_:]+)\b")


def _rules() -> list[dict]:
    groups = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _adapter_rules() -> list[dict]:
    values = yaml.safe_load((DEPLOY / "k8s/prometheus-adapter-values.yaml").read_text())
    return values["rules"]["custom"]


def _scaler_queries() -> list[str]:
    return [rule[key] for rule in _adapter_rules() for key in ("seriesQuery", "metricsQuery")]


def test_the_autoscaler_scales_on_a_metric_the_adapter_serves() -> None:
    hpa = yaml.safe_load((DEPLOY / "k8s/hpa.yaml").read_text())
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    served = {rule["name"]["as"] for rule in _adapter_rules()}
    assert wanted and wanted <= served, (wanted, served)
    deployment = next(yaml.safe_load_all((DEPLOY / "k8s/deployment.yaml").read_text()))
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/stts-vllm.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_every_monitored_metric_is_exported(server: Server) -> None:
    server.openai().models.list()  # some traffic first
    exported = {name.split("{")[0] for name in metric_values(server)}
    exprs = _dashboard_exprs() + [rule["expr"] for rule in _rules()] + _scaler_queries()
    names = {m for e in exprs for m in METRIC.findall(e)}
    assert names, "no metric names found in the monitoring config"
    missing = sorted(n for n in names if n not in exported)
    assert not missing, f"monitored but not exported: {missing}"
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    used = {m for e in exprs for m in RECORDED.findall(e)}
    assert used <= recorded, f"recording rules used but not defined: {sorted(used - recorded)}"


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing (Debian package prometheus; .ci/run installs it)"
    config = (
        (DEPLOY / "prometheus/prometheus.yml")
        .read_text()
        .replace("/etc/prometheus/rules.yml", str(DEPLOY / "prometheus/rules.yml"))
    )
    (tmp_path / "prometheus.yml").write_text(config)
    for args in (
        ["check", "config", str(tmp_path / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus/rules.yml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def test_compose_file_matches_the_compose_spec() -> None:
    """The compose spec schema ships inside check-jsonschema: no network needed."""
    schema = ["--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run(
        [_tool("check-jsonschema"), *schema, str(DEPLOY / "compose.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", ["k8s/deployment.yaml", "k8s/hpa.yaml", "k8s/router.yaml"])
def test_kubernetes_manifests_match_the_api_schemas(path: str) -> None:
    """Strict: an unknown or misspelt field fails (the schemas ship with kubernetes-validate)."""
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", str(DEPLOY / path)],
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "WARN" not in output and "passed" in output, output


@pytest.mark.parametrize(
    "path",
    [
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/dashboards.yml",
        "k8s/prometheus-adapter-values.yaml",
        "alertmanager/alertmanager.yml",
    ],
)
def test_other_yaml_files_parse(path: str) -> None:
    """No published schema for these; their contents are bound to metrics by the tests above."""
    documents = list(yaml.safe_load_all((DEPLOY / path).read_text()))
    assert documents and all(documents)


def test_dockerfile_lints_clean() -> None:
    result = subprocess.run(
        [_tool("hadolint"), str(DEPLOY.parent / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- Production settings that must not regress (static: no server, no cluster) --------------


def _k8s(kind: str) -> list[dict]:
    docs = yaml.safe_load_all((DEPLOY / "k8s/deployment.yaml").read_text())
    return [doc for doc in docs if doc and doc["kind"] == kind]


def _deployment() -> dict:
    (deployment,) = _k8s("Deployment")
    return deployment


def _container() -> dict:
    (container,) = _deployment()["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def _pre_stop_seconds(container: dict) -> float:
    """The preStop hook's sleep: `exec: sleep N` or Kubernetes' own `sleep: {seconds: N}`."""
    hook = container["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def test_the_grace_period_covers_pre_stop_and_drain() -> None:
    spec = _deployment()["spec"]["template"]["spec"]
    container = _container()
    pre_stop = _pre_stop_seconds(container)
    drain = float(_env(container)["STTS_DRAIN_SECONDS"])  # set explicitly, not the default
    assert pre_stop > 0 and drain > 0
    # The grace period counts from the start of preStop; SIGKILL comes at its end.
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain, (spec, pre_stop, drain)


def test_compose_stop_grace_covers_the_drain() -> None:
    stts = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["stts"]
    drain = float(stts["environment"]["STTS_DRAIN_SECONDS"])
    grace = re.fullmatch(r"(\d+)s", stts["stop_grace_period"])
    assert grace and int(grace[1]) > drain, stts


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _quantity(value: str | int) -> float:
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, value
    return float(match[1]) * _UNITS[match[2]]


def test_pods_have_bounded_resources() -> None:
    resources = _container()["resources"]
    requests, limits = resources["requests"], resources["limits"]
    for name in ("memory", "ephemeral-storage", "nvidia.com/gpu"):
        assert name in limits and name in requests, (name, resources)
        assert _quantity(requests[name]) <= _quantity(limits[name]), (name, resources)
    # /dev/shm is tmpfs: its pages count against the memory limit, which must leave room.
    shm = next(
        v for v in _deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == "shm"
    )
    assert _quantity(limits["memory"]) > _quantity(shm["emptyDir"]["sizeLimit"])


def test_pods_run_unprivileged() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    container = _container()
    context = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add")
    seccomp = context.get("seccompProfile") or pod["securityContext"].get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}
    if context.get("readOnlyRootFilesystem"):
        # Everything the server and vLLM write must then be a volume: uploads, $HOME's
        # caches (vLLM, Triton, FlashInfer) and /tmp (torch.compile).
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        home = _env(container)["HOME"]
        needed = {_env(container)["STTS_FILES_DIR"], home, "/tmp", "/dev/shm"}
        assert needed <= writable, (needed, writable)


def test_a_disruption_budget_covers_the_deployment() -> None:
    (budget,) = _k8s("PodDisruptionBudget")
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    selector = budget["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= labels.items(), (selector, labels)
    spec = budget["spec"]
    assert ("maxUnavailable" in spec) != ("minAvailable" in spec), spec
    if "minAvailable" in spec:  # must not block node drains at the HPA's smallest size
        hpa = yaml.safe_load((DEPLOY / "k8s/hpa.yaml").read_text())
        assert int(spec["minAvailable"]) < hpa["spec"]["minReplicas"], spec


def test_shared_claims_name_their_storage_class() -> None:
    """The default class is usually block storage (ReadWriteOnce): shared claims need their own."""
    claims = _k8s("PersistentVolumeClaim")
    shared = [
        c for c in claims if {"ReadWriteMany", "ReadOnlyMany"} & set(c["spec"]["accessModes"])
    ]
    assert any(c["metadata"]["name"] == "stts-files" for c in shared), claims
    for claim in shared:
        assert claim["spec"].get("storageClassName"), claim["metadata"]["name"]


def test_grafana_admin_password_comes_from_the_environment() -> None:
    grafana = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["grafana"]
    env = grafana["environment"]
    # ${VAR:?message}: compose refuses to start without it; no ${VAR:-default} fallback.
    assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", env["GF_SECURITY_ADMIN_PASSWORD"]), env
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false", env
    anonymous = env.get("GF_AUTH_ANONYMOUS_ENABLED", "false")
    assert anonymous == "false" or re.fullmatch(r"\$\{\w+:-false\}", anonymous), env
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer") == "Viewer", env


def test_alerts_go_to_an_alertmanager() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {
        target
        for manager in prometheus["alerting"]["alertmanagers"]
        for static in manager["static_configs"]
        for target in static["targets"]
    }
    service = next(name for name, s in compose.items() if "alertmanager" in s["image"])
    assert f"{service}:9093" in targets, (targets, service)
    mounted = {v.split(":")[0] for v in compose[service]["volumes"]}
    assert "./alertmanager/alertmanager.yml" in mounted, mounted

    path = DEPLOY / "alertmanager/alertmanager.yml"
    config = yaml.safe_load(path.read_text())
    receivers = {r["name"] for r in config["receivers"]}
    routes, used = [config["route"]], set()
    while routes:
        route = routes.pop()
        used.add(route.get("receiver", config["route"]["receiver"]))
        routes.extend(route.get("routes", []))
    assert config["route"]["receiver"] and used <= receivers, (used, receivers)
    amtool = shutil.which("amtool")
    if amtool:
        result = subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _selects(selector: str, status: str) -> bool:
    """Whether a PromQL label selector (`{status=~"5.."}`) keeps a series with that status."""
    for label, op, value in _MATCHER.findall(selector):
        if label != "status":
            continue
        hit = re.fullmatch(value, status) is not None if "~" in op else value == status
        if hit != (op in ("=", "=~")):
            return False
    return True


def test_the_error_rate_counts_server_errors_only() -> None:
    rules = _rules()
    ratio = next(r for r in rules if r.get("record") == "stts:request_error_ratio:rate5m")
    numerator = ratio["expr"].split("/")[0]
    (selector,) = re.findall(r"stts_requests_total(\{[^}]*\})", numerator)
    for status in ("500", "502", "503", "504"):
        assert _selects(selector, status), (selector, status)
    for status in ("200", "400", "401", "404", "413", "429", "499"):
        assert not _selects(selector, status), (selector, status)
    paging = [r for r in rules if r.get("labels", {}).get("severity") == "page"]
    assert any("stts:request_error_ratio:rate5m" in r["expr"] for r in paging), paging


def test_the_autoscaler_counts_each_waiting_request_once() -> None:
    """`stts_requests_queued` (admitted, no first token yet) already holds every request in
    vLLM's waiting queue: the HPA's queue depth must not add `vllm:num_requests_waiting`."""
    hpa = yaml.safe_load((DEPLOY / "k8s/hpa.yaml").read_text())
    by_name = {rule["name"]["as"]: rule for rule in _adapter_rules()}
    series: list[str] = []
    for metric in hpa["spec"]["metrics"]:
        kind = metric["type"]
        name = metric[kind.lower()]["metric"]["name"]
        rule = by_name.get(name)
        series += METRIC.findall(rule["metricsQuery"]) if rule else [name]
    assert len(series) == len(set(series)), series
    assert not {"stts_requests_queued", "vllm:num_requests_waiting"} <= set(series), series


def test_python_and_av_requirements() -> None:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python = SpecifierSet(project["requires-python"])
    # 3.11: the CPU image (python:3.11-slim) and CI; 3.12: vllm/vllm-openai:v0.32.0.
    assert "3.11.9" in python and "3.12.3" in python, python
    dockerfile = (ROOT / "Dockerfile").read_text()
    for version in re.findall(r"FROM python:(\d+\.\d+)", dockerfile):
        assert f"{version}.0" in python, (version, python)

    (av,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "av"]
    assert any(s.operator in ("<", "<=", "~=", "==") for s in av.specifier), av  # upper bound
    import av as installed

    assert installed.__version__ in av.specifier, (installed.__version__, av)
    # The gpu image installs av on its own: the same range.
    pinned = [Requirement(r).specifier for r in re.findall(r'"(av[^"]*)"', dockerfile)]
    assert pinned and all(spec == av.specifier for spec in pinned), (pinned, av)


# -- The router in front of the replicas (compose, Kubernetes) ---------------------------------

ROUTER_PYTHON = ROOT / ".venv-router/bin/python"


def _parse_router_args(argv: list[str]) -> dict:
    """`argv` parsed and validated by the pinned vllm-router's own argument parser."""
    assert ROUTER_PYTHON.exists(), "vllm-router missing: scripts/install_router.sh"
    code = (
        "import json, sys\n"
        "from vllm_router.launch_router import parse_router_args\n"
        "args = parse_router_args(sys.argv[1:])\n"
        "print(json.dumps(vars(args), default=str))"
    )
    result = subprocess.run(
        [str(ROUTER_PYTHON), "-c", code, *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def _k8s_router() -> dict:
    docs = yaml.safe_load_all((DEPLOY / "k8s/router.yaml").read_text())
    return next(d for d in docs if d["kind"] == "Deployment")


def test_the_kubernetes_router_finds_the_replicas_and_is_scraped() -> None:
    pod = _k8s_router()["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    argv = [a.replace("$(POD_NAMESPACE)", "stts") for a in container["args"]]
    args = _parse_router_args(argv)
    replicas = _deployment()["spec"]["template"]
    # service discovery by the replicas' own label, on the port they listen on
    assert args["service_discovery"] is True
    assert args["selector"] == replicas["metadata"]["labels"], args["selector"]
    port = next(p["containerPort"] for p in _container()["ports"] if p["name"] == "http")
    assert args["service_discovery_port"] == port
    assert args["service_discovery_namespace"] == "stts"
    # the replicas' readiness is what the router health-checks
    assert args["health_check_endpoint"] == _container()["readinessProbe"]["httpGet"]["path"]
    assert args["policy"] == "consistent_hash"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == args["prometheus_port"]
    # discovery reads pods: the Role grants exactly that to the router's account
    docs = list(yaml.safe_load_all((DEPLOY / "k8s/router.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "Role")
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"]
    assert binding["subjects"][0]["name"] == pod["spec"]["serviceAccountName"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_the_ingress_sends_files_to_the_replicas_and_the_rest_to_the_router() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s/router.yaml").read_text()))
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    paths = {
        p["path"]: p["backend"]["service"]["name"]
        for rule in ingress["spec"]["rules"]
        for p in rule["http"]["paths"]
    }
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    (replicas,) = _k8s("Service")
    assert paths["/v1/files"] == replicas["metadata"]["name"]
    router = services[paths["/"]]
    assert router["spec"]["selector"] == _k8s_router()["spec"]["template"]["metadata"]["labels"]


def test_the_compose_router_lists_every_replica_and_is_scraped(tmp_path: Path) -> None:
    """The router service's shell command, run with a `vllm-router` that parses its arguments
    with the real router's parser: one worker per replica of the scaled `stts` service."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    router = services["router"]
    shim = tmp_path / "vllm-router"
    shim.write_text(
        f"#!{ROUTER_PYTHON}\n"
        "import json, sys\n"
        "from vllm_router.launch_router import parse_router_args\n"
        "print(json.dumps(vars(parse_router_args(sys.argv[1:])), default=str))\n"
    )
    shim.chmod(0o755)
    (command,) = router["command"]
    command = command.replace("$$", "$")  # compose's escape for a literal $
    for replicas in (2, 3):
        result = subprocess.run(
            [*router["entrypoint"], command],
            capture_output=True,
            text=True,
            env={"PATH": f"{tmp_path}:/usr/bin:/bin", "STTS_REPLICAS": str(replicas)},
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        args = json.loads(result.stdout.splitlines()[-1])
        assert args["worker_urls"] == [
            f"http://{compose['name']}-stts-{i}:8000" for i in range(1, replicas + 1)
        ]
    # the same routing and health checks as the Kubernetes router
    (k8s,) = _k8s_router()["spec"]["template"]["spec"]["containers"]
    k8s_args = _parse_router_args([a.replace("$(POD_NAMESPACE)", "stts") for a in k8s["args"]])
    for key in (
        "policy",
        "health_check_endpoint",
        "health_check_interval_secs",
        "health_failure_threshold",
        "cb_timeout_duration_secs",
        "prometheus_port",
    ):
        assert args[key] == k8s_args[key], key
    assert re.fullmatch(r"\$\{STTS_REPLICAS:-\d+\}", str(services["stts"]["deploy"]["replicas"]))
    assert router["environment"]["STTS_REPLICAS"] == services["stts"]["deploy"]["replicas"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {
        t
        for job in prometheus["scrape_configs"]
        for c in job.get("static_configs", [])
        for t in c["targets"]
    }
    assert f"router:{args['prometheus_port']}" in targets, targets
    replica_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "stts-vllm")
    assert replica_job["dns_sd_configs"][0]["names"] == ["stts"]  # every replica, not one
    gateway = services["gateway"]
    assert "./gateway/nginx.conf:/etc/nginx/nginx.conf:ro" in gateway["volumes"]
    assert "ports" not in services["stts"] and "ports" not in router  # one front door


def test_the_router_is_pinned_once() -> None:
    script = (ROOT / "scripts/install_router.sh").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    (pinned,) = re.findall(r"^VLLM_ROUTER_VERSION=(\S+)$", script, re.M)
    (image,) = re.findall(r"^ARG VLLM_ROUTER_VERSION=(\S+)$", dockerfile, re.M)
    assert pinned == image
    installed = subprocess.run(
        [
            str(ROUTER_PYTHON),
            "-c",
            "import importlib.metadata as m; print(m.version('vllm-router'))",
        ],
        capture_output=True,
        text=True,
    )
    assert installed.stdout.strip() == pinned, installed.stdout + installed.stderr
