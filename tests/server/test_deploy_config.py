"""The deployment's monitoring config is valid and bound to metrics the server really exports
(no Grafana panel or alert rule watching a name that does not exist)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.server.conftest import Server
from tests.server.test_chat_api import metric_values

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
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


@pytest.mark.parametrize("path", ["k8s/deployment.yaml", "k8s/hpa.yaml"])
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
