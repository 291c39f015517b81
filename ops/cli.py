"""The `televote` command."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ops import tokens
from ops.addresses import ADDRESSES_FILE, read_addresses
from runtime.access import Role

if TYPE_CHECKING:
    from ops.stack import Stack

# The stack (psycopg, grpc, ...) is imported by the commands that start one, so that the
# quick commands (token, address) start quickly.

# No locals in tracebacks: they would print signing keys, tokens and database URLs into
# terminals and CI logs.
app = typer.Typer(help="televote: live TV audience voting.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_show_locals=False)
audit = typer.Typer(help="Export a round's ledger; verify an export or a receipt offline.",
                    no_args_is_help=True)
app.add_typer(audit, name="audit")
sms = typer.Typer(help="Premium SMS: carriers' settlement files, purge of subscribers' numbers.",
                  no_args_is_help=True)
app.add_typer(sms, name="sms")

StateDir = Annotated[Path, typer.Option(
    envvar="TELEVOTE_STATE_DIR", help="Where local data, keys and logs live.")]
DEFAULT_STATE_DIR = Path(".televote")
DatabaseUrl = Annotated[str | None, typer.Option(
    envvar="DATABASE_URL",
    help="The ledger's PostgreSQL (default: the stack running from --state-dir).")]


def _database_url(given: str | None, state_dir: Path) -> str:
    """The PostgreSQL named, else the one of the stack running from `state_dir`."""
    found = given or str(read_addresses(state_dir).get("database", ""))
    if not found:
        raise typer.BadParameter(f"no stack is running from {state_dir}: give "
                                 "--database-url or DATABASE_URL", param_hint="--database-url")
    return found


def _replica_counts(items: list[str] | None, option: str = "--replicas") -> dict[str, int]:
    """SERVICE=N options (--replicas, --max-replicas), checked."""
    from ops.stack import SERVICES

    counts: dict[str, int] = {}
    for item in items or []:
        name, _, count = item.partition("=")
        if name not in SERVICES or not count.isdigit() or int(count) < 1:
            raise typer.BadParameter(f"expected SERVICE=N with SERVICE in {', '.join(SERVICES)}",
                                     param_hint=option)
        counts[name] = int(count)
    return counts


@app.command()
def up(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    port: Annotated[int, typer.Option(envvar="TELEVOTE_EDGE_PORT",
                                      help="The edge's public port.")] = 8080,
    host: Annotated[str, typer.Option(envvar="TELEVOTE_EDGE_HOST",
                                      help="Address the edge listens on.")] = "127.0.0.1",
    replicas: Annotated[list[str] | None, typer.Option(
        "--replicas", help="SERVICE=N, repeatable, e.g. --replicas vote_svc=2.")] = None,
    trusted_proxy_hops: Annotated[int, typer.Option(
        envvar="TELEVOTE_EDGE_TRUSTED_PROXY_HOPS", min=0,
        help="Load balancers in front of the edge whose X-Forwarded-For is trusted.")] = 0,
    redis_cluster: Annotated[int, typer.Option(
        "--redis-cluster", min=0, metavar="MASTERS",
        help="Start a Redis Cluster of MASTERS masters with a replica each instead of one "
             "Redis (ignored with REDIS_URL).")] = 0,
    kannel: Annotated[bool, typer.Option(
        help="Also start Kannel (bearerbox, smsbox) with a fake SMSC link per carrier, for "
             "premium SMS through a real SMS gateway (Debian's kannel, kannel-extras).")]
    = False,
) -> None:
    """Start PostgreSQL, Redis, migrations, every service and the Envoy edge; stop on Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("yoyo").setLevel(logging.WARNING)  # one line per SQL step otherwise
    from ops.stack import SERVICES, Stack, StackSettings

    settings = StackSettings(
        state_dir=state_dir, edge_host=host, edge_port=port,
        replicas={**dict.fromkeys(SERVICES, 1), **_replica_counts(replicas)},
        trusted_proxy_hops=trusted_proxy_hops, kannel=kannel, redis_cluster=redis_cluster,
        database_url=os.environ.get("DATABASE_URL") or None,
        redis_url=os.environ.get("REDIS_URL") or None)
    asyncio.run(_run_until_signal(Stack(settings)))


async def _run_until_signal(stack: Stack) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    started = time.monotonic()
    start = asyncio.create_task(stack.start())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if start in done:
        stopper.cancel()
        start.result()
        print(f"televote is up in {time.monotonic() - started:.1f}s\n{stack.describe()}\n"
              "Ctrl-C stops everything.", flush=True)
        await stop.wait()
    else:
        start.cancel()
    print("stopping...", file=sys.stderr, flush=True)
    await stack.stop()
    print("stopped.", file=sys.stderr, flush=True)


@app.command("edge-config")
def edge_config(
    jwks: Annotated[Path, typer.Option(
        help="The token keys the edge verifies with (public JWKS, `jwt/jwks.json` of a "
             "state directory).")],
    upstream: Annotated[list[str], typer.Option(
        help="SERVICE=HOST:PORT for every service, repeatable (a replica each, or a DNS "
             "name resolving to all of them).")],
    tls_dir: Annotated[Path | None, typer.Option(
        help="The edge's mesh certificate, key and CA (cert.pem, key.pem, ca.pem); without "
             "it upstreams are plaintext.")] = None,
    host: Annotated[str, typer.Option(help="Address the edge listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The edge's public port.")] = 8080,
    admin_port: Annotated[int, typer.Option(help="Envoy's admin port (loopback).")] = 9901,
    trusted_proxy_hops: Annotated[int, typer.Option(
        min=0, help="Load balancers in front of the edge whose X-Forwarded-For is trusted.")]
    = 0,
    max_replicas: Annotated[list[str] | None, typer.Option(
        help="SERVICE=N: the most replicas a service named by one DNS name runs (its "
             "autoscaler's maximum), for the edge's load shedding.")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(
        help="A browser origin allowed to call the API (repeatable).")] = None,
    jwt_issuer: Annotated[str, typer.Option(help="Tokens' `iss`.")] = tokens.ISSUER,
    jwt_audience: Annotated[str, typer.Option(help="Tokens' `aud`.")] = tokens.AUDIENCE,
    out: Annotated[Path | None, typer.Option(
        help="Write the config to this file (a Kubernetes pod's init container, deploy/) "
             "instead of printing it.")] = None,
) -> None:
    """Print the edge's Envoy config for an edge on a host of its own: what `televote up`
    renders, from files and addresses given here (a deployment's config map)."""
    from ops import edge, pki
    from ops.stack import SERVICES

    upstreams: dict[str, list[tuple[str, int]]] = {}
    for item in upstream:
        service, _, target = item.partition("=")
        address, _, number = target.rpartition(":")
        if service not in SERVICES or not address or not number.isdigit():
            raise typer.BadParameter(f"expected SERVICE=HOST:PORT with SERVICE in "
                                     f"{', '.join(SERVICES)}, not {item!r}",
                                     param_hint="--upstream")
        upstreams.setdefault(service, []).append((address.strip("[]"), int(number)))
    if missing := [service for service in SERVICES if service not in upstreams]:
        raise typer.BadParameter(f"no address for {', '.join(missing)}",
                                 param_hint="--upstream")
    settings = edge.EdgeSettings(
        jwks_path=jwks.resolve(), jwt_issuer=jwt_issuer, jwt_audience=jwt_audience,
        host=host, port=port, admin_port=admin_port, trusted_proxy_hops=trusted_proxy_hops,
        upstreams=upstreams,
        upstream_replicas=_replica_counts(max_replicas, "--max-replicas"),
        upstream_tls=pki.Identity(tls_dir.resolve()) if tls_dir else None)
    if cors_origin:
        settings = dataclasses.replace(settings, cors_origins=tuple(cors_origin))
    if out is None:
        typer.echo(edge.render(settings), nl=False)
    else:
        out.write_text(edge.render(settings))


@app.command()
def address(
    part: Annotated[str, typer.Argument(
        help="edge, envoy-admin, database, redis or a service (vote_svc, sync_svc, ...).")],
    replica: Annotated[int, typer.Option(min=0, help="Which replica of a service.")] = 0,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Print where a part of the running stack listens: host:port (database, redis: a URL)."""
    addresses = read_addresses(state_dir)
    if not addresses:
        typer.echo(f"no stack is running from {state_dir} (no live {ADDRESSES_FILE}): "
                   "start one with ./scripts/up", err=True)
        raise typer.Exit(1)
    parts = [name for name in addresses if name != "pid"]
    if part not in parts:
        raise typer.BadParameter(f"expected one of {', '.join(parts)}", param_hint="PART")
    found = addresses[part]
    if isinstance(found, list):
        if replica >= len(found):
            raise typer.BadParameter(f"{part} runs {len(found)} replica(s)",
                                     param_hint="--replica")
        found = found[replica]
    # Kannel's fake SMSC links (`televote up --kannel`): carrier -> port, as JSON.
    typer.echo(json.dumps(found) if isinstance(found, dict) else found)


@app.command()
def migrate(
    database_url: Annotated[str | None, typer.Option(envvar="DATABASE_URL",
                                                     help="PostgreSQL to migrate.")] = None,
    database_url_file: Annotated[Path | None, typer.Option(
        help="A file holding the URL instead (a mounted Secret: deploy/'s migrations Job).")]
    = None,
) -> None:
    """Apply pending schema migrations."""
    from ops.migrate import migrate as apply_migrations

    if database_url_file is not None:
        database_url = database_url_file.read_text().strip()
    if not database_url:
        raise typer.BadParameter("give --database-url (DATABASE_URL) or --database-url-file",
                                 param_hint="--database-url")
    applied = apply_migrations(database_url)
    typer.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@app.command()
def token(
    role: Annotated[Role, typer.Option(help="voter, operator or carrier.")],
    sub: Annotated[str, typer.Option(help="The subject: user id, operator or carrier name.")],
    ttl: Annotated[int | None, typer.Option(
        help="Lifetime in seconds (default and maximum: the role's, 1 h for operators, "
             "24 h for voters, 90 days for carriers).")] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Mint a development JWT the local edge accepts."""
    try:
        typer.echo(tokens.mint(state_dir, role, sub, ttl))
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--role/--ttl") from None


@app.command("rotate-token-key")
def rotate_token_key(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Sign new tokens with the standby key; the old key verifies its tokens until they
    expire. Restart the edge (`televote up`) so it reads the new JWKS."""
    typer.echo(f"tokens are now signed by {tokens.rotate_signing_key(state_dir)}")


@app.command()
def generate(
    check: Annotated[bool, typer.Option(help="Fail if gen/ or the descriptor set is stale.")]
    = False,
) -> None:
    """Regenerate gen/ and envoy/televote.pb from protos/."""
    from ops.codegen import generate as run_codegen

    raise typer.Exit(run_codegen(check=check))


@app.command()
def report(
    episode_id: Annotated[str, typer.Argument(help="The episode.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write into.")],
    edge: Annotated[str, typer.Option(envvar="TELEVOTE_EDGE_URL",
                                      help="The edge's URL.")] = "http://127.0.0.1:8080",
    token: Annotated[str, typer.Option(
        envvar="TELEVOTE_OPERATOR_TOKEN",
        help="An operator token; default: one minted from the state directory's key.")] = "",
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Write the episode's report: report.html (charts inline), a CSV per table, report.json."""
    from ops import report as episode_report
    started = time.monotonic()
    answer = episode_report.fetch(
        edge, token or tokens.mint(state_dir, Role.OPERATOR, "televote-report", 600),
        episode_id)
    written = episode_report.write(answer, out)
    kind = "final" if answer.is_final else "provisional"
    print(f"{out}: {kind} report, {len(written)} files in {time.monotonic() - started:.1f}s")


@app.command()
def web(
    check: Annotated[bool, typer.Option(
        help="Fail if web/src/gen or the bundles in web/dist are stale.")] = False,
) -> None:
    """Rebuild the web apps (TypeScript clients from protos/, bundles the edge serves)."""
    from ops.web import build

    raise typer.Exit(build(check=check))


@audit.command("export")
def audit_export(
    round_id: Annotated[str, typer.Argument(help="The finalized round.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The export file (format: "
                                      "results_svc/audit.py).")],
    database_url: DatabaseUrl = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Write a finalized round's ledger, rules and signed result to a file."""
    from results_svc.audit import export_round
    url = _database_url(database_url, state_dir)
    started = time.monotonic()
    leaves = asyncio.run(export_round(url, round_id, out))
    print(f"{out}: {leaves} leaves in {time.monotonic() - started:.1f}s")


@audit.command("verify")
def audit_verify(
    export: Annotated[Path, typer.Argument(help="A file written by `televote audit export`.")],
    public_key: Annotated[str | None, typer.Option(
        help="Pin the signing key (hex, GetLedgerPublicKey) instead of the export's.")] = None,
    receipt: Annotated[Path | None, typer.Option(
        help="Also check a GetVoteReceipt JSON response against the export's root.")] = None,
) -> None:
    """Recount an export by the round's rules, check its order, root and signature; exit 1
    if anything does not match the published result."""
    import json

    from results_svc.audit import export_root_hash, verify_export, verify_receipt_document
    started = time.monotonic()
    verdict = verify_export(export, public_key)
    problems = list(verdict.problems)
    if receipt is not None:
        problems += verify_receipt_document(json.loads(receipt.read_text()),
                                            export_root_hash(export))
    if problems:
        for problem in problems:
            print(f"FAIL: {problem}", file=sys.stderr)
        raise typer.Exit(1)
    assert verdict.recount is not None
    print(f"OK: root and signature verify; recount {verdict.recount.counts} "
          f"(total {verdict.recount.total_votes}) equals the published result; "
          f"{verdict.leaves} leaves, not counted by reason {verdict.rows_by_reason}, "
          f"{time.monotonic() - started:.1f}s")


@sms.command("settlement")
def sms_settlement(
    episode: Annotated[str, typer.Option(help="The episode (UUID).")],
    database_url: DatabaseUrl = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    carrier: Annotated[str | None, typer.Option(
        help="SMART, CELLCARD or METFONE; default all, each with its totals.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="CSV file (default: stdout).")]
    = None,
) -> None:
    """Write the CSV of an episode's charged SMS per carrier, with credits for votes fraud
    review rejected, and totals: the file a carrier reconciles against."""
    import uuid

    from sms_svc.settlement import settlement_csv
    try:
        episode_id = str(uuid.UUID(episode))
    except ValueError:
        raise typer.BadParameter("expected an episode id (UUID)", param_hint="--episode") from None
    name = carrier.upper().removeprefix("CARRIER_") if carrier else None
    if name is not None and name not in ("SMART", "CELLCARD", "METFONE"):
        raise typer.BadParameter("expected SMART, CELLCARD or METFONE", param_hint="--carrier")
    text = asyncio.run(settlement_csv(_database_url(database_url, state_dir), episode_id, name))
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)


@sms.command("purge")
def sms_purge(
    before: Annotated[str, typer.Option(help="Remove numbers of messages received before this "
                                             "date (YYYY-MM-DD, UTC) or time (ISO 8601).")],
    database_url: DatabaseUrl = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Remove subscribers' phone numbers (kept only to address replies); the SMS records keep
    their keyed pseudonym."""
    from datetime import UTC, datetime

    from sms_svc.settlement import purge_msisdns
    try:
        when = datetime.fromisoformat(before)
    except ValueError:
        raise typer.BadParameter("expected YYYY-MM-DD or an ISO 8601 time",
                                 param_hint="--before") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    removed = asyncio.run(purge_msisdns(_database_url(database_url, state_dir), when))
    print(f"removed {removed} phone numbers of messages received before {when.isoformat()}")


@app.command()
def refunds(
    database_url: DatabaseUrl = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    since: Annotated[str | None, typer.Option(
        help="Only refunds recorded from this ISO 8601 time on.")] = None,
) -> None:
    """Report store refunds: votes clawed back, votes already cast that stay counted, and
    the voters flagged for review (JSON)."""
    import json
    from datetime import datetime

    from vote_svc.purchases import refund_report
    url = _database_url(database_url, state_dir)
    moment = None
    if since is not None:
        try:
            moment = datetime.fromisoformat(since)
        except ValueError:
            raise typer.BadParameter("expected an ISO 8601 time", param_hint="--since") from None
    print(json.dumps(asyncio.run(refund_report(url, moment)), indent=2))


#: Scenario defaults that differ from the seed's (a shownight's users follow from its curve;
#: bots run on the real clock so fraud's timing signals see human timing as human).
_SCENARIO_DEFAULTS: dict[str, dict[str, float]] = {
    "seed": {},
    "retries": {"users": 2_000},
    "shownight": {"compress": 15.0},
    "bots": {"users": 300, "window_s": 180.0, "compress": 1.0},
}


@app.command()
def loadtest(
    scenario: Annotated[str, typer.Argument(
        help="seed (the seed's test), shownight (bursts and a close-of-lines spike), "
             "retries (duplicates, lost answers, reused ids) or bots (fraud generator).")],
    users: Annotated[int | None, typer.Option(
        min=1, help="Voters (seed 10,000; shownight derives them from its curve).")] = None,
    votes_per_user: Annotated[int, typer.Option(min=1)] = 10,
    paid_share: Annotated[float, typer.Option(min=0.0, max=1.0,
                                              help="Share of votes that are paid.")] = 0.3,
    sms_share: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="seed, shownight: share of voters who text 1255 instead "
                               "(premium SMS through the carrier API, over three carriers).")]
    = 0.2,
    sms_via: Annotated[str, typer.Option(
        help="api: the SMS share posts to the carrier JSON API; kannel: it goes through "
             "Kannel (fake SMSC links -> bearerbox -> smsbox -> edge), replies back the same "
             "way (an own stack starts Kannel; with --edge, `televote up --kannel`).")]
    = "api",
    window: Annotated[float | None, typer.Option(
        min=1.0, help="The voting window in show seconds (default 1800).")] = None,
    compress: Annotated[float | None, typer.Option(
        min=0.01, help="Show seconds per real second: 30 runs 30 minutes in one.")] = None,
    peak_rate: Annotated[float, typer.Option(
        min=1.0, help="shownight: votes/s at the close-of-lines spike.")] = 500.0,
    spike_seconds: Annotated[float, typer.Option(
        min=1.0, help="shownight: real seconds of the spike, ending at the close.")] = 60.0,
    performances: Annotated[int, typer.Option(min=0, help="shownight: performances.")] = 4,
    paths: Annotated[str, typer.Option(
        help="Comma-separated: grpc, json, grpcweb; users are spread over them.")]
    = "grpc,json,grpcweb",
    workers: Annotated[int | None, typer.Option(
        min=1, max=64, help="Load driver processes (default: one per core, at least 2); "
                            "users are split over them, each user's votes in one.")] = None,
    lag_threshold_ms: Annotated[float, typer.Option(
        min=0.0, help="Report the generator as lagging when a second's p99 send is this "
                      "late.")] = 100.0,
    ceiling: Annotated[bool, typer.Option(
        "--ceiling", help="Measure the load generator's own ceiling instead: the scenario's "
                          "votes, per path, against a no-op edge; no stack.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed of the plan.")] = 1,
    edge: Annotated[str | None, typer.Option(
        help="Drive a running edge (http://HOST:PORT) instead of starting a stack; tokens are "
             "signed with the key in --state-dir.")] = None,
    state_dir: Annotated[Path, typer.Option(
        envvar="TELEVOTE_STATE_DIR", help="With --edge: the stack's state directory.")]
    = DEFAULT_STATE_DIR,
    database_url: DatabaseUrl = None,
    replicas: Annotated[list[str] | None, typer.Option(
        "--replicas", help="Own stack: SERVICE=N, repeatable.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Report directory (default loadtest-runs/<time>-<scenario>).")] = None,
    live: Annotated[bool, typer.Option(help="Live progress display.")] = True,
) -> None:
    """Simulate a show's audience through the edge, verify the ledger, write a report.

    Exits 1 when verification fails, printing what failed.
    """
    from loadtest.plan import SCENARIOS, LoadConfig, validate
    from loadtest.run import Target, run, run_with_own_stack

    if scenario not in SCENARIOS:
        raise typer.BadParameter(f"expected one of {', '.join(SCENARIOS)}",
                                 param_hint="SCENARIO")
    defaults = _SCENARIO_DEFAULTS[scenario]
    config = LoadConfig(
        scenario=scenario, users=users or int(defaults.get("users", 10_000)),
        votes_per_user=votes_per_user, paid_share=paid_share, sms_share=sms_share,
        sms_via=sms_via,
        window_s=window or defaults.get("window_s", 1800.0),
        compress=compress or defaults.get("compress", 30.0),
        paths=tuple(p.strip() for p in paths.split(",") if p.strip()), seed=seed,
        peak_rate=peak_rate, spike_s=spike_seconds, performances=performances,
        lag_threshold_ms=lag_threshold_ms)
    try:
        validate(config)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if ceiling:
        from loadtest.ceiling import measure
        from loadtest.driver import default_workers

        asyncio.run(measure(config, workers or default_workers()))
        return
    counts = _replica_counts(replicas)
    out = out or Path("loadtest-runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{scenario}"
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if edge is not None:
        host_port = edge.removeprefix("http://").rstrip("/")
        if edge.startswith("https://") or ":" not in host_port:
            raise typer.BadParameter("expected http://HOST:PORT", param_hint="--edge")
        database_url = _database_url(database_url, state_dir)
        if not (state_dir / "jwt").is_dir():
            raise typer.BadParameter(f"{state_dir} holds no token key (jwt/)",
                                     param_hint="--state-dir")
        smsc = read_addresses(state_dir).get("kannel-smsc") or {}
        if sms_via == "kannel" and not smsc:
            raise typer.BadParameter(f"the stack running from {state_dir} runs no Kannel "
                                     "(televote up --kannel)", param_hint="--sms-via")
        result = asyncio.run(run(config, Target(
            host_port, state_dir, database_url,
            kannel_smsc_ports=dict(smsc)), out,  # type: ignore[call-overload]
            workers=workers, live=live))
    else:
        from ops.processes import run_stopping_on_sigterm

        result = run_stopping_on_sigterm(run_with_own_stack(
            config, out, workers=workers, replicas=counts, live=live))
    print((out / "summary.md").read_text())
    print(f"report: {out}/report.json, {out}/summary.md, {out}/plot.png")
    if not result.verdict.ok:
        for failure in result.verdict.failures:
            print(f"VERIFICATION FAILED: {failure}", file=sys.stderr)
        raise typer.Exit(1)
