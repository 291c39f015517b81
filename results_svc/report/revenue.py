"""The report's money: store purchases by store and tier, premium SMS charged by carrier, and
refunds, each from its own records, each one query.

Store purchases and refunds come from vote_svc's records, premium SMS charges from sms_svc's.
A section whose records a build lacks says "not available" with a note, never zero (a zero
would tell sales that nothing was sold); wiring a section is giving it its query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from results_svc.report.store import Connection

USD = "USD"


@dataclass(frozen=True)
class Line:
    source: str
    tier: str
    transactions: int
    gross_micros: int


@dataclass
class Section:
    available: bool
    note: str = ""
    lines: list[Line] = field(default_factory=list)

    @property
    def total_micros(self) -> int:
        return sum(line.gross_micros for line in self.lines)


@dataclass
class Revenue:
    packages: Section
    sms: Section
    refunds: Section

    @property
    def sections(self) -> tuple[Section, ...]:
        return (self.packages, self.sms, self.refunds)

    @property
    def complete(self) -> bool:
        return all(section.available for section in self.sections)

    @property
    def gross_micros(self) -> int:
        return sum(section.total_micros for section in self.sections if section.available)


#: A purchase names no episode (a wallet's votes are for any): it is the episode's when one of
#: the episode's voters made it while the episode was live (from the show's start to its end,
#: or now), so shows running at the same time do not share their sales. The purchases of those
#: hours by `purchases_by_time` (migrations/0019; the hours are parameters, so the plan knows
#: how few purchases they hold), each buyer by the episode's voter rows' key (a live report's
#: voters the rollups have not reached yet are not among them).
_DURING = """
  FROM purchases p
 WHERE p.purchased_at >= %(from)s AND p.purchased_at < %(to)s AND p.currency_code = 'USD'
   AND EXISTS (SELECT 1 FROM report_episode_voters v
                WHERE v.episode_id = %(episode)s::uuid AND v.user_id = p.user_id)
"""

#: Each section's query over (episode), giving rows (source, tier, transactions,
#: gross_micros) in USD; None while its records are not part of this build.
PACKAGES_SQL: str | None = f"""
SELECT lower(p.store) AS source, p.package_id AS tier, count(*) AS transactions,
       sum(p.price_micros)::bigint AS gross_micros {_DURING}
 GROUP BY 1, 2 ORDER BY 1, 2
"""
#: Premium SMS charged (only a counted vote is charged), by carrier.
SMS_SQL: str | None = """
SELECT m.carrier AS source, '' AS tier, count(*) AS transactions,
       sum(o.price_micros)::bigint AS gross_micros
  FROM sms_outcomes o JOIN sms_messages m USING (message_id)
 WHERE o.episode_id = %(episode)s::uuid AND o.charged AND o.currency_code = 'USD'
 GROUP BY 1 ORDER BY 1
"""
#: Refunds of the episode's purchases (whenever refunded), as negative amounts.
REFUNDS_SQL: str | None = f"""
SELECT lower(p.store) AS source, p.package_id AS tier, count(*) AS transactions,
       -sum(p.price_micros)::bigint AS gross_micros {_DURING}
   AND EXISTS (SELECT 1 FROM purchase_refunds r WHERE r.purchase_id = p.purchase_id)
 GROUP BY 1, 2 ORDER BY 1, 2
"""

#: Why a section without a query says "not available" (none today).
_NOT_YET: dict[str, str] = {}


async def _section(connection: Connection, name: str, sql: str | None,
                   params: dict[str, Any]) -> Section:
    if sql is None:
        return Section(available=False, note=_NOT_YET.get(name, "not recorded in this build"))
    cursor = await connection.execute(sql, params, prepare=False)
    rows: list[Any] = await cursor.fetchall()
    return Section(available=True, lines=[
        Line(row["source"], row["tier"] or "", int(row["transactions"]),
             int(row["gross_micros"])) for row in rows])


#: The episode's live hours (none before it started).
LIVE_HOURS_SQL = """
SELECT coalesce(started_at, now()) AS "from",
       CASE WHEN started_at IS NULL THEN now() ELSE coalesce(ended_at, now()) END AS "to"
  FROM episodes WHERE episode_id = %s
"""


async def revenue(connection: Connection, episode_id: str) -> Revenue:
    cursor = await connection.execute(LIVE_HOURS_SQL, (episode_id,))
    hours: Any = await cursor.fetchone()
    params = {"episode": episode_id, "from": hours["from"], "to": hours["to"]}
    return Revenue(
        packages=await _section(connection, "packages", PACKAGES_SQL, params),
        sms=await _section(connection, "sms", SMS_SQL, params),
        refunds=await _section(connection, "refunds", REFUNDS_SQL, params))
