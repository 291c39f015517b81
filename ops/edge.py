"""Renders envoy/edge.yaml into a runnable Envoy config.

Routes, RBAC policies and JWT rules come from the access table (runtime/access.py), which
RPCs stream and which are transcoded to JSON come from the descriptor set that
`televote generate` writes, so the edge cannot drift from the contracts or from what the
services themselves enforce.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import grpc
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, json_format

from ops import web
from ops.pki import Identity
from runtime import overload
from runtime.access import (
    SERVICE_ROLES,
    TOKEN_CLOCK_SKEW_SECONDS,
    TOKEN_LIFETIME_SECONDS,
    Role,
    routed_services,
)
from runtime.errors import ApiError
from runtime.mesh import peer_name

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
TEMPLATE = ENVOY_DIR / "edge.yaml"
DESCRIPTOR_SET = ENVOY_DIR / "televote.pb"

#: The verified token's subject and role, for the per-subject rate limit (clients' copies
#: stripped).
_SUBJECT_HEADER = "x-televote-subject"
_ROLE_HEADER = "x-televote-role"
#: Roles held to the per-subject bucket: people. A carrier's gateway carries every SMS of its
#: subscribers under one subject.
_SUBJECT_LIMITED = (Role.VOTER, Role.OPERATOR)

#: How long a unary RPC may take through the edge before it is cut; also the most a gRPC
#: caller's own deadline (grpc-timeout) may ask for. Envoy states the timeout it applies to
#: the service (grpc-timeout and x-envoy-expected-rq-timeout-ms), which is how vote_svc tells
#: a call's queue time on its own clock (runtime/overload.py `waited_ms`).
UNARY_TIMEOUT = "15s"
#: The route, and the Envoy cluster of its own, that votes take (`votes_in_flight_per_replica`).
SUBMIT_VOTE_PATH = "/televote.vote.v1.VoteService/SubmitVote"
VOTE_CLUSTER = "vote_svc_votes"


@dataclass(frozen=True)
class EdgeSettings:
    """Where the edge listens and what it trusts."""

    jwks_path: Path
    jwt_issuer: str
    jwt_audience: str
    host: str = "127.0.0.1"
    port: int = 8080
    admin_port: int = 9901
    cors_origins: tuple[str, ...] = ("http://localhost:8080", "http://127.0.0.1:8080")
    rate_limit_per_second: int = 50_000
    #: Requests per second (burst: twice) from one client IP, whoever it is. Generous: a
    #: mobile carrier's NAT puts thousands of viewers behind one address.
    per_ip_per_second: int = 2_000
    #: Requests per second (burst: twice) without a token from one client IP: viewers open
    #: their show and results streams and poll results; one address opening thousands of
    #: streams is throttled to this.
    anonymous_per_ip_per_second: int = 100
    #: Requests per second (burst: twice) of one token subject (a voter, an operator, a
    #: carrier): far above what an app or a person does, far below a script's flood.
    per_subject_per_second: int = 50
    #: Concurrent streams on one HTTP/2 connection to the edge.
    max_streams_per_connection: int = 1000
    #: The largest request body the edge takes (gRPC message, JSON or gRPC-Web body): above
    #: the largest a service accepts and answers with its own reason (a store receipt, 64 KiB,
    #: vote_svc/purchases.py). gRPC callers see a body refused here as UNKNOWN "Payload Too
    #: Large" (Envoy's mapping of HTTP 413), JSON callers as 413.
    max_request_bytes: int = 256 * 1024
    #: The per-IP, anonymous and per-subject buckets and the body buffer; off only to
    #: measure what they cost (bench/mtls_bench.py).
    abuse_filters: bool = True
    #: The overload manager's ceilings.
    max_heap_bytes: int = 1 << 30
    max_connections: int = 50_000
    #: Proxies in front of the edge (a cloud load balancer: 1) whose X-Forwarded-For entries
    #: are trusted for the caller's IP; 0 when clients connect to the edge directly, so a
    #: client cannot choose the IP that fraud scoring sees.
    trusted_proxy_hops: int = 0
    #: Load shedding at the edge, where it is cheapest: requests one replica of a service
    #: without streams (wallet, purchases, gateway batches, reviews, carriers) may have
    #: outstanding. Beyond it the edge answers UNAVAILABLE `OVERLOADED` at once instead of
    #: queueing calls in front of a saturated replica until every client's deadline has passed.
    unary_requests_per_replica: int = overload.UNARY_REQUESTS_PER_REPLICA
    #: Votes (SubmitVote) in flight per vote_svc replica: they go to a cluster of their own
    #: whose circuit breaker holds them to this, so a surge of votes queues at most this many
    #: calls in front of a replica and the rest is refused by the edge in microseconds, while
    #: every other vote_svc call keeps `unary_requests_per_replica` (runtime/overload.py).
    votes_in_flight_per_replica: int = overload.VOTES_IN_FLIGHT_PER_REPLICA
    descriptor_set: Path = DESCRIPTOR_SET
    #: The built web apps (web/dist), served by the edge itself under the API's origin.
    web_dir: Path = web.DIST
    #: Process name (e.g. "vote_svc") -> the host:port of each of its replicas (IP
    #: addresses, or a DNS name that resolves to them: a Kubernetes headless Service).
    upstreams: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    #: Replicas a service may have when its upstream is one DNS name (the most its autoscaler
    #: runs): the edge's load shedding allows `unary_requests_per_replica` (votes:
    #: `votes_in_flight_per_replica`) for each.
    upstream_replicas: dict[str, int] = field(default_factory=dict)
    #: The edge's mesh certificate (ops/pki.py): upstreams are reached with mutual TLS and
    #: must present their own service's certificate. None: plaintext upstreams.
    upstream_tls: Identity | None = None


def process_of(service: str) -> str:
    """The process that hosts a gRPC service: televote.vote.v1.VoteService -> vote_svc."""
    return f"{service.split('.')[1]}_svc"


@dataclass(frozen=True)
class _Method:
    path: str
    server_streaming: bool
    transcoded: bool
    #: The HTTP paths up to their first variable, of the GET bindings ("/v1/carriers/").
    get_prefixes: tuple[str, ...] = ()


def _get_prefixes(rule: Any) -> tuple[str, ...]:
    rules = [rule, *rule.additional_bindings]
    return tuple(binding.get.split("{", 1)[0] for binding in rules if binding.get)


def _methods(descriptor_set: Path) -> dict[str, list[_Method]]:
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    methods: dict[str, list[_Method]] = {}
    for proto in files.file:
        for service in proto.service:
            full_name = f"{proto.package}.{service.name}"
            methods[full_name] = [
                _Method(f"/{full_name}/{method.name}", method.server_streaming,
                        method.options.HasExtension(annotations_pb2.http),
                        _get_prefixes(method.options.Extensions[annotations_pb2.http]))
                for method in service.method
            ]
    return methods


def _route(prefix_or_path: dict[str, str], cluster: str, timeout: str) -> dict[str, Any]:
    # Retry only where the request cannot have reached a service (a replica that is draining
    # or gone): safe for every RPC, votes included.
    retry = {"retry_on": "connect-failure,refused-stream,reset-before-request", "num_retries": 2}
    route: dict[str, Any] = {"cluster": cluster, "timeout": timeout, "retry_policy": retry}
    if timeout != "0s":
        # A gRPC caller's deadline, capped here, is the timeout; Envoy rewrites grpc-timeout
        # to what it applies, so the service's deadline and the stated timeout agree.
        route["max_grpc_timeout"] = timeout
    return {"match": prefix_or_path, "route": route}


def _lifetimes() -> list[int]:
    """The distinct token lifetimes of the roles, shortest first: one JWT provider each."""
    return sorted(set(TOKEN_LIFETIME_SECONDS.values()))


def _provider_name(lifetime: int, query: bool = False) -> str:
    return f"televote_{'query_' if query else ''}{lifetime}s"


def _jwt_providers(settings: EdgeSettings, query: bool = False) -> dict[str, Any]:
    """One provider per lifetime cap, each writing the claims it verified under its own name.

    Envoy caps a provider's tokens (`max_lifetime`, exp - iat) but not per claim, so a role's
    cap is enforced by which provider verified its token: the requirements try the providers
    shortest cap first, and RBAC accepts a role only from a provider whose cap is within the
    role's (`_role_principal`). An operator token minted for a day verifies only with the
    day-long provider, and RBAC then refuses it.

    `query`: the providers of the first jwt_authn filter, for an SMS gateway's token in the
    query string (envoy/edge.yaml); their claims land under the same metadata keys, so RBAC
    holds them to the same caps.
    """
    where: dict[str, Any] = ({"from_params": ["access_token"],
                              "forward_payload_header": "x-jwt-query-payload"} if query
                             else {"forward_payload_header": "x-jwt-payload"})
    return {_provider_name(lifetime, query): {
        **where,
        "issuer": settings.jwt_issuer,
        "audiences": [settings.jwt_audience],
        "local_jwks": {"filename": str(settings.jwks_path)},
        "require_expiration": True,
        "max_lifetime": f"{lifetime}s",
        "clock_skew_seconds": TOKEN_CLOCK_SKEW_SECONDS,
        "payload_in_metadata": _provider_name(lifetime),
        "claim_to_headers": [{"header_name": _SUBJECT_HEADER, "claim_name": "sub"},
                             {"header_name": _ROLE_HEADER, "claim_name": "role"}],
        # An app sends the same token with every vote: its ES256 signature is verified once
        # per worker, not per request (expiry is still checked).
        "jwt_cache_config": {"jwt_cache_size": 100000},
    } for lifetime in _lifetimes()}


def _any_token(allow_missing: bool, query: bool = False) -> dict[str, Any]:
    requirements: list[dict[str, Any]] = [
        {"provider_name": _provider_name(lifetime, query)} for lifetime in _lifetimes()]
    if allow_missing:
        requirements.append({"allow_missing": {}})
    return {"requires_any": {"requirements": requirements}}


#: A caller without a verified token (jwt_authn forwards the claims only of one it verified,
#: and the edge strips any copy a client sends).
_ANONYMOUS_PRINCIPAL: dict[str, Any] = {
    "not_id": {"header": {"name": "x-jwt-payload", "present_match": True}}}


def _role_principal(role: Role) -> dict[str, Any]:
    """Callers whose verified token carries `role` and lives no longer than the role may
    (anonymous callers have no token)."""
    return {"or_ids": {"ids": [
        {"sourced_metadata": {"metadata_matcher": {
            "filter": "envoy.filters.http.jwt_authn",
            "path": [{"key": _provider_name(lifetime)}, {"key": "role"}],
            "value": {"string_match": {"exact": role.value}}}}}
        for lifetime in _lifetimes() if lifetime <= TOKEN_LIFETIME_SECONDS[role]]}}


_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _upstream_tls(name: str, tls: Identity) -> dict[str, Any]:
    """Mutual TLS to `name`'s replicas: the edge shows its certificate and accepts only one
    from the mesh's CA naming that service."""
    context = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": f"type.googleapis.com/{context}",
        "sni": peer_name(name),
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [{"certificate_chain": {"filename": str(tls.certificate)},
                                  "private_key": {"filename": str(tls.key)}}],
            "validation_context": {
                "trusted_ca": {"filename": str(tls.ca)},
                "match_typed_subject_alt_names": [{
                    "san_type": "DNS", "matcher": {"exact": peer_name(name)}}]},
        }}}


#: The retry delays (ms) the edge's own OVERLOADED refusals ask for, one picked at random per
#: refusal: vote_svc draws its delays from a continuous range (vote_svc/ingest.py,
#: `Ingestor.overloaded`); Envoy's static configuration can only choose among fixed replies.
EDGE_RETRY_DELAYS_MS = overload.EDGE_RETRY_DELAYS_MS
_EDGE_OVERLOADED = ("the edge has too many requests outstanding for this service; nothing was "
                    "recorded, retry after the retry delay")


def _overload_replies() -> list[dict[str, Any]]:
    """Local reply mappers that give the edge's own overload refusals (the circuit breakers',
    response flag UO: a replica's outstanding requests or pending connections at their limit,
    votes' at `votes_in_flight_per_replica`) what vote_svc's refusals carry: UNAVAILABLE
    (HTTP 503) with ErrorInfo `OVERLOADED` and a RetryInfo, its delay one of
    EDGE_RETRY_DELAYS_MS with equal chance (mapper i of n takes 1/(n-i) of what the ones
    before it left: independent random sampling per mapper).

    Each delay has two mappers, the first one matching wins: gRPC and gRPC-Web callers
    (content-type application/grpc..., as the caller sent it) get the status in
    grpc-status-details-bin; every other caller (JSON, a carrier's GET) gets the JSON
    google.rpc.Status the transcoder gives for vote_svc's own refusals, so that a refusal
    reads the same whoever made it."""
    # The content-type the caller sent (envoy/edge.yaml keeps it): by the time a refusal is
    # made, gRPC-Web and JSON transcoding have made every request's application/grpc.
    grpc_callers = {"header_filter": {"header": {
        "name": "x-televote-caller-content-type",
        "string_match": {"prefix": "application/grpc"}}}}
    grpc_mappers, json_mappers = [], []
    count = len(EDGE_RETRY_DELAYS_MS)
    for index, delay_ms in enumerate(EDGE_RETRY_DELAYS_MS):
        overflow: dict[str, Any] = {"response_flag_filter": {"flags": ["UO"]}}
        share = 100 // (count - index)
        match = overflow if index == count - 1 else {"and_filter": {"filters": [
            overflow, {"runtime_filter": {
                "runtime_key": f"edge.overload_reply_{index}",
                "percent_sampled": {"numerator": share, "denominator": "HUNDRED"},
                "use_independent_randomness": True}}]}}
        status = ApiError(grpc.StatusCode.UNAVAILABLE, "OVERLOADED", _EDGE_OVERLOADED,
                          retry_after_seconds=delay_ms / 1000).to_proto()
        # The body is what a gRPC caller gets as grpc-message: it must be the status's
        # message, which gRPC libraries check the details against.
        grpc_mappers.append({
            "filter": {"and_filter": {"filters": [grpc_callers, match]}}, "status_code": 503,
            "body": {"inline_string": _EDGE_OVERLOADED},
            "headers_to_add": [{
                "header": {"key": "grpc-status-details-bin",
                           "value": base64.b64encode(status.SerializeToString()).decode()
                           .rstrip("=")},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]})
        document = json.dumps(json_format.MessageToDict(status), separators=(",", ":"))
        json_mappers.append({
            "filter": match, "status_code": 503,
            "body_format_override": {
                # A format string: a literal % is written %%.
                "text_format_source": {"inline_string": document.replace("%", "%%")},
                "content_type": "application/json"}})
    return grpc_mappers + json_mappers


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(name: str, endpoints: list[tuple[str, int]], max_requests: int,
             tls: Identity | None, tls_name: str | None = None) -> dict[str, Any]:
    """`tls_name`: the process whose certificate the replicas present (default `name`)."""
    static = all(_is_ip(host) for host, _ in endpoints)
    cluster = {
        "name": name,
        # A name is resolved every few seconds, and every address it has is an endpoint:
        # replicas that an autoscaler adds or a rollout replaces join and leave the pool.
        **({"type": "STATIC"} if static else {
            "type": "STRICT_DNS", "dns_refresh_rate": "5s", "respect_dns_ttl": False,
            "dns_lookup_family": "V4_PREFERRED"}),
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            _HTTP_PROTOCOL_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_PROTOCOL_OPTIONS}",
                # Spread streams over several connections to each replica: grpc's server
                # resets a connection that opens thousands of streams at once.
                "explicit_http_config": {"http2_protocol_options": {
                    "max_concurrent_streams": 500}},
            }
        },
        # max_requests: see EdgeSettings.unary_requests_per_replica (votes':
        # votes_in_flight_per_replica); live results and countdowns hold one stream per
        # viewer, so their services take (nearly) unlimited.
        # max_pending_requests: a request waiting for a connection to the replica waits at
        # most as many as may be outstanding; beyond both the edge refuses at once
        # (`_overload_replies`) rather than queueing in front of a saturated replica.
        "circuit_breakers": {"thresholds": [{
            "max_connections": 100000, "max_pending_requests": max_requests,
            "max_requests": max_requests, "max_retries": 10}]},
        "health_checks": [{
            "timeout": "1s", "interval": "2s", "unhealthy_threshold": 2,
            "healthy_threshold": 1, "grpc_health_check": {}}],
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
            for host, port in endpoints]}]},
    }
    if tls is not None:
        cluster["transport_socket"] = _upstream_tls(tls_name or name, tls)
    return cluster


def _rate_limits(settings: EdgeSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The local rate limit's descriptor actions and their buckets, one bucket per value.

    The subject comes from the verified token (jwt_authn copies `sub` into a header the edge
    strips from clients); an anonymous request is one without the verified claims header.
    """
    def bucket(per_second: int) -> dict[str, Any]:
        return {"max_tokens": per_second * 2, "tokens_per_fill": per_second,
                "fill_interval": "1s"}

    actions: list[dict[str, Any]] = [
        {"actions": [{"remote_address": {}}]},
        {"actions": [{"header_value_match": {
            "descriptor_key": "anonymous", "descriptor_value": "yes", "expect_match": False,
            "headers": [{"name": "x-jwt-payload", "present_match": True}]}},
            {"remote_address": {}}]},
        {"actions": [{"request_headers": {"header_name": _ROLE_HEADER,
                                          "descriptor_key": "role", "skip_if_absent": True}},
                     {"request_headers": {"header_name": _SUBJECT_HEADER,
                                          "descriptor_key": "subject",
                                          "skip_if_absent": True}}]},
    ]
    descriptors: list[dict[str, Any]] = [
        {"entries": [{"key": "remote_address"}],
         "token_bucket": bucket(settings.per_ip_per_second)},
        {"entries": [{"key": "anonymous", "value": "yes"}, {"key": "remote_address"}],
         "token_bucket": bucket(settings.anonymous_per_ip_per_second)},
        *({"entries": [{"key": "role", "value": role.value}, {"key": "subject"}],
           "token_bucket": bucket(settings.per_subject_per_second)}
          for role in _SUBJECT_LIMITED),
    ]
    return actions, descriptors


#: Every page and asset the edge serves itself. Same origin as the API, so the browser apps
#: need no CORS; the policy allows scripts, styles and calls to this origin only (photos may
#: come from any https host).
_WEB_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' https: data:; connect-src 'self'; "
                               "base-uri 'none'; form-action 'self'; object-src 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Bundles are not content-hashed: a minute of caching spares the edge a reload storm and
    # a redeploy reaches everyone within it.
    "cache-control": "public, max-age=60",
}


def _web_files(web_dir: Path) -> dict[str, Path]:
    """URL path -> file, for every page and asset of the built web apps."""
    if not web_dir.is_dir():
        return {}
    files = {path: web_dir / name for path, name in web.PAGES.items()}
    pages = set(web.PAGES.values())
    files |= {f"{web.ASSETS_PREFIX}{p.name}": p for p in sorted(web_dir.iterdir())
              if p.is_file() and p.name not in pages}
    return files


def _web_route(path: str, file: Path) -> dict[str, Any]:
    headers = {**_WEB_HEADERS,
               "content-type": web.CONTENT_TYPES.get(file.suffix, "application/octet-stream")}
    return {"match": {"path": path, "headers": [{"name": ":method", "string_match": {
                "safe_regex": {"regex": "GET|HEAD"}}}]},
            "direct_response": {"status": 200, "body": {"filename": str(file)}},
            "response_headers_to_add": [
                {"header": {"key": key, "value": value},
                 "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                for key, value in headers.items()]}


def render(settings: EdgeSettings) -> str:
    """The Envoy config for these settings, as YAML text."""
    methods = _methods(settings.descriptor_set)
    routed = routed_services()
    web_files = _web_files(settings.web_dir)
    routes: list[dict[str, Any]] = [_web_route(path, file) for path, file in web_files.items()]
    if web_files:
        routes.append({"match": {"path": "/"}, "redirect": {"path_redirect": "/vote"}})
    for service in routed:
        cluster = process_of(service)
        # Streams stay open for a whole show: Envoy would cut them at the route timeout.
        routes += [_route({"path": method.path}, cluster, "0s")
                   for method in methods.get(service, []) if method.server_streaming]
        if any(method.path == SUBMIT_VOTE_PATH for method in methods.get(service, [])):
            routes.append(_route({"path": SUBMIT_VOTE_PATH}, VOTE_CLUSTER, UNARY_TIMEOUT))
        routes.append(_route({"prefix": f"/{service}/"}, cluster, UNARY_TIMEOUT))

    # Carriers' SMS gateways (Kannel's get-url and dlr-url) can only put their token in the
    # URL: the transcoder drops the query string when it turns a GET into a gRPC call, so
    # the token is read and verified before it, on the GET routes of carrier services.
    query_token_services = {service for service in routed
                            if Role.CARRIER in SERVICE_ROLES[service]
                            and any(m.get_prefixes for m in methods.get(service, []))}
    query_token_rules = [
        {"match": {"prefix": prefix}, "requires": _any_token(allow_missing=True, query=True)}
        for prefix in sorted({prefix for service in query_token_services
                              for method in methods[service] for prefix in method.get_prefixes})]
    jwt_rules: list[dict[str, Any]] = []
    rbac_policies: dict[str, Any] = {}
    for service in routed:
        roles = SERVICE_ROLES[service] - {Role.INTERNAL}
        prefix = {"prefix": f"/{service}/"}
        # Anonymous callers have no token; an SMS gateway's came in the query string and was
        # verified before transcoding (`query_token_rules`). RBAC still requires the role.
        jwt_rules.append({"match": prefix, "requires": _any_token(
            allow_missing=Role.ANONYMOUS in roles or service in query_token_services)})
        # Each role by its own principal, public services too: a token beyond its role's
        # lifetime cap is refused there as well, not taken as that role.
        principals = [_ANONYMOUS_PRINCIPAL if role == Role.ANONYMOUS else _role_principal(role)
                      for role in sorted(roles)]
        rbac_policies[service] = {"permissions": [{"url_path": {"path": prefix}}],
                                  "principals": principals}
    # The web apps are public files; what they call is held to the rules above.
    web_paths = [*web_files, "/"] if web_files else []
    jwt_rules += [{"match": {"path": path}} for path in web_paths]
    if web_paths:
        rbac_policies["web"] = {
            "permissions": [{"url_path": {"path": {"exact": path}}} for path in web_paths],
            "principals": [{"any": True}]}
    # Anything else (unknown paths, the internal fraud scoring service) still needs a token,
    # and then finds no RBAC policy: 401 without a token, 403 with one.
    jwt_rules.append({"match": {"prefix": "/"}, "requires": _any_token(allow_missing=False)})

    transcoded = [service for service in routed
                  if any(method.transcoded for method in methods.get(service, []))]
    streaming = {process_of(service) for service in routed
                 if any(method.server_streaming for method in methods.get(service, []))}
    def replicas(name: str) -> int:
        """A process's replicas: those behind one DNS name (a Kubernetes Service) are counted
        by their most (`upstream_replicas`)."""
        return settings.upstream_replicas.get(
            name, max(1, len(settings.upstreams.get(name, []))))

    clusters = [_cluster(name, endpoints, 1_000_000 if name in streaming
                         else settings.unary_requests_per_replica * replicas(name),
                         settings.upstream_tls)
                for name, endpoints in sorted(settings.upstreams.items())]
    if "vote_svc" in settings.upstreams:
        # The same replicas, their own connections and their own breaker: only votes are
        # held to it (runtime/overload.py), never a purchase or a balance.
        clusters.append(_cluster(
            VOTE_CLUSTER, settings.upstreams["vote_svc"],
            settings.votes_in_flight_per_replica * replicas("vote_svc"),
            settings.upstream_tls, tls_name="vote_svc"))
    rate_limits, rate_limit_descriptors = (_rate_limits(settings) if settings.abuse_filters
                                           else ([], []))
    values = {
        "edge_host": settings.host,
        "edge_port": settings.port,
        "admin_port": settings.admin_port,
        "routes": routes,
        "cors_origins": [{"exact": origin} for origin in settings.cors_origins],
        "descriptor": str(settings.descriptor_set),
        "transcoded_services": transcoded,
        "jwt_providers": _jwt_providers(settings),
        "jwt_query_providers": _jwt_providers(settings, query=True),
        "jwt_rules": jwt_rules,
        "query_token_rules": query_token_rules or [{"match": {"prefix": "/-/"}}],
        "rbac_policies": rbac_policies,
        "rate_limit_per_second": settings.rate_limit_per_second,
        "trusted_proxy_hops": settings.trusted_proxy_hops,
        "rate_limit_burst": settings.rate_limit_per_second * 2,
        "clusters": clusters,
        "rate_limits": rate_limits,
        "rate_limit_descriptors": rate_limit_descriptors,
        "max_streams_per_connection": settings.max_streams_per_connection,
        "max_request_bytes": settings.max_request_bytes,
        "max_heap_bytes": settings.max_heap_bytes,
        "max_connections": settings.max_connections,
        "overload_replies": _overload_replies(),
        # Envoy's default cap is 4 KiB; a bundle is a few hundred.
        "max_direct_response_body_bytes": max(
            [4096, *(file.stat().st_size + 1 for file in web_files.values())]),
    }
    text = Template(TEMPLATE.read_text()).substitute(
        {key: json.dumps(value) for key, value in values.items()})
    if not settings.abuse_filters:
        text = _without_filter(text, "envoy.filters.http.buffer")
    return text


def _without_filter(text: str, name: str) -> str:
    """The config without the HTTP filter `name` (its list entry up to the next one)."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == f"- name: {name}")
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next(i for i in range(start + 1, len(lines))
               if len(lines[i]) - len(lines[i].lstrip()) <= indent and lines[i].strip())
    return "".join(lines[:start] + lines[end:])


#: Limits for a mesh that one load generator drives from one address (benchmarks, the load
#: test's own stack): the per-address buckets would measure themselves.
ONE_LOAD_GENERATOR: dict[str, Any] = {
    "per_ip_per_second": 10_000_000, "anonymous_per_ip_per_second": 10_000_000,
    "per_subject_per_second": 10_000_000}
