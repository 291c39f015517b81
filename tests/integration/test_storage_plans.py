"""How each service's PostgreSQL pool plans its statements (runtime.storage.create_pool)."""

from __future__ import annotations

from typing import Any

from ops.stack import Stack
from runtime.config import ServiceConfig


async def test_vote_svc_plans_its_statements_once_and_other_services_per_execution(
        stack: Stack) -> None:
    """vote_svc's statements look rows up by key or insert them: a plan per execution was a
    third of PostgreSQL's CPU per vote. Other services keep PostgreSQL's default."""
    from runtime.storage import create_pool
    from vote_svc.config import VoteConfig

    assert VoteConfig.model_fields["database_generic_plans"].default is True
    assert ServiceConfig.model_fields["database_generic_plans"].default is False
    for generic, expected in ((True, "force_generic_plan"), (False, "auto")):
        pool = create_pool(stack.database_url, generic_plans=generic)
        await pool.open()
        try:
            async with pool.connection() as connection:
                row: Any = await (await connection.execute("SHOW plan_cache_mode")).fetchone()
            assert row["plan_cache_mode"] == expected
        finally:
            await pool.close()
