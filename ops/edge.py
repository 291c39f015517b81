"""Renders envoy/edge.yaml into a runnable Envoy config.

Routes, RBAC policies and JWT rules come from the access table (runtime/access.py), which
RPCs stream and which are transcoded to JSON come from the descriptor set that
`televote generate` writes, so the edge cannot drift from the contracts or from what the
services themselves enforce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from ops import web
from runtime.access import SERVICE_ROLES, Role, routed_services

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
TEMPLATE = ENVOY_DIR / "edge.yaml"
DESCRIPTOR_SET = ENVOY_DIR / "televote.pb"

#: How long a unary RPC may take through the edge before it is cut.
UNARY_TIMEOUT = "15s"


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
    #: Proxies in front of the edge (a cloud load balancer: 1) whose X-Forwarded-For entries
    #: are trusted for the caller's IP; 0 when clients connect to the edge directly, so a
    #: client cannot choose the IP that fraud scoring sees.
    trusted_proxy_hops: int = 0
    #: Load shedding at the edge, where it is cheapest: requests one replica of a service
    #: without streams (votes, wallet, reviews, carriers) may have outstanding. Beyond it the
    #: edge answers UNAVAILABLE at once (HTTP 503, `x-envoy-overloaded`) instead of queueing
    #: calls in front of a saturated replica until every client's deadline has passed. About
    #: what a replica answers in a second or two.
    unary_requests_per_replica: int = 500
    descriptor_set: Path = DESCRIPTOR_SET
    #: The built web apps (web/dist), served by the edge itself under the API's origin.
    web_dir: Path = web.DIST
    #: Process name (e.g. "vote_svc") -> the host:port of each of its replicas.
    upstreams: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


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
    return {"match": prefix_or_path,
            "route": {"cluster": cluster, "timeout": timeout, "retry_policy": retry}}


def _role_principal(role: Role) -> dict[str, Any]:
    """Callers whose verified token carries `role` (anonymous callers have no token)."""
    return {"sourced_metadata": {"metadata_matcher": {
        "filter": "envoy.filters.http.jwt_authn",
        "path": [{"key": "jwt_payload"}, {"key": "role"}],
        "value": {"string_match": {"exact": role.value}}}}}


_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _cluster(name: str, endpoints: list[tuple[str, int]], max_requests: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
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
        # max_requests: see EdgeSettings.unary_requests_per_replica; live results and
        # countdowns hold one stream per viewer, so their services take (nearly) unlimited.
        "circuit_breakers": {"thresholds": [{
            "max_connections": 100000, "max_pending_requests": 100000,
            "max_requests": max_requests, "max_retries": 10}]},
        "health_checks": [{
            "timeout": "1s", "interval": "2s", "unhealthy_threshold": 2,
            "healthy_threshold": 1, "grpc_health_check": {}}],
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
            for host, port in endpoints]}]},
    }


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
        routes.append(_route({"prefix": f"/{service}/"}, cluster, UNARY_TIMEOUT))

    # Carriers' SMS gateways (Kannel's get-url and dlr-url) can only put their token in the
    # URL: the transcoder drops the query string when it turns a GET into a gRPC call, so
    # the token is read and verified before it, on the GET routes of carrier services.
    query_token_services = {service for service in routed
                            if Role.CARRIER in SERVICE_ROLES[service]
                            and any(m.get_prefixes for m in methods.get(service, []))}
    query_token_rules = [
        {"match": {"prefix": prefix}, "requires": {"requires_any": {"requirements": [
            {"provider_name": "televote_query"}, {"allow_missing": {}}]}}}
        for prefix in sorted({prefix for service in query_token_services
                              for method in methods[service] for prefix in method.get_prefixes})]
    jwt_rules: list[dict[str, Any]] = []
    rbac_policies: dict[str, Any] = {}
    for service in routed:
        roles = SERVICE_ROLES[service] - {Role.INTERNAL}
        prefix = {"prefix": f"/{service}/"}
        if Role.ANONYMOUS in roles or service in query_token_services:
            # Anonymous callers have no token; an SMS gateway's came in the query string and
            # was verified before transcoding (`query_token_rules`). RBAC still requires
            # the role either way.
            requirement: dict[str, Any] = {"requires_any": {"requirements": [
                {"provider_name": "televote"}, {"allow_missing": {}}]}}
        else:
            requirement = {"provider_name": "televote"}
        jwt_rules.append({"match": prefix, "requires": requirement})
        principals = ([{"any": True}] if Role.ANONYMOUS in roles
                      else [_role_principal(role) for role in sorted(roles)])
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
    jwt_rules.append({"match": {"prefix": "/"}, "requires": {"provider_name": "televote"}})

    transcoded = [service for service in routed
                  if any(method.transcoded for method in methods.get(service, []))]
    streaming = {process_of(service) for service in routed
                 if any(method.server_streaming for method in methods.get(service, []))}
    clusters = [_cluster(name, endpoints, 1_000_000 if name in streaming
                         else settings.unary_requests_per_replica * len(endpoints))
                for name, endpoints in sorted(settings.upstreams.items())]
    values = {
        "edge_host": settings.host,
        "edge_port": settings.port,
        "admin_port": settings.admin_port,
        "routes": routes,
        "cors_origins": [{"exact": origin} for origin in settings.cors_origins],
        "descriptor": str(settings.descriptor_set),
        "transcoded_services": transcoded,
        "jwt_issuer": settings.jwt_issuer,
        "jwt_audience": settings.jwt_audience,
        "jwks": str(settings.jwks_path),
        "jwt_rules": jwt_rules,
        "query_token_rules": query_token_rules or [{"match": {"prefix": "/-/"}}],
        "rbac_policies": rbac_policies,
        "rate_limit_per_second": settings.rate_limit_per_second,
        "trusted_proxy_hops": settings.trusted_proxy_hops,
        "rate_limit_burst": settings.rate_limit_per_second * 2,
        "clusters": clusters,
        # Envoy's default cap is 4 KiB; a bundle is a few hundred.
        "max_direct_response_body_bytes": max(
            [4096, *(file.stat().st_size + 1 for file in web_files.values())]),
    }
    return Template(TEMPLATE.read_text()).substitute(
        {key: json.dumps(value) for key, value in values.items()})
