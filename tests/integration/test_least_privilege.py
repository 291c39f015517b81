"""Each service connects to PostgreSQL and Redis as itself, with only its grants (issue 21)."""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from ops.stack import SERVICES, Stack
from runtime.storage import create_redis, redis_target

#: Append-only tables: no service may change or empty them.
APPEND_ONLY = ("votes", "audit_log", "fraud_rejections", "vote_fraud_decisions",
               "round_results", "round_result_invalid_votes", "ledger_keys", "purchases",
               "purchase_refunds", "purchase_consumptions", "sms_messages", "sms_outcomes",
               "sms_deliveries")


def _as(stack: Stack, service: str) -> psycopg.Connection:
    return psycopg.connect(stack.service_urls[service]["DATABASE_URL"], autocommit=True)


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_can_delete_update_or_truncate_the_append_only_tables(
        stack: Stack, service: str) -> None:
    with _as(stack, service) as connection:
        for table in APPEND_ONLY:
            for statement in (f"DELETE FROM {table}", f"TRUNCATE {table}",
                              f"UPDATE {table} SET {_a_column(stack, table)} = NULL"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    connection.execute(statement)


def _a_column(stack: Stack, table: str) -> str:
    with psycopg.connect(stack.database_url) as connection:
        row = connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
            " AND is_identity = 'NO' ORDER BY ordinal_position LIMIT 1", (table,)).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_can_switch_the_append_only_triggers_off(stack: Stack, service: str) -> None:
    with _as(stack, service) as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("SET session_replication_role = replica")
        role = connection.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication"
            " FROM pg_roles WHERE rolname = current_user").fetchone()
        assert role == (False, False, False, False, False)


def test_a_service_reads_only_what_it_was_granted(stack: Stack) -> None:
    with _as(stack, "sync_svc") as connection:
        connection.execute("SELECT count(*) FROM rounds")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("SELECT count(*) FROM wallets")
    with _as(stack, "sms_svc") as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("SELECT count(*) FROM wallets")
    with _as(stack, "vote_svc") as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("CREATE TABLE intruder (x int)")


def test_service_passwords_are_scram(stack: Stack) -> None:
    with psycopg.connect(stack.database_url) as connection:
        if not connection.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
                                  ).fetchone()[0]:  # type: ignore[index]
            pytest.skip("pg_authid needs a superuser")
        for service in SERVICES:
            user = psycopg.conninfo.conninfo_to_dict(
                stack.service_urls[service]["DATABASE_URL"])["user"]
            hashed = connection.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                                        (user,)).fetchone()
            assert hashed is not None and str(hashed[0]).startswith("SCRAM-SHA-256$")


def test_our_postgresql_asks_everyone_for_a_password(stack: Stack) -> None:
    if stack.settings.database_url:
        pytest.skip("the PostgreSQL the tests were given is not ours to configure")
    info = psycopg.conninfo.conninfo_to_dict(stack.database_url)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host=info["host"], port=info["port"], dbname=info["dbname"],
                        user=info["user"], password="wrong", connect_timeout=5)


@pytest.mark.parametrize("service", SERVICES)
async def test_each_service_has_its_own_redis_user_without_admin_commands(
        stack: Stack, service: str) -> None:
    url = stack.service_urls[service]["REDIS_URL"]
    if url == stack.redis_url:
        pytest.skip("the Redis the tests were given does not let us create users")
    assert (urlsplit(url).username or "").startswith(f"tv_{service}_")
    # On a Redis Cluster every node, replicas too (ACL users are not replicated): the user
    # must still work after a failover.
    nodes = ([node.address for node in stack.redis_nodes.nodes] if stack.redis_nodes
             else [urlsplit(url).netloc.rsplit("@", 1)[1]])
    plain_url = redis_target(url)[0]
    for node in nodes:
        node_url = plain_url.replace(urlsplit(plain_url).netloc.rsplit("@", 1)[1], node)
        client = redis.Redis.from_url(node_url)
        try:
            assert client.ping()
            for refused in (("FLUSHALL",), ("CONFIG", "SET", "appendonly", "no"),
                            ("KEYS", "*"), ("ACL", "LIST"), ("DEBUG", "SLEEP", "0")):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.execute_command(*refused)
        finally:
            client.close()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(node_url.replace("@", "x@", 1)).ping()
    # It writes its keys (through a cluster client on a cluster).
    writer = create_redis(url)
    try:
        assert await writer.set(f"least-privilege-probe:{service}", "1", px=10_000)
    finally:
        await writer.aclose()
