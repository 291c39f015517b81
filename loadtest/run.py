"""One load test from start to finish: plan, show, purchases (or grants), voting, final
result, verification, report. `run()` drives a stack that is already up;
`run_with_own_stack()` starts one first.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from fakestores import FakeAppStore, FakePlayStore, stack_environment
from loadtest import report
from loadtest.driver import (
    Attempt,
    DriverRecord,
    Drivers,
    WorkerJob,
    default_workers,
    in_flight_cap,
    merge,
    shard,
)
from loadtest.funding import Funding, StoreFunding
from loadtest.plan import LoadConfig, Plan, build
from loadtest.progress import Progress, live_display
from loadtest.resources import Sampler
from loadtest.show import ControlRoom, wait_final
from loadtest.verify import RunRecord, Verdict, verify
from ops.edge import ONE_LOAD_GENERATOR
from ops.stack import Stack, StackSettings

#: The loadtest's own stack: quiet logs, and windows as short as a second so a smoke run of a
#: compressed show can be tiny (a real show's minimum stays sync_svc's default elsewhere).
OWN_STACK_ENV = {"TELEVOTE_LOG_LEVEL": "WARNING", "SYNC_MIN_WINDOW_MS": "1000"}


@dataclass
class Target:
    """Where the stack is: the edge, the dev token key (state dir), the ledger."""

    edge_target: str  # host:port
    state_dir: Path
    database_url: str
    #: Whether this process started the stack (then its processes' CPU and memory are known).
    own_stack: bool = False
    #: Kannel's fake SMSC links (carrier -> port), when the stack runs Kannel.
    kannel_smsc_ports: dict[str, int] = field(default_factory=dict)

    @property
    def edge_url(self) -> str:
        return f"http://{self.edge_target}"

    @classmethod
    def of(cls, stack: Stack, own: bool = True) -> Target:
        return cls(stack.edge_target, stack.settings.state_dir, stack.database_url, own,
                   dict(stack.kannel.smsc_ports) if stack.kannel is not None else {})


@dataclass
class RunResult:
    plan: Plan
    verdict: Verdict
    figures: dict[str, Any]
    out_dir: Path | None
    attempts: list[Attempt] = field(default_factory=list)
    record: RunRecord | None = None


async def run(config: LoadConfig, target: Target, out_dir: Path | None = None, *,
              workers: int | None = None, live: bool = True,
              log: Callable[[str], None] = print,
              stores: StoreFunding | None = None) -> RunResult:
    """With `stores` (the stand-ins the stack's vote_svc trusts) paid voters buy packages and
    some are refunded during voting; without, an operator grants them their paid votes.
    `workers` driver processes (default: `default_workers()`, one per core)."""
    workers = workers or default_workers()
    plan = build(config)
    if config.sms_via == "kannel" and not target.kannel_smsc_ports:
        raise ValueError("SMS via Kannel needs a stack running Kannel (televote up --kannel)")
    log(f"plan {plan.run_id} ({config.scenario}): {plan.summary()}")
    room = ControlRoom(target.edge_target, target.state_dir)
    try:
        voting_round = await room.prepare(plan.run_id, config.contestants, config.free_quota,
                                          config.wall_window_s)
        started = time.monotonic()
        funding: Funding | None = None
        during_voting: Callable[[], Coroutine[Any, Any, None]] | None = None
        if stores is None:
            await room.grant(plan.grants, plan.run_id)
            log(f"granted {sum(plan.grants.values()):,} paid votes to {len(plan.grants):,}"
                f" voters in {time.monotonic() - started:.1f}s (GrantVotes as an operator)")
        else:
            funding = await stores.buy(target.edge_target, target.state_dir, plan.grants)
            took = time.monotonic() - started
            log(f"{len(funding.purchases):,} packages bought by {len(plan.grants):,} voters"
                f" in {took:.1f}s ({len(funding.purchases) / max(took, 1e-9):.0f}/s,"
                " PurchaseVotePackage through the stand-in stores)")

            async def refund_midway() -> None:
                assert funding is not None and stores is not None
                await asyncio.sleep(max(0.0, voting_round.opens_at
                                        + plan.config.wall_window_s / 2 - time.time()))
                log(f"{await stores.refund(target.edge_url, funding)} purchases refunded"
                    " by the stores during voting")

            during_voting = refund_midway
        records, progress, sampler = await _vote(plan, target, room, voting_round, workers,
                                                 live, log, during_voting)
        attempts = merge(records)
        progress.phase = "waiting for the final result"
        finalized: datetime = await wait_final(target.database_url, voting_round.round_id)
        log(f"final result stored {finalized.timestamp() - voting_round.closes_at:.1f}s"
            " after the close")
        with contextlib.suppress(Exception):  # the show is over either way
            await room.end_show(voting_round.episode_id)
    finally:
        await room.close()
    # Written by `televote up`, in sms_svc's own directory (ops/stack.py).
    secret_path = target.state_dir / "services" / "sms_svc" / "msisdn-secret"
    record = RunRecord(plan, voting_round, attempts, funding=funding, msisdn_secret=(
        secret_path.read_text().strip().encode() if secret_path.exists() else b""))
    async with await psycopg.AsyncConnection.connect(target.database_url,
                                                     row_factory=dict_row) as connection:
        verdict = await verify(connection, record)
    notes = [
        "Paid voters are funded with WalletAdminService.GrantVotes by an operator (a stack"
        " started elsewhere does not trust the stand-in stores)." if funding is None else
        "Paid voters buy vote packages in the stand-in App Store and Google Play"
        " (PurchaseVotePackage, receipts verified by the stores' libraries); some purchases"
        " are refunded by the stores during voting.",
        "Latency runs from the planned send moment to the answer; the load drivers share the"
        " machine's cores with the stack.",
    ]
    if not target.own_stack:
        notes.append("Stack started elsewhere: CPU and memory are the load drivers' only.")
    if config.scenario == "bots":
        notes.append("Through the edge every vote has the simulator's IP (use_remote_address),"
                     " so fraud sees the generator's devices, GPS and timing, not its IPs.")
    generator = report.generator_figures(plan, attempts, records, voting_round.opens_at)
    last_answer = max((a.sent + a.latency_ms / 1000 for a in attempts),
                      default=voting_round.closes_at)
    # What the votes cost, process by process: from the opening to the last answer, before
    # the finalizing and the verification.
    voting_cpu = sampler.cpu_seconds(voting_round.opens_at, last_answer)
    resources = sampler.stop()
    data = report.figures(plan, attempts, voting_round.opens_at, voting_round.closes_at,
                          verdict, resources, sampler.load_average, notes, generator)
    data["cpu_seconds_while_voting"] = voting_cpu
    if generator["lagged"]:
        log(generator["verdict"])
    if out_dir is not None:
        report.write(out_dir, data, plan, attempts, voting_round.opens_at,
                     voting_round.closes_at)
    return RunResult(plan, verdict, data, out_dir, attempts, record)


async def _vote(plan: Plan, target: Target, room: ControlRoom, voting_round: Any,
                workers: int, live: bool, log: Callable[[str], None],
                during_voting: Callable[[], Coroutine[Any, Any, None]] | None = None,
                ) -> tuple[list[DriverRecord], Progress, Sampler]:
    """Start the drivers, open voting, follow progress until every driver is done."""
    scratch = Path(tempfile.mkdtemp(prefix=f"loadtest-{plan.run_id}-"))
    timeout_s = WorkerJob.timeout_s
    cap = in_flight_cap(plan.shots, workers, timeout_s)
    via_kannel = plan.config.sms_via == "kannel"
    jobs = [WorkerJob(n, share, voting_round.round_id, voting_round.contestant_ids,
                      target.edge_target, target.edge_url, target.state_dir,
                      scratch / f"worker-{n}.pickle", timeout_s,
                      retry_errors=plan.config.scenario == "retries", max_in_flight=cap,
                      kannel_smsc_ports=target.kannel_smsc_ports if via_kannel else {})
            for n, share in enumerate(shard(plan.shots, workers, texts_in_one=via_kannel))]
    progress = Progress(f"televote loadtest {plan.config.scenario} {plan.run_id}",
                        len(plan.shots), plan.config.wall_window_s)
    sampler = Sampler()
    try:
        with Drivers(jobs) as drivers, live_display(progress, live) as display:
            await drivers.ready()
            sampler.start()
            await room.open_voting(voting_round, plan.config.wall_window_s)
            drivers.go(voting_round.opens_at)
            progress.start_at, progress.phase = voting_round.opens_at, "voting"
            cues = asyncio.create_task(room.performances(voting_round, voting_round.opens_at,
                                                         plan.performances))
            side = asyncio.create_task(during_voting() if during_voting
                                       else asyncio.sleep(0))

            def tick() -> None:
                if time.time() > voting_round.closes_at:
                    progress.phase = "closed; answering the last votes"
                display.refresh()

            records = await drivers.follow(lambda payload: progress.add(*payload), tick)
            with contextlib.suppress(Exception):
                await cues
            await side  # a refund that failed fails the run
    except BaseException:
        sampler.stop()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the records are read (or the run failed)
    log(f"{sum(len(r.attempts) for r in records):,} requests answered by {workers} drivers")
    return records, progress, sampler


async def run_with_own_stack(config: LoadConfig, out_dir: Path | None, *,
                             workers: int | None = None,
                             replicas: dict[str, int] | None = None, live: bool = True,
                             state_dir: Path | None = None,
                             log: Callable[[str], None] = print) -> RunResult:
    """Start the whole mesh (embedded PostgreSQL and Redis), run, stop it again."""
    state_dir = state_dir or Path(tempfile.mkdtemp(prefix="loadtest-stack-"))
    apple, google = FakeAppStore(ocsp=True), FakePlayStore()
    settings = StackSettings(
        state_dir=state_dir, edge_port=0,
        service_env={**OWN_STACK_ENV,
                     **stack_environment(apple, google, state_dir / "stores")},
        edge=ONE_LOAD_GENERATOR, kannel=config.sms_via == "kannel")
    # Two vote_svc replicas by default: the vote path is where the load is, and replicas are
    # how it is run (like bench/vote_bench.py).
    settings.replicas.update({"vote_svc": 2, **(replicas or {})})
    stack = Stack(settings)
    started = time.monotonic()
    await stack.start()
    log(f"stack up in {time.monotonic() - started:.1f}s: edge {stack.edge_url},"
        f" replicas {settings.replicas}")
    try:
        return await run(config, Target.of(stack), out_dir, workers=workers, live=live,
                         log=log, stores=StoreFunding(apple, google))
    finally:
        await stack.stop()
        apple.close()
        google.close()
