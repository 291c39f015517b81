"""Mesh identity: mutual TLS between the edge and the services and among the services.

Each process holds a key and a certificate issued by the mesh's CA (ops/pki.py) naming it in
its subjectAltName, in `TELEVOTE_TLS_DIR` (cert.pem, key.pem, ca.pem). A server requires a
certificate from every caller; who the caller is comes from that certificate, not from
anything it says (runtime/interceptors.py):
- the edge's certificate: the caller is the end user whose claims the edge verified and
  forwarded (`x-jwt-payload`);
- a service's certificate: the caller is that service, role internal;
- any other certificate of the CA (an operator's grpcurl): anonymous, which reaches health
  and reflection only.

Without `TELEVOTE_TLS_DIR` a service listens in plaintext and believes the claims header of
whoever connects: for tests that start one service on loopback, never for a mesh
(`televote up` always gives one; only bench/mtls_bench.py turns it off, to measure its cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

EDGE = "edge"


def peer_name(holder: str) -> str:
    """The DNS name in a holder's certificate: vote_svc -> vote-svc (DNS names have no _)."""
    return holder.replace("_", "-")


def service_of(name: str) -> str:
    """The service a certificate name stands for: vote-svc -> vote_svc."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class MeshTls:
    """One process's certificate, key and the CA it trusts."""

    certificate: bytes
    key: bytes
    ca: bytes

    @classmethod
    def of(cls, directory: Path | None) -> MeshTls | None:
        """The process's identity from its TELEVOTE_TLS_DIR, None without one."""
        return cls.load(directory) if directory else None

    @classmethod
    def load(cls, directory: Path) -> MeshTls:
        return cls((directory / "cert.pem").read_bytes(), (directory / "key.pem").read_bytes(),
                   (directory / "ca.pem").read_bytes())

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.certificate)],
                                           root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.certificate)


def channel(target: str, service: str, tls: MeshTls | None,
            options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """A channel to `service`'s replicas at `target`: mutual TLS that checks the replicas'
    certificates name `service` when this process has a certificate, else plaintext.

    Calls are spread over every address the target names or resolves to (`ipv4:a,b` from
    `televote up`, a headless Service's `dns:///` name in Kubernetes): grpc's default policy,
    pick_first, would send them all to the first replica."""
    options = [("grpc.lb_policy_name", "round_robin"), *(options or [])]
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    # Replicas are dialled by address; the name their certificate must carry is set here.
    return grpc.aio.secure_channel(
        target, tls.channel_credentials(),
        options=[*options, ("grpc.ssl_target_name_override", peer_name(service))])


def peer_of(context: Any) -> str | None:
    """The name in the caller's verified certificate (its first subjectAltName), None on a
    plaintext connection or for a certificate without one.

    Read as the call's peer identity, which grpc keys by the subjectAltName whenever the
    certificate has one: the same names as the auth context's, without building the whole
    context (every property, the PEM certificate included) on every call (~7 of ~10 µs)."""
    if context.peer_identity_key() != _SUBJECT_ALT_NAME:
        return None
    names = context.peer_identities()
    return names[0].decode() if names else None


_SUBJECT_ALT_NAME = "x509_subject_alternative_name"
