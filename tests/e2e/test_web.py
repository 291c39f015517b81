"""The web apps in a real browser (Debian's chromium driven by Playwright) against the real
mesh behind the edge: the pages and bundles come from the edge itself, every call is gRPC-Web.

Screenshots of each page go to test-artifacts/web/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from ops import tokens, web
from ops.stack import Stack
from runtime.access import Role
from televote.fraud.v1 import (
    fraud_review_service_pb2,
    fraud_review_service_pb2_grpc,
    fraud_types_pb2,
)
from televote.sync.v1 import show_watch_service_pb2 as watch
from televote.sync.v1 import show_watch_service_pb2_grpc as watch_grpc
from televote.sync.v1 import sync_types_pb2
from televote.vote.v1 import wallet_admin_service_pb2, wallet_admin_service_pb2_grpc
from tests.conftest import bearer

# The fraud scoring server of fraud_svc's own tests (a test GeoIP database) queues the reviews.
from tests.integration.test_fraud import Fraud, _queue_reviews, _user
from tests.integration.test_fraud import fraud as fraud
from tests.sync_support import GrpcWatcher, Operator, request_id, seconds

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(web.chromium_path() is None,
                       reason="chromium is not installed (apt-get install chromium)"),
]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
AXE = web.NODE_MODULES / "axe-core" / "axe.min.js"


@pytest_asyncio.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=web.chromium_path(),
                                                args=web.CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Watched:
    """A page and the errors it logged (console errors and uncaught exceptions)."""

    page: Any
    errors: list[str] = field(default_factory=list)

    async def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def open_page(browser: Any, url: str, *, width: int = 1280, height: int = 900,
                    mobile: bool = False, bypass_csp: bool = False) -> Watched:
    context = await browser.new_context(viewport={"width": width, "height": height},
                                        bypass_csp=bypass_csp,
                                        is_mobile=mobile, has_touch=mobile,
                                        device_scale_factor=2 if mobile else 1)
    # The contestants' photos (https://img.example/N.jpg in sync_support): a portrait per
    # number, as a photo host would serve it.
    await context.route("https://img.example/**", serve_portrait)
    page = await context.new_page()
    watched = Watched(page)
    page.on("console", lambda m: watched.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: watched.errors.append(str(e)))
    await page.goto(url)
    return watched


async def serve_portrait(route: Any) -> None:
    number = int(route.request.url.rsplit("/", 1)[-1].split(".")[0] or 0)
    hue = (number * 67) % 360
    await route.fulfill(content_type="image/svg+xml", body=(
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 100 100">'
        f'<rect width="100" height="100" fill="hsl({hue} 55% 40%)"/>'
        f'<circle cx="50" cy="40" r="19" fill="hsl({hue} 40% 82%)"/>'
        f'<ellipse cx="50" cy="98" rx="34" ry="30" fill="hsl({hue} 40% 82%)"/></svg>'))


def token(stack: Stack, role: Role, subject: str) -> str:
    return tokens.mint(stack.settings.state_dir, role, subject)


async def open_round(stack: Stack, channel: grpc.aio.Channel, contestants: int = 3,
                     window_s: float = 120) -> tuple[str, str, list[str]]:
    """A live episode with an open round: (episode_id, round_id, contestant ids)."""
    operator = Operator(stack, channel)
    episode_id, contestant_ids = await operator.episode_with_contestants(contestants)
    round_ = (await operator.call(
        "CreateRound", episode_id=episode_id, name="Public vote", contestant_ids=contestant_ids,
        visibility=sync_types_pb2.RESULTS_VISIBILITY_PUBLIC_COUNTS)).round
    await operator.call("StartShow", episode_id=episode_id)
    await operator.call("OpenVoting", round_id=round_.round_id, duration=seconds(window_s))
    return episode_id, round_.round_id, contestant_ids


async def grant(stack: Stack, channel: grpc.aio.Channel, user: str, count: int) -> None:
    admin = wallet_admin_service_pb2_grpc.WalletAdminServiceStub(channel)
    await admin.GrantVotes(wallet_admin_service_pb2.GrantVotesRequest(
        request_id=request_id(), user_id=user, count=count, reason="web test"),
        metadata=bearer(stack.settings.state_dir, Role.OPERATOR, "producer"), timeout=10)


async def close_and_wait_final(stack: Stack, channel: grpc.aio.Channel, episode_id: str,
                               round_id: str) -> None:
    watcher = GrpcWatcher().start(channel, episode_id)
    try:
        await Operator(stack, channel).call("CloseVoting", round_id=round_id)
        await watcher.wait_for(watch.SHOW_EVENT_TYPE_RESULTS_READY, timeout=60)
    finally:
        await watcher.stop()


async def vote_in_page(page: Any, contestant_id: str) -> Any:
    """Taps Vote on a contestant's card and returns the message element once this tap has its
    answer (each answer carries its tap's number)."""
    taps = int(await page.evaluate("Number(document.body.dataset.taps || 0)"))
    await page.locator(f'.card[data-contestant="{contestant_id}"] .vote-button:enabled').click()
    message = page.locator(f'#message[data-tap="{taps + 1}"]')
    await message.wait_for()
    return message


def _get(url: str, method: str = "GET", headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def test_the_edge_serves_the_pages_and_nothing_else_without_a_token(stack: Stack) -> None:
    status, headers, body = await asyncio.to_thread(_get, f"{stack.edge_url}/vote")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert b"/assets/voter.js" in body
    status, headers, body = await asyncio.to_thread(_get, f"{stack.edge_url}/assets/voter.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert body == (web.DIST / "voter.js").read_bytes()
    status, _, body = await asyncio.to_thread(_get, f"{stack.edge_url}/")  # redirected
    assert status == 200 and b"/assets/voter.js" in body
    # Only the built files are public; any other path still needs a token.
    for path in ("/assets/nope.js", "/vote/../etc/passwd", "/assets/"):
        status, _, _ = await asyncio.to_thread(_get, f"{stack.edge_url}{path}")
        assert status == 401, path
    status, _, _ = await asyncio.to_thread(_get, f"{stack.edge_url}/vote", "POST")
    assert status == 404  # pages are read-only
    # Same origin: the pages need no CORS, and a foreign origin still gets none.
    status, headers, _ = await asyncio.to_thread(
        _get, f"{stack.edge_url}/televote.vote.v1.VoteService/SubmitVote", "OPTIONS",
        {"origin": "https://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in {k.lower() for k in headers}


async def test_a_voter_votes_until_no_free_votes_and_the_receipt_verifies_in_the_page(
        stack: Stack, edge_channel: grpc.aio.Channel, browser: Any) -> None:
    episode_id, round_id, contestants = await open_round(stack, edge_channel)
    voter = await open_page(
        browser, f"{stack.edge_url}/vote#episode={episode_id}&token="
        f"{token(stack, Role.VOTER, 'web-voter-1')}", width=390, height=844, mobile=True)
    page = voter.page
    await page.locator(".vote-button:enabled").first.wait_for()
    await page.locator("#free-left", has_text="5 / 5").wait_for()
    assert "token=" not in page.url  # the token left the address bar

    for n in range(5):
        message = await vote_in_page(page, contestants[n % 3])
        assert await message.get_attribute("data-reason") == "OK", await message.text_content()
        await page.locator("#free-left", has_text=f"{4 - n} / 5").wait_for()
    await voter.screenshot("voter-after-votes")
    message = await vote_in_page(page, contestants[0])
    assert await message.get_attribute("data-reason") == "NO_FREE_VOTES"
    assert "used all your free votes" in (await message.text_content() or "")
    await voter.screenshot("voter-no-free-votes")

    # The same refusal in Khmer.
    await page.locator("#lang").click()
    message = await vote_in_page(page, contestants[1])
    assert await message.get_attribute("data-reason") == "NO_FREE_VOTES"
    assert "សន្លឹកឆ្នោតឥតគិតថ្លៃ" in (await message.text_content() or "")
    await voter.screenshot("voter-khmer")
    await page.locator("#lang").click()
    assert "used all your free votes" in (await message.text_content() or "")  # said again

    assert await page.locator(".receipt").count() == 5
    await close_and_wait_final(stack, edge_channel, episode_id, round_id)
    # RESULTS_READY reaches the page through WatchShow; it then fetches each receipt's proof
    # and the ledger's key and checks leaf hash, path, signed head and signature itself.
    await page.locator('.receipt-status[data-verified="ok"]').nth(4).wait_for(timeout=30_000)
    assert await page.locator('.receipt-status[data-verified="failed"]').count() == 0
    assert "of 5 in the signed result" in (
        await page.locator('.receipt-status[data-verified="ok"]').first.text_content() or "")
    await voter.screenshot("voter-receipts-verified")
    assert voter.errors == [], voter.errors


async def test_a_tampered_receipt_does_not_verify(
        stack: Stack, edge_channel: grpc.aio.Channel, browser: Any) -> None:
    """The in-page check can fail: a receipt hash the voter was not given is rejected."""
    episode_id, round_id, contestants = await open_round(stack, edge_channel)
    voter = await open_page(browser, f"{stack.edge_url}/vote#episode={episode_id}&token="
                                     f"{token(stack, Role.VOTER, 'web-voter-tamper')}")
    page = voter.page
    await page.locator(".vote-button:enabled").first.wait_for()
    message = await vote_in_page(page, contestants[0])
    assert await message.get_attribute("data-reason") == "OK"
    await close_and_wait_final(stack, edge_channel, episode_id, round_id)
    await page.locator('.receipt-status[data-verified="ok"]').wait_for(timeout=30_000)
    # Flip one bit of the stored receipt hash, as if the server had changed the leaf.
    await page.evaluate("""() => {
        const keys = Object.keys(localStorage).filter(k => k.startsWith('televote.receipts.'));
        for (const key of keys) {
            const list = JSON.parse(localStorage.getItem(key));
            for (const r of list) {
                r.receiptHash = (r.receiptHash[0] === '0' ? '1' : '0') + r.receiptHash.slice(1);
                delete r.verified;
            }
            localStorage.setItem(key, JSON.stringify(list));
        }
    }""")
    await page.reload()
    await page.locator(".receipt button").first.click()
    status = page.locator('.receipt-status[data-verified="failed"]')
    await status.wait_for(timeout=15_000)
    assert "hash" in (await status.text_content() or "")


async def test_the_page_countdown_is_within_a_second_of_the_server_even_with_a_wrong_clock(
        stack: Stack, edge_channel: grpc.aio.Channel, browser: Any) -> None:
    episode_id, _, _ = await open_round(stack, edge_channel, window_s=300)
    voter = await open_page(browser, "about:blank", width=390, height=844, mobile=True)
    # The phone's clock is 7 minutes behind: a countdown from Date.now() would be 7 min off.
    await voter.page.clock.set_system_time(datetime.now(UTC) - timedelta(minutes=7))
    await voter.page.goto(f"{stack.edge_url}/vote#episode={episode_id}")
    clock = voter.page.locator("#clock")
    await voter.page.locator("#clock-box:visible").wait_for()
    stub = watch_grpc.ShowWatchServiceStub(edge_channel)
    for _ in range(3):
        state = await stub.GetShowState(watch.GetShowStateRequest(episode_id=episode_id))
        closes_at = state.snapshot.current_round.closes_at.ToMilliseconds()
        shown = await clock.text_content() or ""
        minutes, secs = shown.split(":")
        page_seconds = int(minutes) * 60 + int(secs)
        server_seconds = math.ceil((closes_at - time.time() * 1000) / 1000)
        assert abs(page_seconds - server_seconds) <= 1, (shown, server_seconds)
        await asyncio.sleep(1.1)
    assert voter.errors == []


async def test_the_overlay_shows_a_rank_change_after_votes_move(
        stack: Stack, edge_channel: grpc.aio.Channel, browser: Any) -> None:
    episode_id, _, contestants = await open_round(stack, edge_channel, contestants=4)
    overlay = await open_page(browser, f"{stack.edge_url}/overlay#episode={episode_id}&bg=green",
                              width=1920, height=1080)
    board = await open_page(browser, f"{stack.edge_url}/results#episode={episode_id}")
    countdown = await open_page(browser, f"{stack.edge_url}/countdown#episode={episode_id}",
                                width=1920, height=1080)
    voter = await open_page(browser, f"{stack.edge_url}/vote#episode={episode_id}&token="
                                     f"{token(stack, Role.VOTER, 'web-fan-1')}")
    await grant(stack, edge_channel, "web-fan-1", 200)
    page = voter.page
    await page.locator(".vote-button:enabled").first.wait_for()
    await page.locator("input[value=paid]").check()
    await page.locator("#count").select_option("10")
    for contestant in (contestants[2], contestants[0]):
        message = await vote_in_page(page, contestant)
        assert await message.get_attribute("data-reason") == "OK"
    third = overlay.page.locator(f'.standing[data-contestant="{contestants[2]}"]')
    # Both votes on the overlay: 3 and 1 tied first (everyone is first at 0 votes, so the
    # counts say the overlay has them), 2 and 4 tied third.
    for leader in (contestants[2], contestants[0]):
        await overlay.page.locator(f'.standing[data-contestant="{leader}"][data-rank="1"]',
                                   has=overlay.page.locator(".count", has_text="10")
                                   ).wait_for(timeout=15_000)
    await overlay.page.locator(f'.standing[data-contestant="{contestants[3]}"][data-rank="3"]'
                               ).wait_for(timeout=15_000)
    # Contestant 4 (tied third with 2) overtakes the two tied leaders: +2 (green), and
    # they drop (red).
    await page.locator("#count").select_option("50")
    message = await vote_in_page(page, contestants[3])
    assert await message.get_attribute("data-reason") == "OK"
    fourth = overlay.page.locator(f'.standing[data-contestant="{contestants[3]}"]')
    await fourth.locator(".change-up", has_text="+2").wait_for(timeout=15_000)
    await third.locator(".change-down", has_text="\N{MINUS SIGN}1").wait_for(timeout=5_000)
    assert await fourth.get_attribute("data-rank") == "1"
    assert await fourth.locator(".badge-gold").count() == 1
    assert await fourth.locator(".count").text_content() == "50"
    await board.page.locator(f'.standing[data-contestant="{contestants[3]}"][data-rank="1"]'
                             ).wait_for(timeout=15_000)
    await overlay.screenshot("overlay")
    await board.screenshot("results-board")
    await countdown.screenshot("countdown-overlay")
    await voter.screenshot("voter-paid")
    for watched in (overlay, board, countdown, voter):
        assert watched.errors == []


async def test_a_network_failure_is_retried_with_the_same_request_id(
        stack: Stack, edge_channel: grpc.aio.Channel, browser: Any) -> None:
    episode_id, _, contestants = await open_round(stack, edge_channel)
    voter = await open_page(browser, f"{stack.edge_url}/vote#episode={episode_id}&token="
                                     f"{token(stack, Role.VOTER, 'web-voter-flaky')}")
    page = voter.page
    await page.locator("#free-left", has_text="5 / 5").wait_for()
    bodies: list[bytes] = []

    async def lose_the_first_answer(route: Any) -> None:
        bodies.append(route.request.post_data_buffer)
        if len(bodies) == 1:
            # The vote reaches the server, then the connection drops before the answer.
            await route.fetch()
            await route.abort("connectionreset")
        else:
            await route.continue_()

    await page.route("**/televote.vote.v1.VoteService/SubmitVote", lose_the_first_answer)
    message = await vote_in_page(page, contestants[0])
    assert await message.get_attribute("data-reason") == "OK"
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # same request id, same vote
    await page.locator("#free-left", has_text="4 / 5").wait_for()  # counted once
    assert await page.locator(".receipt").count() == 1


async def test_the_voter_app_passes_axe_accessibility_checks(
        stack: Stack, edge_channel: grpc.aio.Channel, browser: Any) -> None:
    episode_id, _, _ = await open_round(stack, edge_channel)
    for lang in ("en", "km"):
        voter = await open_page(browser, f"{stack.edge_url}/vote#episode={episode_id}&lang={lang}"
                                         f"&token={token(stack, Role.VOTER, 'web-a11y')}",
                                width=390, height=844, mobile=True, bypass_csp=True)
        await voter.page.locator(".vote-button:enabled").first.wait_for()
        await voter.page.locator(".package").first.wait_for()
        # Nothing wider than the phone: a page that scrolls sideways hides its own buttons.
        assert await voter.page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        await voter.page.add_script_tag(content=AXE.read_text())
        result = await voter.page.evaluate(
            "axe.run(document, {runOnly: "
            "['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']})")
        problems = [f"{v['id']} ({v['impact']}): {v['help']} at "
                    f"{[n['target'] for n in v['nodes']][:3]}" for v in result["violations"]]
        assert problems == [], problems
        assert voter.errors == []


async def test_the_control_room_runs_a_whole_show_to_results_ready(
        stack: Stack, browser: Any) -> None:
    control = await open_page(browser, f"{stack.edge_url}/control#token="
                                       f"{token(stack, Role.OPERATOR, 'producer-web')}",
                              width=1600, height=1300)
    page = control.page

    async def submit(button: str, done: str) -> None:
        await page.locator(button).click()
        await page.locator("#log li.log-ok", has_text=done).first.wait_for(timeout=10_000)

    async def cue(button: str, done: str, confirm: bool) -> None:
        await page.locator(button).click()
        if confirm:
            await page.locator("#confirm-yes").click()
        await page.locator("#log li.log-ok", has_text=done).first.wait_for(timeout=10_000)

    await page.fill("#new-show-name", "X Factor Cambodia")
    await submit("#create-show", "created")
    await page.locator("#episode-form:visible").wait_for()
    await page.fill("#new-episode-title", "Live show 3")
    await submit("#create-episode", "Episode")
    for number, name in ((1, "Sophea Chan"), (2, "Dara Keo"), (3, "Srey Pich")):
        await page.fill("#new-contestant-name", name)
        await page.fill("#new-contestant-sms", str(number))
        await submit("#add-contestant", f"Contestant {number}")
    await page.fill("#new-round-name", "Final vote")
    await page.fill("#new-round-seconds", "4")
    await submit("#create-round", "Round")

    # An irreversible cue asks first; cancelling changes nothing.
    await page.locator("#start-show").click()
    await page.locator("#confirm-no").click()
    await page.locator("#show-state", has_text="SCHEDULED").wait_for(timeout=10_000)
    await cue("#start-show", "Show started", confirm=True)
    await page.locator("#show-state", has_text="LIVE").wait_for(timeout=10_000)
    await cue("#start-performance", "Performance started", confirm=False)
    await cue("#end-performance", "Performance ended", confirm=False)
    await page.fill("#open-seconds", "4")
    await cue("#open-voting", "Voting opened", confirm=True)
    await page.locator("#round-state", has_text="OPEN").wait_for(timeout=10_000)
    await cue("#extend-voting", "extended", confirm=False)  # by the default 60 s
    await page.screenshot(path=str(ARTIFACTS / "control-live.png"))
    await cue("#close-voting", "Voting closed", confirm=True)
    await page.locator("body[data-last-event=RESULTS_READY]").wait_for(timeout=60_000)
    await page.locator("#final", has_text="Final:").wait_for(timeout=10_000)
    await cue("#end-show", "Show ended", confirm=True)
    await page.locator("#show-state", has_text="ENDED").wait_for(timeout=10_000)
    await page.locator("#connection", has_text="show ended").wait_for(timeout=10_000)

    # Blocks: create and lift one.
    await page.select_option("#block-kind", "1")
    await page.fill("#block-value", "bot-user-17")
    await page.fill("#block-reason", "scripted votes")
    await page.locator("#block-form button").click()
    row = page.locator("#blocks tr", has_text="bot-user-17")
    await row.wait_for(timeout=10_000)
    await control.screenshot("control-room")
    await row.locator("button").click()
    await page.locator("#confirm-yes").click()
    await row.wait_for(state="detached", timeout=10_000)
    assert control.errors == []


async def test_the_control_room_works_the_fraud_review_queue(
        stack: Stack, edge_channel: grpc.aio.Channel, browser: Any, fraud: Fraud) -> None:
    """Two of a user's votes wait for review (a VPN from abroad); the producer rejects one and
    approves the other from the page."""
    user = _user()
    await _queue_reviews(fraud, user, 2, f"round-{user}")
    control = await open_page(browser, f"{stack.edge_url}/control#token="
                                       f"{token(stack, Role.OPERATOR, 'producer-web')}",
                              width=1600, height=1300)
    page = control.page
    # Other tests leave reviews pending too: the producer looks at this user's.
    await page.fill("#review-user", user)
    await page.locator("#review-filter button").click()
    rows = page.locator("#reviews tr", has_text=user)
    one_vote = str(fraud_review_service_pb2.REVIEW_SCOPE_VOTE)
    await rows.nth(1).wait_for(timeout=15_000)
    assert "vpn_proxy" in (await rows.first.text_content() or "")
    await control.screenshot("control-review-queue")
    await rows.first.locator("select").select_option(one_vote)
    await rows.first.locator("button", has_text="Reject").click()
    await page.locator("#log li.log-ok", has_text=f"Rejected review of {user}").wait_for()
    await page.locator("#reviews tr", has_text=user).nth(1).wait_for(state="detached")
    await rows.first.locator("select").select_option(one_vote)
    await rows.first.locator("button", has_text="Approve").click()
    await page.locator("#log li.log-ok", has_text=f"Approved review of {user}").wait_for()
    await rows.first.wait_for(state="detached")
    reviews = await fraud_review_service_pb2_grpc.FraudReviewServiceStub(edge_channel).ListReviews(
        fraud_review_service_pb2.ListReviewsRequest(user_id=user),
        metadata=bearer(stack.settings.state_dir, Role.OPERATOR, "producer"), timeout=10)
    assert sorted(r.state for r in reviews.reviews) == sorted(
        [fraud_types_pb2.REVIEW_STATE_REJECTED, fraud_types_pb2.REVIEW_STATE_APPROVED])
    assert {r.resolved_by for r in reviews.reviews} == {"producer-web"}
    assert control.errors == []
