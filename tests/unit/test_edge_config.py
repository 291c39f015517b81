"""The edge's Envoy config as ops/edge.py renders it, checked by Envoy itself (no mesh)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from ops import edge, pki, tokens
from ops.stack import SERVICES


def test_an_edge_behind_a_load_balancer_trusts_its_forwarded_for(tmp_path: Path) -> None:
    """With a proxy in front (trusted_proxy_hops=1) the edge takes the caller's IP from that
    proxy's X-Forwarded-For entry, and unary services have their load-shedding ceiling; the
    config Envoy is given must be one it accepts."""
    config = tmp_path / "edge.yaml"
    config.write_text(edge.render(edge.EdgeSettings(
        jwks_path=tokens.ensure_signing_key(tmp_path), jwt_issuer=tokens.ISSUER,
        jwt_audience=tokens.AUDIENCE, trusted_proxy_hops=1,
        upstreams={service: [("127.0.0.1", 1)] for service in SERVICES})))
    text = config.read_text()
    assert "xff_num_trusted_hops: 1" in text
    # Unary services shed load at the edge; streaming ones carry an audience.
    clusters = next(line for line in text.splitlines() if line.strip().startswith("clusters:"))
    limits = {cluster["name"]: cluster["circuit_breakers"]["thresholds"][0]["max_requests"]
              for cluster in json.loads(clusters.split(":", 1)[1])}
    assert limits["vote_svc"] == 500 and limits["sync_svc"] == limits["results_svc"] == 1_000_000
    envoy = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    checked = subprocess.run([envoy, "--mode", "validate", "-c", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_edge_holds_abuse_limits_and_reaches_each_service_by_its_certificate(
        tmp_path: Path) -> None:
    """Buckets per IP, anonymous IP and subject; flood guards at Envoy's defaults; the
    overload manager; upstreams over mutual TLS that must name their service. Envoy accepts
    it, and the variant without the filters (bench/mtls_bench.py) too."""
    identity = pki.issue(tmp_path, pki.EDGE, tmp_path / "edge-tls")
    for filters in (True, False):
        config = tmp_path / f"edge-{filters}.yaml"
        config.write_text(edge.render(edge.EdgeSettings(
            jwks_path=tokens.ensure_signing_key(tmp_path), jwt_issuer=tokens.ISSUER,
            jwt_audience=tokens.AUDIENCE, upstream_tls=identity, abuse_filters=filters,
            upstreams={service: [("127.0.0.1", 1)] for service in SERVICES})))
        text = config.read_text()
        assert "max_outbound_frames:" not in text and "overload_manager:" in text
        assert ('"descriptor_key": "subject"' in text) is filters
        assert ("envoy.filters.http.buffer" in text) is filters
        clusters = next(line for line in text.splitlines()
                        if line.strip().startswith("clusters:"))
        for cluster in json.loads(clusters.split(":", 1)[1]):
            context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
            [san] = context["validation_context"]["match_typed_subject_alt_names"]
            assert san["matcher"]["exact"] == cluster["name"].replace("_", "-")
        envoy = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
        checked = subprocess.run([envoy, "--mode", "validate", "-c", str(config)],
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_an_edge_in_kubernetes_reaches_every_replica_behind_a_service_name(
        tmp_path: Path) -> None:
    """`televote edge-config` (what deploy/'s edge pods run before Envoy): each service is
    one DNS name resolved to all its replicas, the edge sheds load for as many replicas as
    the autoscaler may run, and trusts one load balancer's X-Forwarded-For; Envoy accepts it."""
    from typer.testing import CliRunner

    from ops.cli import app

    tls = pki.issue(tmp_path, pki.EDGE, tmp_path / "tls")
    config = tmp_path / "envoy.yaml"
    result = CliRunner().invoke(app, [
        "edge-config", "--out", str(config), "--jwks", str(tokens.ensure_signing_key(tmp_path)),
        "--tls-dir", str(tls.directory), "--trusted-proxy-hops", "1",
        "--max-replicas", "vote_svc=20",
        *(option for service in SERVICES for option in (
            "--upstream", f"{service}=televote-{service.replace('_', '-')}.ns.svc:50051"))])
    assert result.exit_code == 0, result.output
    text = config.read_text()
    assert "xff_num_trusted_hops: 1" in text
    clusters = next(line for line in text.splitlines() if line.strip().startswith("clusters:"))
    by_name = {cluster["name"]: cluster for cluster in json.loads(clusters.split(":", 1)[1])}
    assert {cluster["type"] for cluster in by_name.values()} == {"STRICT_DNS"}
    assert by_name["vote_svc"]["circuit_breakers"]["thresholds"][0]["max_requests"] == 20 * 500
    assert by_name["fraud_svc"]["circuit_breakers"]["thresholds"][0]["max_requests"] == 500
    envoy = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    checked = subprocess.run([envoy, "--mode", "validate", "-c", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_edge_config_names_a_missing_upstream(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ops.cli import app

    result = CliRunner().invoke(app, [
        "edge-config", "--out", str(tmp_path / "envoy.yaml"),
        "--jwks", str(tokens.ensure_signing_key(tmp_path)),
        "--upstream", "vote_svc=televote-vote-svc:50051"])
    assert result.exit_code != 0 and "no upstream for fraud_svc" in result.output
