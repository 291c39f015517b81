"""`televote report EPISODE --out DIR`: the post-show report as one self-contained HTML page
(charts drawn by matplotlib, inlined as SVG), a CSV per table and the JSON.

It asks the edge for ReportService.GetEpisodeReport as an operator (JSON transcoding), so
what it prints is exactly what the API answers: aggregates only, small buckets already
merged into "other" by results_svc.
"""

from __future__ import annotations

import csv
import html
import io
import json
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from televote.results.v1 import report_service_pb2 as pb
from televote.vote.v1 import vote_types_pb2 as vtypes


def fetch(edge_url: str, token: str, episode_id: str, timeout: float = 120
          ) -> pb.GetEpisodeReportResponse:
    if "://" not in edge_url:  # "127.0.0.1:8080", as curl takes it
        edge_url = f"http://{edge_url}"
    request = urllib.request.Request(
        f"{edge_url.rstrip('/')}/v1/episodes/{episode_id}/report",
        headers={"authorization": f"Bearer {token}", "accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json_format.Parse(body, pb.GetEpisodeReportResponse(), ignore_unknown_fields=True)


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]


def _time(stamp: Any) -> str:
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S") if stamp.seconds else ""


def _usd(money: vtypes.Money) -> str:
    return f"{money.amount_micros / 1_000_000:.2f}"


def _enum(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def tables(report: pb.GetEpisodeReportResponse) -> list[Table]:
    """Every table of the report, as the CSV files and the HTML page show them."""
    s = report.summary
    summary = Table("summary", "Summary", ("figure", "votes", "voters", "percent"), [
        ("ledger votes", s.ledger_votes, "", ""),
        ("counted votes", s.counted_votes, s.unique_voters, 100.0 if s.counted_votes else ""),
        ("invalidated votes", s.invalidated_votes, "", ""),
        *[(name, c.votes, c.voters, c.percentage)
          for name, c in (("free votes", s.free), ("paid votes", s.paid),
                          ("premium SMS votes", s.sms), ("app votes", s.app),
                          ("web votes", s.web))]])
    invalid = Table("invalidated", "Votes not counted, by reason", ("reason", "votes"),
                    [(r.reason, r.votes) for r in s.invalidated_by_reason])
    timeline = Table("timeline", "Votes per minute", (
        "minute (UTC)", "round", "channel", "vote type", "votes", "voters"), [
        (_time(b.start_time), b.round_id, _enum(b.channel, vtypes.Channel, "CHANNEL_"),
         _enum(b.vote_type, vtypes.VoteType, "VOTE_TYPE_"), b.votes, b.voters)
        for b in report.timeline])
    peaks = Table("peaks", "Busiest minutes", ("minute (UTC)", "votes"),
                  [(_time(p.start_time), p.votes) for p in report.peaks])
    moments = Table("moments", "The show's moments", ("time (UTC)", "moment", "what"),
                    [(_time(m.time), m.kind, m.label) for m in report.moments])
    rounds = Table("rounds", "Rounds and contestants", (
        "round", "state", "contestant", "votes", "voters", "percent of round", "winner"), [
        row for r in report.rounds for row in (
            [(r.name, r.state, "(all)", r.votes, r.voters, 100.0 if r.votes else "", "")] + [
                (r.name, r.state, c.name, c.votes, c.voters, c.percentage,
                 "yes" if c.contestant_id in r.winner_contestant_ids else "")
                for c in r.contestants])])
    geography = Table("geography", "Where the votes came from", (
        "country", "province", "votes", "voters"),
        [(g.country_code, g.province, g.votes, g.voters) for g in report.geography])
    demographics = Table("demographics", "Audience (self-declared profiles)", (
        "dimension", "value", "votes", "voters"),
        [(d.dimension, d.value, d.votes, d.voters) for d in report.demographics])
    r = report.revenue
    revenue = Table("revenue", "Revenue (gross, USD)", (
        "section", "source", "tier", "transactions", "gross USD", "note"), [
        row for name, section in (("vote packages", r.packages), ("premium SMS", r.sms),
                                  ("refunds", r.refunds))
        for row in ([(name, line.source, line.tier, line.transactions, _usd(line.gross), "")
                     for line in section.lines] if section.available else
                    [(name, "", "", "", "not available", section.note)])] + [
        ("total", "", "", "", _usd(r.gross),
         "" if r.complete else "not every section is available")])
    e = report.engagement
    engagement = Table("engagement", "Engagement", ("figure", "value"), [
        ("peak votes per minute", e.peak_votes_per_minute),
        ("peak minute (UTC)", _time(e.peak_minute)),
        ("votes per voter", e.votes_per_voter),
        ("voters in more than one round (%)", e.multi_round_voter_percentage),
        ("voters who used all their free votes (%)", e.used_all_free_percentage),
        ("free voters who also paid (%)", e.free_to_paid_percentage),
        ("returning voters", e.returning_voters),
        ("returning voters (%)", e.returning_voter_percentage),
        ("peak concurrent viewers", e.peak_concurrent_viewers),
        ("peak viewers minute (UTC)", _time(e.peak_viewers_minute))])
    distribution = Table("votes_per_voter", "Voters by votes cast", ("votes cast", "voters"),
                         [(b.label, b.voters) for b in e.votes_per_voter_distribution])
    performances = Table("performances", "From a performance to its first vote", (
        "contestant", "performance started (UTC)", "first vote after (s)"), [
        (p.name, _time(p.started_at),
         f"{p.first_vote_after.ToMilliseconds() / 1000:.1f}"
         if p.HasField("first_vote_after") else "no vote")
        for p in e.performances])
    f = report.fraud
    fraud = Table("fraud", "Fraud controls", ("figure", "value"), [
        ("votes blocked at admission", f.blocked), ("votes sent to review", f.reviewed),
        ("reviews pending", f.pending), ("reviews approved", f.approved),
        ("reviews rejected", f.rejected), ("ledger votes not counted (fraud)", f.rejected_votes)])
    signals = Table("fraud_signals", "Fraud decisions by signal", (
        "signal", "blocked", "reviewed", "rejected"),
        [(x.signal, x.blocked, x.reviewed, x.rejected) for x in f.by_signal])
    return [summary, invalid, timeline, peaks, moments, rounds, geography, demographics,
            revenue, engagement, distribution, performances, fraud, signals]


# -- charts ------------------------------------------------------------------------------

def _svg(figure: Any) -> str:
    import matplotlib.pyplot as plt
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float = 9, height: float = 3.6) -> tuple[Any, Any]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "svg.hashsalt": "televote"})
    return plt.subplots(figsize=(width, height))


def _empty(axes: Any, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes,
              color="#666")
    axes.set_xticks([])
    axes.set_yticks([])


def chart_timeline(report: pb.GetEpisodeReportResponse) -> str:
    import matplotlib.dates as mdates
    figure, axes = _figure(10, 4)
    by_channel: dict[str, dict[datetime, int]] = defaultdict(lambda: defaultdict(int))
    for b in report.timeline:
        minute = b.start_time.ToDatetime(tzinfo=UTC)
        by_channel[_enum(b.channel, vtypes.Channel, "CHANNEL_")][minute] += b.votes
    minutes = sorted({m for counts in by_channel.values() for m in counts})
    if not minutes:
        _empty(axes, "no counted votes yet")
    else:
        bottom = [0] * len(minutes)
        colours = {"APP": "#1f77b4", "WEB": "#2ca02c", "SMS": "#ff7f0e"}
        width = 1 / 1440 * 0.9  # a minute, in days
        for channel in ("APP", "WEB", "SMS"):
            counts = [by_channel[channel].get(m, 0) for m in minutes]
            if any(counts):
                axes.bar(minutes, counts, width=width, bottom=bottom, label=channel,
                         color=colours[channel], align="edge")
                bottom = [a + b for a, b in zip(bottom, counts, strict=True)]
        styles = {"PERFORMANCE_START": ("#9467bd", ":"), "PERFORMANCE_END": ("#9467bd", ":"),
                  "VOTING_OPEN": ("#2ca02c", "--"), "VOTING_WARNING": ("#d62728", ":"),
                  "VOTING_CLOSE": ("#d62728", "--")}
        top = max(bottom) or 1
        for m in report.moments:
            colour, style = styles.get(m.kind, ("#666", ":"))
            moment = m.time.ToDatetime(tzinfo=UTC)
            axes.axvline(moment, color=colour, linestyle=style, linewidth=1)
            axes.text(moment, top, f" {m.kind.replace('_', ' ').lower()}: {m.label}",
                      rotation=90, va="top", fontsize=7, color=colour)
        axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))  # type: ignore[no-untyped-call]
        axes.set_ylabel("counted votes per minute")
        axes.legend(loc="upper left")
    axes.set_title("Votes per minute, with the show's moments (UTC)")
    return _svg(figure)


_COLOURS = {"free": "#1f77b4", "paid": "#9467bd", "premium SMS": "#ff7f0e", "app": "#1f77b4",
            "web": "#2ca02c", "SMS": "#ff7f0e"}


def chart_split(report: pb.GetEpisodeReportResponse) -> str:
    import matplotlib.pyplot as plt
    _figure()  # the shared style
    plt.close("all")
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    s = report.summary
    for axes, title, parts in (
            (left, "By vote type", (("free", s.free.votes), ("paid", s.paid.votes),
                                    ("premium SMS", s.sms.votes))),
            (right, "By channel", (("app", s.app.votes), ("web", s.web.votes),
                                   ("SMS", s.sms.votes)))):
        shown = [(label, n) for label, n in parts if n > 0]
        if shown:
            axes.pie([n for _, n in shown], labels=[f"{label}\n{n:,}" for label, n in shown],
                     colors=[_COLOURS[label] for label, _ in shown], autopct="%1.1f%%",
                     startangle=90, counterclock=False)
        else:
            _empty(axes, "no counted votes yet")
        axes.set_title(title)
    return _svg(figure)


def _barh(title: str, labels: list[str], values: list[int], xlabel: str,
          empty: str = "no data") -> str:
    figure, axes = _figure(9, max(2.2, 0.32 * len(labels) + 1))
    if labels:
        axes.barh(labels[::-1], values[::-1], color="#1f77b4")
        for y, value in enumerate(values[::-1]):
            axes.text(value, y, f" {value:,}", va="center", fontsize=8)
        axes.set_xlabel(xlabel)
    else:
        _empty(axes, empty)
    axes.set_title(title)
    return _svg(figure)


def chart_geography(report: pb.GetEpisodeReportResponse) -> str:
    labels = [f"{g.province} ({g.country_code})" if g.province else g.country_code
              for g in report.geography]
    return _barh("Where the votes came from (provinces of Cambodia, countries abroad)", labels,
                 [g.votes for g in report.geography], "counted votes")


def chart_rounds(report: pb.GetEpisodeReportResponse) -> str:
    labels, values = [], []
    for r in report.rounds:
        for c in r.contestants:
            labels.append(f"{r.name}: {c.name}")
            values.append(c.votes)
    return _barh("Counted votes per round and contestant", labels, values, "counted votes")


def chart_revenue(report: pb.GetEpisodeReportResponse) -> str:
    figure, axes = _figure(9, 3)
    r = report.revenue
    names = ["vote packages", "premium SMS", "refunds"]
    sections = [r.packages, r.sms, r.refunds]
    values = [s.total.amount_micros / 1_000_000 if s.available else 0.0 for s in sections]
    axes.bar(names, values, color=["#1f77b4" if s.available else "#ddd" for s in sections])
    for x, (section, value) in enumerate(zip(sections, values, strict=True)):
        axes.text(x, value, f"{value:,.2f} USD" if section.available else "not available",
                  ha="center", va="bottom", fontsize=8)
    axes.set_ylabel("gross USD")
    axes.set_title(f"Revenue: {r.gross.amount_micros / 1_000_000:,.2f} USD gross"
                   + ("" if r.complete else " (not every source available)"))
    return _svg(figure)


def chart_demographics(report: pb.GetEpisodeReportResponse) -> str:
    import matplotlib.pyplot as plt
    _figure()
    plt.close("all")
    dimensions = ("age_band", "gender", "province")
    figure, axes_list = plt.subplots(1, 3, figsize=(11, 3.4))
    for axes, dimension in zip(axes_list, dimensions, strict=True):
        rows = [d for d in report.demographics if d.dimension == dimension]
        if rows:
            axes.bar([d.value for d in rows], [d.voters for d in rows], color="#17becf")
            axes.tick_params(axis="x", labelrotation=45)
        else:
            _empty(axes, "no voters")
        axes.set_title(f"Voters by {dimension.replace('_', ' ')}")
    return _svg(figure)


def chart_distribution(report: pb.GetEpisodeReportResponse) -> str:
    rows = list(report.engagement.votes_per_voter_distribution)
    return _barh("Voters by counted votes cast", [b.label for b in rows],
                 [b.voters for b in rows], "voters")


CHARTS = (("timeline", chart_timeline), ("split", chart_split), ("rounds", chart_rounds),
          ("geography", chart_geography), ("demographics", chart_demographics),
          ("distribution", chart_distribution), ("revenue", chart_revenue))


# -- output ------------------------------------------------------------------------------

def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in table.rows) or \
        f"<tr><td colspan='{len(table.header)}'>none</td></tr>"
    return (f"<h2>{html.escape(table.title)}</h2><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:left}th{background:#f3f3f3}.chart svg{max-width:100%;
height:auto}.provisional{background:#fff3cd;padding:.5em 1em;border:1px solid #e0c97f}
"""


def render_html(report: pb.GetEpisodeReportResponse, all_tables: Iterable[Table]) -> str:
    title = f"{report.show_name} — {report.title}: the episode in numbers"
    status = ("<p>Final report.</p>" if report.is_final else
              "<p class='provisional'>Provisional: the episode is live or a round is not "
              "finalized yet; figures will change.</p>")
    charts = "".join(f"<div class='chart' id='chart-{name}'>{draw(report)}</div>"
                     for name, draw in CHARTS)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{status}"
            f"<p>Generated {html.escape(_time(report.generated_at))} UTC. Aggregates only: "
            f"groups of fewer than {report.privacy_min_voters} voters are merged into "
            f"&ldquo;other&rdquo;.</p>{charts}"
            + "".join(_html_table(t) for t in all_tables) + "</body></html>")


def write(report: pb.GetEpisodeReportResponse, out: Path) -> list[Path]:
    """report.html, report.json and one CSV per table, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    all_tables = tables(report)
    written = []
    for table in all_tables:
        path = out / f"{table.name}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(table.header)
            writer.writerows(table.rows)
        written.append(path)
    path = out / "report.json"
    path.write_text(json.dumps(json_format.MessageToDict(report), indent=2, ensure_ascii=False)
                    + "\n", encoding="utf-8")
    written.append(path)
    path = out / "report.html"
    path.write_text(render_html(report, all_tables), encoding="utf-8")
    written.append(path)
    return written
