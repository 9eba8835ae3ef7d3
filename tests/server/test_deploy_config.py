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


def _scaler_queries() -> list[str]:
    documents = yaml.safe_load_all((DEPLOY / "k8s/keda-scaledobject.yaml").read_text())
    return [t["metadata"]["query"] for d in documents for t in d["spec"]["triggers"]]


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


@pytest.mark.parametrize(
    "path",
    [
        "compose.yaml",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/dashboards.yml",
        "k8s/deployment.yaml",
        "k8s/keda-scaledobject.yaml",
    ],
)
def test_yaml_files_parse(path: str) -> None:
    """Syntax only; schema validation (compose spec, Kubernetes) is still to do."""
    documents = list(yaml.safe_load_all((DEPLOY / path).read_text()))
    assert documents and all(documents)


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(DEPLOY.parent / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
