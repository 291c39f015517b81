"""The audit log (`audit_log`, append-only): the one writer every service uses.

An entry says who (`actor_role`, `actor`) did what (`action`, dotted: `wallet.grant`,
`fraud.review.resolve`) to what (`target`), why (`reason`) and with which inputs (`details`,
JSON an auditor can replay the decision from). Write it in the transaction of the change it
describes, so the log holds exactly the changes that committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb


@dataclass(frozen=True)
class Entry:
    actor_role: str
    actor: str
    action: str
    target: str
    reason: str = ""
    details: Mapping[str, object] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        """The entry as `insert_sql` reads it from a JSON array."""
        return {"actor_role": self.actor_role, "actor": self.actor, "action": self.action,
                "target": self.target, "reason": self.reason, "details": dict(self.details)}


def insert_sql(entries: str) -> str:
    """An INSERT of the entries in the jsonb array expression `entries` (elements shaped as
    `Entry.as_json`), in array order; usable as a CTE of a larger statement so a batch's audit
    entries cost no extra round trip."""
    return ("INSERT INTO audit_log (actor_role, actor_subject, action, target, reason, details)"
            " SELECT e ->> 'actor_role', e ->> 'actor', e ->> 'action', e ->> 'target',"
            "        coalesce(e ->> 'reason', ''), coalesce(e -> 'details', '{}'::jsonb)"
            f" FROM jsonb_array_elements({entries}) WITH ORDINALITY AS x(e, n) ORDER BY n")


async def write(connection: AsyncConnection[Any], entries: Sequence[Entry]) -> list[int]:
    """Append `entries` (one statement); returns their audit ids in order."""
    if not entries:
        return []
    cursor = await connection.execute(
        insert_sql("%s::jsonb") + " RETURNING audit_id",
        (Jsonb([entry.as_json() for entry in entries]),))
    rows: list[Any] = await cursor.fetchall()
    # Identity values are drawn in insertion order, which is array order.
    return sorted(int(row["audit_id"] if isinstance(row, Mapping) else row[0]) for row in rows)
