"""The web apps' costs: the results board's main-thread time per live update, and the weight
of each bundle.

    python -m bench.web_bench [--seconds 20] [--contestants 12]

Starts its own mesh, opens a round with N contestants (public counts), opens the results board
in Debian's chromium (Playwright) and, while voters move the standings every second, reads
Chromium's own accounting of main-thread work (CDP Performance.getMetrics: TaskDuration,
ScriptDuration, LayoutDuration, RecalcStyleDuration) before and after. Everything the page's
main thread did in the interval (stream decoding, the board update, the countdown, style,
layout, paint set-up) is divided by the updates it rendered: an upper bound on one update's
cost. The bench's own DevTools commands (DevToolsCommandDuration: its metric reads and
evaluates) run on that thread too and are left out. It also says how many of the updates
changed the standings (the total moved): an update that changes nothing costs next to
nothing. The budget is 5 ms an update at 1 update a second; the voter bundle's is 150 KB
gzipped.

    python -m bench.web_bench --seconds 8 --variant base= --variant name='.bar{...}'

compares extra CSS on one page and one stream, A/B/A/B (--rounds), for the shared machine's
noise is larger than most effects measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from ops import tokens, web
from ops.stack import Stack, StackSettings
from runtime.access import Role
from televote.sync.v1 import show_control_service_pb2 as control
from televote.sync.v1 import show_control_service_pb2_grpc as control_grpc
from televote.sync.v1 import sync_types_pb2
from televote.vote.v1 import (
    vote_service_pb2,
    vote_service_pb2_grpc,
    vote_types_pb2,
    wallet_admin_service_pb2,
    wallet_admin_service_pb2_grpc,
)

METRICS = ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration",
           "DevToolsCommandDuration")
VOTERS = 12
#: What the renderer's main thread spends its time on, by Chromium's own trace events.
TRACE_CATEGORIES = ["devtools.timeline", "v8", "v8.gc", "blink", "cc", "accessibility",
                    "disabled-by-default-devtools.timeline",
                    "disabled-by-default-devtools.timeline.invalidationTracking"]


def bundle_sizes() -> dict[str, dict[str, float]]:
    return {path.name: {"kb": round(path.stat().st_size / 1024, 1),
                        "gzip_kb": round(web.gzipped_size(path) / 1024, 1)}
            for path in sorted(web.DIST.glob("*.js"))}


def _auth(stack: Stack, role: Role, subject: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {tokens.mint(stack.settings.state_dir, role, subject)}"),)


async def _open_round(stack: Stack, channel: grpc.aio.Channel, contestants: int
                      ) -> tuple[str, str, list[str]]:
    stub = control_grpc.ShowControlServiceStub(channel)
    operator = _auth(stack, Role.OPERATOR, "bench")

    async def call(method: str, **fields: Any) -> Any:
        request = getattr(control, f"{method}Request")(request_id=str(uuid.uuid4()), **fields)
        return await getattr(stub, method)(request, metadata=operator, timeout=10)

    show = (await call("CreateShow", name="X Factor Cambodia")).show
    episode = (await call("CreateEpisode", show_id=show.show_id, title="Bench night")).episode
    ids = [(await call("AddContestant", episode_id=episode.episode_id, name=f"Singer {n}",
                       sms_number=n)).contestant.contestant_id for n in range(1, contestants + 1)]
    round_ = (await call("CreateRound", episode_id=episode.episode_id, name="Public vote",
                         contestant_ids=ids,
                         visibility=sync_types_pb2.RESULTS_VISIBILITY_PUBLIC_COUNTS)).round
    await call("StartShow", episode_id=episode.episode_id)
    duration = control.OpenVotingRequest().duration
    duration.FromSeconds(600)
    await call("OpenVoting", round_id=round_.round_id, duration=duration)
    admin = wallet_admin_service_pb2_grpc.WalletAdminServiceStub(channel)
    for n in range(VOTERS):
        await admin.GrantVotes(wallet_admin_service_pb2.GrantVotesRequest(
            request_id=str(uuid.uuid4()), user_id=f"bench-fan-{n}", count=10_000,
            reason="bench"), metadata=operator, timeout=10)
    return episode.episode_id, round_.round_id, ids


async def _voters(stack: Stack, channel: grpc.aio.Channel, round_id: str, ids: list[str],
                  stop: asyncio.Event, churn: bool = False) -> int:
    """Each voter casts one paid vote a second (under the per-user rate limit).

    By default for a contestant drawn with drifting weights, so ranks change often early in
    the round and settle as the counts grow. With `churn`, the board's worst case for as long
    as it runs: every second all votes go to the two contestants last in the bench's own tally,
    which jump to the top, so nearly every row moves in every update."""
    stub = vote_service_pb2_grpc.VoteServiceStub(channel)
    metadata = [_auth(stack, Role.VOTER, f"bench-fan-{n}") for n in range(VOTERS)]
    weights = [random.random() for _ in ids]
    tally = dict.fromkeys(ids, 0)
    sent = 0
    while not stop.is_set():
        if churn:
            last = sorted(ids, key=tally.__getitem__)[:2]
            picks = [last[n % 2] for n in range(VOTERS)]
            counts = [20] * VOTERS
        else:
            weights = [max(0.05, w + random.uniform(-0.3, 0.3)) for w in weights]
            picks = random.choices(ids, weights, k=VOTERS)
            counts = [random.randint(1, 20) for _ in picks]
        answers = await asyncio.gather(*(stub.SubmitVote(vote_service_pb2.SubmitVoteRequest(
            request_id=str(uuid.uuid4()), round_id=round_id, contestant_id=pick,
            vote_type=vote_types_pb2.VOTE_TYPE_PAID, count=count,
            channel=vote_types_pb2.CHANNEL_WEB), metadata=metadata[n], timeout=10)
            for n, (pick, count) in enumerate(zip(picks, counts, strict=True))),
            return_exceptions=True)
        for pick, count, answer in zip(picks, counts, answers, strict=True):
            if not isinstance(answer, BaseException):
                tally[pick] += count
        sent += VOTERS
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
    return sent


async def measure(seconds: float, contestants: int, transitions: bool = True,
                  variants: dict[str, str] | None = None, rounds: int = 2,
                  churn: bool = False, trace: bool = False) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    chromium = web.chromium_path()
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="web-bench-") as state:
        # Fraud scoring off, as in vote_bench: the bench's few voters vote every second in a
        # steady rhythm, which the seed's bot-timing rule blocks after five votes; the board
        # then gets the same standings every second and the bench would time an idle board.
        stack = Stack(StackSettings(state_dir=Path(state), edge_port=0, service_env={
            "FRAUD_TARGET": "", "TELEVOTE_LOG_LEVEL": "WARNING"}))
        await stack.start()
        try:
            async with grpc.aio.insecure_channel(stack.edge_target) as channel, \
                    async_playwright() as driver:
                episode_id, round_id, ids = await _open_round(stack, channel, contestants)
                browser = await driver.chromium.launch(executable_path=chromium,
                                                       args=web.CHROMIUM_ARGS)
                page = await browser.new_page(viewport={"width": 1280, "height": 1000},
                                              bypass_csp=not transitions or bool(variants))
                await page.goto(f"{stack.edge_url}/results#episode={episode_id}")
                if not transitions:
                    await page.add_style_tag(content="* { transition: none !important; }")
                stop = asyncio.Event()
                voting = asyncio.create_task(_voters(stack, channel, round_id, ids, stop, churn))
                await page.locator(f".standing >> nth={contestants - 1}").wait_for()
                await asyncio.sleep(3)  # warm: first rows built, JIT settled
                # Counts the updates that changed the standings (the total moved): an update
                # that changes nothing costs nearly nothing, so a run must say how many did.
                await page.evaluate("""() => { window.benchChanged = 0;
                    new MutationObserver(() => { window.benchChanged++; }).observe(
                        document.querySelector('#total'),
                        {characterData: true, childList: true, subtree: true}); }""")
                cdp = await page.context.new_cdp_session(page)
                await cdp.send("Performance.enable", {"timeDomain": "threadTicks"})

                async def sample() -> tuple[dict[str, float], int, float]:
                    metrics = {m["name"]: m["value"]
                               for m in (await cdp.send("Performance.getMetrics"))["metrics"]}
                    updates, changed = await page.evaluate(
                        "[Number(document.body.dataset.updates), window.benchChanged]")
                    metrics["changed"] = changed
                    return metrics, int(updates), time.monotonic()

                if variants:
                    compared = await _compare(page, sample, variants, seconds, rounds)
                else:
                    if trace:
                        await browser.start_tracing(page=page, categories=TRACE_CATEGORIES)
                    before = await sample()
                    await asyncio.sleep(seconds)
                    after = await sample()
                    trace_bytes = await browser.stop_tracing() if trace else b""
                stop.set()
                votes = await voting
                await browser.close()
        finally:
            await stack.stop()
    if variants:
        return {"contestants": contestants, "votes_sent": votes, "variants": compared}
    return {"contestants": contestants, "transitions": transitions, "churn": churn,
            **_figures(before, after), "trace": trace_bytes,
            "votes_sent": votes, "budget_ms": 5.0,
            "bundles": bundle_sizes(), "voter_budget_gzip_kb": 150}


def main_thread_breakdown(trace: Path, updates: int, top: int = 15) -> list[tuple[str, float]]:
    """The renderer main thread's CPU time per update by trace event, each event counted by
    its self time (its thread time less that of the events nested in it), dearest first."""
    events = json.loads(trace.read_bytes())["traceEvents"]
    main = {(e["pid"], e["tid"]) for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"
            and e.get("args", {}).get("name") == "CrRendererMain"}
    spans = sorted(((e["ts"], e["ts"] + e.get("dur", 0), e.get("tdur", e.get("dur", 0)),
                     e["name"], (e["pid"], e["tid"]))
                    for e in events if e.get("ph") == "X" and (e["pid"], e["tid"]) in main),
                   key=lambda span: (span[4], span[0], -span[1]))
    own: dict[str, float] = {}
    stack: list[tuple[float, str]] = []  # (end, name) of the enclosing spans
    thread = None
    for start, end, cpu, name, tid in spans:
        if tid != thread:
            stack, thread = [], tid
        while stack and stack[-1][0] <= start:
            stack.pop()
        if stack:
            own[stack[-1][1]] = own.get(stack[-1][1], 0.0) - cpu
        own[name] = own.get(name, 0.0) + cpu
        stack.append((end, name))
    ranked = sorted(own.items(), key=lambda item: -item[1])[:top]
    return [(name, round(us / 1000 / max(1, updates), 3)) for name, us in ranked]


def _figures(before: tuple[dict[str, float], int, float], after: tuple[dict[str, float], int, float]
             ) -> dict[str, Any]:
    updates = after[1] - before[1]
    elapsed = after[2] - before[2]
    per_update = {name: round((after[0][name] - before[0][name]) * 1000 / max(1, updates), 3)
                  for name in METRICS}
    return {"seconds": round(elapsed, 1), "updates": updates,
            "updates_that_changed": int(after[0]["changed"] - before[0]["changed"]),
            "updates_per_second": round(updates / elapsed, 2),
            "main_thread_ms_per_update": per_update}


async def _compare(page: Any, sample: Any, variants: dict[str, str], seconds: float, rounds: int
                   ) -> dict[str, list[float]]:
    """A/B/A/B on one page and one stream: each variant's extra CSS is swapped in, given two
    seconds to settle, then measured; alternating spreads the shared machine's noise over all."""
    style = await page.add_style_tag(content="/* variants */")
    figures: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, css in variants.items():
            await style.evaluate("(node, css) => { node.textContent = css; }", css)
            await asyncio.sleep(2)
            before = await sample()
            await asyncio.sleep(seconds)
            after = await sample()
            per_update = _figures(before, after)["main_thread_ms_per_update"]
            figures[name].append(per_update["TaskDuration"] - per_update["DevToolsCommandDuration"])
    return figures



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--contestants", type=int, default=12)
    parser.add_argument("--no-transitions", action="store_true",
                        help="turn the board's CSS transitions off (the update's own cost)")
    parser.add_argument("--sizes-only", action="store_true", help="print the bundle sizes only")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=CSS",
                        help="compare extra CSS on the same page, A/B/A/B (give two or more; "
                             "'base=' is the page as built)")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds with --variant")
    parser.add_argument("--trace", type=Path, metavar="FILE",
                        help="write a Chromium trace of the measured interval to FILE and "
                             "print where the main thread's time went")
    parser.add_argument("--churn", action="store_true",
                        help="the worst case throughout: nearly every row moves every update")
    args = parser.parse_args()
    if args.variant:
        variants = dict(v.split("=", 1) for v in args.variant)
        figures = asyncio.run(measure(args.seconds, args.contestants, variants=variants,
                                       rounds=args.rounds, churn=args.churn))
        for name, runs in figures["variants"].items():
            print(f"{name}: main thread {', '.join(f'{r:.2f}' for r in runs)} ms per update")
        return
    if args.sizes_only:
        print(json.dumps({"bundles": bundle_sizes()}, indent=2))
        return
    figures = asyncio.run(measure(args.seconds, args.contestants, not args.no_transitions,
                                  churn=args.churn, trace=args.trace is not None))
    trace = figures.pop("trace")
    per_update = figures["main_thread_ms_per_update"]
    devtools = per_update["DevToolsCommandDuration"]
    task = per_update["TaskDuration"] - devtools
    print(f"results board, {figures['contestants']} contestants, transitions "
          f"{'on' if figures['transitions'] else 'off'}: {figures['updates']} updates in "
          f"{figures['seconds']} s ({figures['updates_per_second']}/s, "
          f"{figures['updates_that_changed']} changed the standings); main thread "
          f"{task:.2f} ms per update (budget 5 ms), of which script "
          f"{per_update['ScriptDuration']:.2f} ms; the bench's own DevTools commands "
          f"{devtools:.2f} ms more")
    voter = figures["bundles"].get("voter.js", {})
    print(f"voter bundle: {voter.get('kb')} KB, {voter.get('gzip_kb')} KB gzipped (budget 150 KB)")
    print(json.dumps(figures, indent=2))
    if args.trace:
        args.trace.write_bytes(trace)
        print("main thread per update, by trace event (self time, ms):")
        for name, ms in main_thread_breakdown(args.trace, figures["updates"]):
            print(f"  {ms:7.3f}  {name}")


if __name__ == "__main__":
    main()
