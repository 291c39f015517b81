"""The edge's Envoy config as ops/edge.py renders it, checked by Envoy itself (no mesh)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ops import edge, pki, tokens
from ops.cli import app
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
            # The votes' own cluster reaches vote_svc's replicas: vote_svc's certificate.
            process = "vote_svc" if cluster["name"] == edge.VOTE_CLUSTER else cluster["name"]
            assert san["matcher"]["exact"] == process.replace("_", "-")
        envoy = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
        checked = subprocess.run([envoy, "--mode", "validate", "-c", str(config)],
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_an_edge_on_a_host_of_its_own_is_configured_from_its_own_files(tmp_path: Path) -> None:
    """`televote edge-config` renders the edge of a deployment from the files on its host and
    the services' addresses: replicas named by DNS (a headless Service) are resolved by Envoy,
    replicas given by IP are static; Envoy accepts the config."""
    jwks = tokens.ensure_signing_key(tmp_path / "deployer")
    tls = pki.issue(tmp_path / "deployer", pki.EDGE, tmp_path / "edge-host" / "tls")
    upstreams = [f"--upstream={service}={service.replace('_', '-')}.televote:7000"
                 for service in SERVICES if service != "vote_svc"]
    upstreams += ["--upstream=vote_svc=10.0.0.5:7000", "--upstream=vote_svc=10.0.0.6:7000"]
    result = CliRunner().invoke(app, ["edge-config", "--jwks", str(jwks), "--tls-dir",
                                      str(tls.directory), "--host", "0.0.0.0", *upstreams])
    assert result.exit_code == 0, result.output
    config = tmp_path / "edge.yaml"
    config.write_text(result.output)
    clusters = next(line for line in result.output.splitlines()
                    if line.strip().startswith("clusters:"))
    kinds = {cluster["name"]: cluster["type"] for cluster in json.loads(clusters.split(":", 1)[1])}
    assert kinds == {**dict.fromkeys(SERVICES, "STRICT_DNS"), "vote_svc": "STATIC",
                     edge.VOTE_CLUSTER: "STATIC"}
    assert str(tls.certificate) in result.output and str(jwks) in result.output
    envoy = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    checked = subprocess.run([envoy, "--mode", "validate", "-c", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    missing = CliRunner().invoke(app, ["edge-config", "--jwks", str(jwks), *upstreams[:2]])
    assert missing.exit_code != 0 and "no address for" in missing.output


def test_an_edge_in_kubernetes_sheds_load_for_the_replicas_its_autoscaler_may_run(
        tmp_path: Path) -> None:
    """What deploy/'s edge pods run before Envoy: one DNS name per service, written to a file;
    the edge sheds load for as many replicas as the autoscaler may run (one DNS name says
    nothing about how many there are), trusts one load balancer's X-Forwarded-For and takes
    the deployment's token issuer and browser origins; Envoy accepts it."""
    tls = pki.issue(tmp_path, pki.EDGE, tmp_path / "tls")
    config = tmp_path / "envoy.yaml"
    result = CliRunner().invoke(app, [
        "edge-config", "--out", str(config), "--jwks", str(tokens.ensure_signing_key(tmp_path)),
        "--tls-dir", str(tls.directory), "--trusted-proxy-hops", "1",
        "--max-replicas", "vote_svc=20", "--jwt-issuer", "https://id.example.com",
        "--cors-origin", "https://vote.example.com",
        *(f"--upstream={service}=televote-{service.replace('_', '-')}.ns.svc:50051"
          for service in SERVICES)])
    assert result.exit_code == 0, result.output
    text = config.read_text()
    assert "xff_num_trusted_hops: 1" in text
    assert "https://id.example.com" in text and "https://vote.example.com" in text
    clusters = next(line for line in text.splitlines() if line.strip().startswith("clusters:"))
    by_name = {cluster["name"]: cluster for cluster in json.loads(clusters.split(":", 1)[1])}
    assert {cluster["type"] for cluster in by_name.values()} == {"STRICT_DNS"}
    assert by_name["vote_svc"]["circuit_breakers"]["thresholds"][0]["max_requests"] == 20 * 500
    assert by_name["fraud_svc"]["circuit_breakers"]["thresholds"][0]["max_requests"] == 500
    # Votes have a cluster of their own on the same replicas, its breaker per replica too:
    # only SubmitVote is held to it.
    votes = by_name[edge.VOTE_CLUSTER]
    assert votes["circuit_breakers"]["thresholds"][0]["max_requests"] == \
        20 * edge.EdgeSettings.votes_in_flight_per_replica
    assert votes["load_assignment"] == {**by_name["vote_svc"]["load_assignment"],
                                        "cluster_name": edge.VOTE_CLUSTER}
    assert "adaptive_concurrency" not in text
    envoy = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    checked = subprocess.run([envoy, "--mode", "validate", "-c", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
