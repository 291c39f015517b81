"""The files a carrier reconciles against, and the purge of subscribers' numbers.

`televote sms settlement --episode E [--carrier C]`: one CSV line per charged message of the
episode, per carrier, then the carrier's totals. A counted SMS vote that fraud review later
rejected (fraud_rejections, read as the final result reads it: the vote, or every vote of the
user in the round) is also a CREDIT line of the negative price, so the carrier refunds it.
Amounts are in the currency's units with six decimals (micros), so sums are exact.

`televote sms purge --before DATE`: removes the MSISDNs kept only to address replies; the
records keep the pseudonym.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from sms_svc.store import PURGE_MSISDNS, SETTLEMENT_CHARGES

COLUMNS = ("carrier", "line", "carrier_message_id", "message_id", "received_at", "answered_at",
           "subscriber", "contestant_number", "vote_id", "amount", "currency")



def _amount(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


async def settlement_csv(database_url: str, episode_id: str, carrier: str | None) -> str:
    """The settlement file of an episode (all carriers, or one)."""
    async with await psycopg.AsyncConnection.connect(database_url,
                                                     row_factory=dict_row) as connection:
        cursor = await connection.execute(SETTLEMENT_CHARGES,
                                          {"episode": episode_id, "carrier": carrier})
        rows: list[dict[str, Any]] = await cursor.fetchall()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    totals: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        lines = [("CHARGE", row["price_micros"])]
        if row["rejected"]:
            lines.append(("CREDIT", -row["price_micros"]))
        for line, micros in lines:
            writer.writerow([row["carrier"], line, row["carrier_message_id"], row["message_id"],
                             row["received_at"].isoformat(), row["answered_at"].isoformat(),
                             row["pseudonym"], row["contestant_number"], row["vote_id"],
                             _amount(micros), row["currency_code"]])
            total = totals.setdefault((row["carrier"], row["currency_code"]), [0, 0, 0])
            total[0 if line == "CHARGE" else 1] += 1
            total[2] += micros
    for (name, currency), (charges, credits, micros) in sorted(totals.items()):
        writer.writerow([name, "TOTAL", f"{charges} charged", f"{credits} credited", "", "", "",
                         "", "", _amount(micros), currency])
    return out.getvalue()


async def purge_msisdns(database_url: str, before: datetime) -> int:
    """Remove the subscribers' numbers of messages received before `before`."""
    async with await psycopg.AsyncConnection.connect(database_url) as connection:
        cursor = await connection.execute(PURGE_MSISDNS, (before,))
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])
