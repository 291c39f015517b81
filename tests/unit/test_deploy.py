"""deploy/: the Helm chart renders, validates against Kubernetes' schemas, and says what the
issue asks (grpc probes on the health-only port, disruption budgets, autoscalers, the edge's
load balancer and X-Forwarded-For trust, secrets as files); the edge's init container runs a
command line `televote edge-config` accepts, and Envoy accepts what it writes.

deploy/check.py runs in the deploy tools' virtualenv (scripts/install --test); .ci/run runs
it whole (checkov and hadolint too), this test its quick part.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ops import pki, tokens
from ops.stack import SERVICES

REPO = Path(__file__).resolve().parents[2]
TOOLS_PYTHON = REPO / "build" / "deploy-tools" / "bin" / "python"
HEALTH_PORT = 50052


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    if not TOOLS_PYTHON.exists():
        pytest.skip("no deploy tools: run scripts/install --test")
    out = tmp_path_factory.mktemp("deploy")
    checked = subprocess.run([str(TOOLS_PYTHON), "deploy/check.py", "--quick", "--out", str(out)],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return {name: json.loads((out / name / "resources.json").read_text())
            for name in ("defaults", "ci")}


def _of_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def test_every_service_is_probed_on_its_health_port_and_kept_available(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered["defaults"]
    deployments = _of_kind(resources, "Deployment")
    budgets, autoscalers = _of_kind(resources, "PodDisruptionBudget"), _of_kind(
        resources, "HorizontalPodAutoscaler")
    for service in SERVICES:
        name = f"televote-{service.replace('_', '-')}"
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["TELEVOTE_HEALTH_PORT"] == str(HEALTH_PORT)
        assert container["readinessProbe"]["grpc"] == {"port": HEALTH_PORT}
        assert container["livenessProbe"]["grpc"] == {"port": HEALTH_PORT,
                                                      "service": "televote.liveness"}
        assert container["resources"]["requests"]["cpu"]
        # Secrets are files (TELEVOTE_SECRETS_DIR), never environment variables.
        assert not any("secretKeyRef" in item.get("valueFrom", {}) for item in container["env"])
        assert budgets[name]["spec"]["maxUnavailable"] == 1
        assert autoscalers[name]["spec"]["minReplicas"] >= 2
        assert autoscalers[name]["spec"]["scaleTargetRef"]["name"] == name
    assert {"televote-edge"} <= budgets.keys() & autoscalers.keys()


def test_the_edge_is_a_load_balancer_that_trusts_forwarded_for_only_when_told(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    for values, hops, policy in (("defaults", 0, "Local"), ("ci", 1, "Cluster")):
        edge = _of_kind(rendered[values], "Service")["televote-edge"]["spec"]
        assert edge["type"] == "LoadBalancer" and edge["externalTrafficPolicy"] == policy
        init = _of_kind(rendered[values], "Deployment")["televote-edge"]["spec"]["template"][
            "spec"]["initContainers"][0]
        assert f"--trusted-proxy-hops={hops}" in init["command"]


def test_the_edge_pods_command_renders_a_config_envoy_accepts(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The init container's own arguments, its mounted files stood in by local ones."""
    init = _of_kind(rendered["defaults"], "Deployment")["televote-edge"]["spec"]["template"][
        "spec"]["initContainers"][0]
    assert init["command"][:2] == ["televote", "edge-config"]
    tls = pki.issue(tmp_path, pki.EDGE, tmp_path / "tls")
    places = {"/etc/envoy/envoy.yaml": str(tmp_path / "envoy.yaml"),
              "/etc/televote/jwks/jwks.json": str(tokens.ensure_signing_key(tmp_path)),
              "/etc/televote/tls": str(tls.directory)}
    arguments = []
    for argument in init["command"][1:]:
        option, _, value = argument.partition("=")
        arguments.append(f"{option}={places.get(value, value)}" if value else argument)
    televote = shutil.which("televote") or str(Path(sys.executable).parent / "televote")
    subprocess.run([televote, *arguments], check=True, timeout=120)
    envoy = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    checked = subprocess.run([envoy, "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_migrate_reads_the_owners_url_from_a_mounted_file(tmp_path: Path) -> None:
    """The migrations Job gives `televote migrate` the owner's URL as a file, not a variable:
    the URL in the file is the one dialled (here a port nothing listens on)."""
    from typer.testing import CliRunner

    from ops.cli import app

    url_file = tmp_path / "uri"
    url_file.write_text("postgresql://owner:secret@127.0.0.1:1/televote\n")
    result = CliRunner(env={"DATABASE_URL": ""}).invoke(
        app, ["migrate", "--database-url-file", str(url_file)])
    assert result.exit_code != 0
    assert "127.0.0.1" in str(result.exception) and "port 1" in str(result.exception)
    missing = CliRunner(env={"DATABASE_URL": ""}).invoke(app, ["migrate"])
    assert missing.exit_code != 0 and "--database-url-file" in missing.output
