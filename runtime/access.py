"""Who may call what: one table read by the Envoy edge (RBAC) and by every service.

Envoy authenticates the caller's JWT and forwards its verified claims in the
`x-jwt-payload` header (base64url JSON); the edge strips any copy a client sends, and a service
believes the header only on a connection whose client certificate is the edge's
(runtime/mesh.py). Each gRPC service has exactly one audience, so the table is
kept per service: the edge renders its RBAC policies from it, and the server's guard
enforces the same table again so a caller that reaches a service some other way (a
misrouted request, another internal service) is held to the same rules (invariant 9).
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

PAYLOAD_HEADER = "x-jwt-payload"


class Role(StrEnum):
    """The `role` claim of a televote JWT."""

    ANONYMOUS = "anonymous"  # no token at all: viewers watching the show and the results
    VOTER = "voter"
    OPERATOR = "operator"
    CARRIER = "carrier"
    INTERNAL = "internal"  # services of the mesh calling each other; never routed by the edge


#: The longest a token of each role may live (exp - iat), enforced by the edge. An operator
#: token opens and closes voting on live TV: a stolen one is worth little an hour later. A
#: role without an entry gets no tokens.
TOKEN_LIFETIME_SECONDS: dict[Role, int] = {
    Role.OPERATOR: 3600,
    Role.VOTER: 24 * 3600,
    # An SMS gateway's token sits in its configuration (Kannel's get-url, ops/kannel.py) for
    # a season; it can only reach the carrier routes, and only as its own carrier.
    Role.CARRIER: 90 * 24 * 3600,
}

#: How far the edge's clock may be from the issuer's when it judges `exp`, `nbf` and `iat`.
TOKEN_CLOCK_SKEW_SECONDS = 30

PUBLIC = frozenset({Role.ANONYMOUS, Role.VOTER, Role.OPERATOR})

#: Full gRPC service name -> the roles allowed to call it.
SERVICE_ROLES: dict[str, frozenset[Role]] = {
    "televote.sync.v1.ShowControlService": frozenset({Role.OPERATOR}),
    "televote.sync.v1.ShowWatchService": PUBLIC,
    "televote.sync.v1.ShowInternalService": frozenset({Role.INTERNAL}),
    "televote.vote.v1.VoteService": frozenset({Role.VOTER}),
    "televote.vote.v1.VoteGatewayService": frozenset({Role.CARRIER, Role.INTERNAL}),
    "televote.vote.v1.WalletAdminService": frozenset({Role.OPERATOR}),
    # Apple and Google post without a televote token: each push is authenticated by the
    # service itself (Apple's signature; the Pub/Sub push token, then the store is asked).
    "televote.vote.v1.StoreNotificationService": frozenset({Role.ANONYMOUS}),
    "televote.results.v1.ResultsService": PUBLIC,
    "televote.results.v1.ReportService": frozenset({Role.OPERATOR}),
    "televote.sms.v1.CarrierService": frozenset({Role.CARRIER}),
    "televote.sms.v1.ShortCodeService": frozenset({Role.OPERATOR}),
    "televote.fraud.v1.FraudScoringService": frozenset({Role.INTERNAL}),
    "televote.fraud.v1.FraudReviewService": frozenset({Role.OPERATOR}),
}

#: The processes of the mesh: a caller whose certificate names one of them calls as that
#: service, with the internal role (runtime/mesh.py).
MESH_SERVICES = frozenset({"fraud_svc", "sync_svc", "vote_svc", "results_svc", "sms_svc"})

#: Services every caller may reach on a service's own port (operators' grpcurl, probes).
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one RPC."""

    role: Role
    subject: str = ""

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Principal:
        """Read the caller from the edge's verified claims; no claims means anonymous.

        Whether to believe the header at all is decided per call, from the caller's
        certificate (runtime/interceptors.py); the edge verifies the token on every request.
        """
        encoded = metadata.get(PAYLOAD_HEADER)
        return _claimed(encoded) if encoded else ANONYMOUS

    def to_metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata that presents this principal to another service of the mesh."""
        claims = json.dumps({"role": self.role.value, "sub": self.subject}).encode()
        return ((PAYLOAD_HEADER, base64.urlsafe_b64encode(claims).decode().rstrip("=")),)


@functools.lru_cache(maxsize=16_384)
def _claimed(encoded: str) -> Principal:
    """The principal of a claims header. The same header always reads the same, so a voter's
    next calls (a few a minute while lines are open) skip the base64 and JSON decoding, a
    sixth of what the guard costs a call; bounded, so a flood of distinct headers costs
    only memory it gives back."""
    try:
        claims = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        return Principal(role=Role(claims["role"]), subject=str(claims.get("sub", "")))
    except (ValueError, KeyError, TypeError):
        return ANONYMOUS


ANONYMOUS = Principal(Role.ANONYMOUS)


def allowed(service: str, role: Role,
            table: Mapping[str, frozenset[Role]] = SERVICE_ROLES) -> bool:
    """Whether `role` may call methods of the full gRPC service name `service`."""
    if service in OPEN_SERVICES:
        return True
    return role in table.get(service, frozenset())


def routed_services() -> list[str]:
    """The services the edge routes: all but those only the mesh itself may call."""
    return sorted(name for name, roles in SERVICE_ROLES.items() if roles - {Role.INTERNAL})
