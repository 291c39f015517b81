"""Services trust no caller (issue 21): who calls comes from the caller's mesh certificate.
The claims header is believed from the edge's certificate only, the internal role from a
service's certificate only, and a service port refuses callers without a certificate of the
mesh's CA."""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ops.stack import Stack
from runtime.access import PAYLOAD_HEADER, Principal, Role
from runtime.errors import error_info
from televote.fraud.v1 import fraud_scoring_service_pb2, fraud_scoring_service_pb2_grpc
from televote.sync.v1 import show_control_service_pb2, show_control_service_pb2_grpc

SCORE = fraud_scoring_service_pb2.ScoreVotesRequest()


def _forged(role: str, subject: str = "mallory") -> tuple[tuple[str, str]]:
    claims = json.dumps({"role": role, "sub": subject}).encode()
    return ((PAYLOAD_HEADER, base64.urlsafe_b64encode(claims).decode().rstrip("=")),)


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return error.code(), info.reason if info else ""
    return grpc.StatusCode.OK, ""


async def test_a_forged_claims_header_straight_to_a_service_port_is_refused(
        stack: Stack) -> None:
    # In plaintext, the port does not even answer.
    async with grpc.aio.insecure_channel(stack.target("fraud_svc")) as plaintext:
        code, _ = await _code(fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(plaintext)
                              .ScoreVotes(SCORE, metadata=_forged("internal", "vote_svc"),
                                          timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    # With a certificate of the mesh that is not a service's, the header is not believed.
    async with stack.channel("fraud_svc") as operator:
        stub = fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(operator)
        for role in ("internal", "operator", "voter"):
            assert await _code(stub.ScoreVotes(SCORE, metadata=_forged(role, "vote_svc"),
                                               timeout=5)) == (
                grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"), role


async def test_the_internal_role_comes_only_from_a_services_certificate(stack: Stack) -> None:
    async with stack.channel("fraud_svc", as_holder="vote_svc") as as_vote:
        # Admitted, then validated: an empty batch is invalid.
        assert (await _code(fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(as_vote)
                            .ScoreVotes(SCORE, timeout=5)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    # The edge's certificate carries end users, never the mesh's own role.
    async with stack.channel("fraud_svc", as_holder="edge") as as_edge:
        assert await _code(fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(as_edge)
                           .ScoreVotes(SCORE, metadata=_forged("internal", "vote_svc"),
                                       timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


async def test_a_service_cannot_pass_itself_off_as_an_operator(stack: Stack) -> None:
    """A service's certificate means that service: operator claims it adds are ignored."""
    request = show_control_service_pb2.CreateShowRequest()
    async with stack.channel("sync_svc", as_holder="vote_svc") as as_vote:
        stub = show_control_service_pb2_grpc.ShowControlServiceStub(as_vote)
        assert await _code(stub.CreateShow(request, metadata=_forged("operator"), timeout=5)) \
            == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    async with stack.channel("sync_svc", as_holder="edge") as as_edge:
        stub = show_control_service_pb2_grpc.ShowControlServiceStub(as_edge)
        code, _ = await _code(stub.CreateShow(
            request, metadata=Principal(Role.OPERATOR, "producer").to_metadata(), timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # admitted, then validated


def _stranger_identity(directory: Path, name: str) -> tuple[bytes, bytes]:
    """A key and a self-signed certificate naming `name`, from no CA of ours."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
                   .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            certificate.public_bytes(serialization.Encoding.PEM))


async def test_a_certificate_from_another_ca_is_refused(stack: Stack, tmp_path: Path) -> None:
    key, certificate = _stranger_identity(tmp_path, "edge")
    ca = (stack.tls_dir("operator") / "ca.pem").read_bytes()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                               certificate_chain=certificate)
    async with grpc.aio.secure_channel(
            stack.target("fraud_svc"), credentials,
            options=[("grpc.ssl_target_name_override", "fraud-svc")]) as channel:
        code, _ = await _code(fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(channel)
                              .ScoreVotes(SCORE, metadata=_forged("voter"), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_a_replica_must_present_the_certificate_of_the_service_dialled(
        stack: Stack) -> None:
    """Dialling fraud_svc's address while expecting sync_svc fails: a replica's certificate
    names its service, so a misdirected address cannot impersonate another service."""
    from runtime import mesh
    from runtime.mesh import MeshTls

    tls = MeshTls.load(stack.tls_dir("vote_svc"))
    async with mesh.channel(stack.target("fraud_svc"), "sync_svc", tls) as channel:
        code, _ = await _code(fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(channel)
                              .ScoreVotes(SCORE, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("holder", ["edge", "operator", "vote_svc"])
def test_every_mesh_certificate_names_its_holder_and_its_key_is_private(
        stack: Stack, holder: str) -> None:
    directory = stack.tls_dir(holder)
    certificate = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [holder.replace("_", "-")]
    assert (directory / "key.pem").stat().st_mode & 0o077 == 0
