"""`televote report`: the HTML page, opened in Debian's chromium, draws every chart without a
console error; the CSVs and the JSON say what the API says."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from ops import report as episode_report
from ops import tokens
from ops.stack import Stack
from runtime.access import Role
from tests.support_windows import TestRound, open_test_round
from tests.vote_support import WEB, new_id, query, stub, vote_request, voter

#: Debian's chromium: /usr/bin/chromium is a shell wrapper, Playwright needs the binary.
CHROMIUM = Path("/usr/lib/chromium/chromium")
#: Root cannot use chromium's sandbox; and nothing in the page needs the network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage",
                 "--disable-gpu", "--disable-extensions", "--no-first-run"]

PLACES = {"Phnom Penh": (11.5564, 104.9282), "Siem Reap": (13.3633, 103.8564),
          "Battambang": (13.0957, 103.2022)}


def _open_in_chromium(page_path: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: apt-get install chromium (scripts/install --test)")
    messages: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda error: messages.append(f"pageerror: {error}"))
            page.on("requestfailed", lambda r: messages.append(f"request failed: {r.url}"))
            page.goto(page_path.as_uri())
            charts = page.evaluate("""() => [...document.querySelectorAll('.chart')].map(c => {
                const svg = c.querySelector('svg');
                const box = svg ? svg.getBoundingClientRect() : null;
                return {id: c.id, width: box ? box.width : 0, height: box ? box.height : 0,
                        shapes: svg ? svg.querySelectorAll('path, rect, use').length : 0};
            })""")
            requests = page.evaluate(
                "() => performance.getEntriesByType('resource').map(e => e.name)")
        finally:
            browser.close()
    return {"messages": messages, "charts": charts, "requests": requests}


async def _episode(stack: Stack, channel: grpc.aio.Channel) -> TestRound:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    await query(stack.database_url,
                "INSERT INTO performances (performance_id, episode_id, contestant_id, started_at)"
                " VALUES (%s, %s, %s, now() - interval '2 seconds') RETURNING 1", new_id(),
                test_round.episode_id, test_round.contestants[1])
    prefix = new_id()[:8]
    for number, (province, point) in enumerate(PLACES.items()):
        for n in range(3):
            user = f"{prefix}-{province.replace(' ', '-')}-{n}"
            request = vote_request(test_round, contestant=number, count=n + 1,
                                   channel=WEB if n == 2 else 1)
            request.client.location.latitude, request.client.location.longitude = point
            await stub(channel).SetVoterProfile(
                _profile(province, n), metadata=voter(stack, user), timeout=15)
            await stub(channel).SubmitVote(request, metadata=voter(stack, user), timeout=15)
    return test_round


def _profile(province: str, n: int) -> Any:
    from televote.vote.v1 import vote_service_pb2
    return vote_service_pb2.SetVoterProfileRequest(
        age_band=("18-24", "25-34", "35-44")[n], gender=("female", "male", "female")[n],
        province=province)


async def _report(stack: Stack, episode_id: str, out: Path) -> Any:
    """`televote report` as the README shows it, against the test stack's edge."""
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "televote"), "report", episode_id, "--out", str(out),
        "--edge", stack.edge_url, "--state-dir", str(stack.settings.state_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()
    assert b"report, 16 files" in output, output.decode()
    operator = tokens.mint(stack.settings.state_dir, Role.OPERATOR, "producer")
    return await asyncio.to_thread(episode_report.fetch, stack.edge_url, operator, episode_id)


async def test_the_report_page_draws_every_chart_in_chromium(
        stack: Stack, edge_channel: grpc.aio.Channel, tmp_path: Path) -> None:
    test_round = await _episode(stack, edge_channel)
    answer = await _report(stack, test_round.episode_id, tmp_path)
    assert answer.summary.counted_votes == 18 and answer.summary.unique_voters == 9
    seen = await asyncio.to_thread(_open_in_chromium, tmp_path / "report.html")
    assert seen["messages"] == []
    assert [c["id"] for c in seen["charts"]] == [f"chart-{name}"
                                                 for name, _ in episode_report.CHARTS]
    for chart in seen["charts"]:
        assert chart["width"] > 100 and chart["height"] > 100 and chart["shapes"] > 0, chart
    assert all(url.startswith("file:") for url in seen["requests"])  # self-contained

    page = (tmp_path / "report.html").read_text()
    assert "Provisional" in page and "Phnom Penh" in page
    assert json.loads((tmp_path / "report.json").read_text())["summary"]["countedVotes"] == "18"
    with (tmp_path / "geography.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["province"], r["votes"], r["voters"]) for r in rows} == {
        ("Phnom Penh", "6", "3"), ("Siem Reap", "6", "3"), ("Battambang", "6", "3")}
    names = set(await asyncio.to_thread(os.listdir, tmp_path))
    assert {f"{t.name}.csv" for t in episode_report.tables(answer)} | {
        "report.html", "report.json"} == names


async def test_an_empty_episode_still_renders_every_chart(
        stack: Stack, edge_channel: grpc.aio.Channel, tmp_path: Path) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    await _report(stack, test_round.episode_id, tmp_path)
    seen = await asyncio.to_thread(_open_in_chromium, tmp_path / "report.html")
    assert seen["messages"] == []
    assert len(seen["charts"]) == len(episode_report.CHARTS)
    assert all(chart["width"] > 100 for chart in seen["charts"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium on PATH")
def test_chromium_is_the_debian_wrapper_around_the_real_binary() -> None:
    """Why the tests launch /usr/lib/chromium/chromium: /usr/bin/chromium is a script."""
    wrapper = Path(shutil.which("chromium") or "")
    assert CHROMIUM.exists() and wrapper.read_bytes()[:2] == b"#!"
