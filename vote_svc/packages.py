"""The vote package catalogue, read from PostgreSQL (migrations seed the defaults)."""

from __future__ import annotations

from typing import Any

from runtime.storage import Storage
from televote.vote.v1 import vote_service_pb2, vote_types_pb2


async def list_packages(storage: Storage) -> list[vote_service_pb2.VotePackage]:
    """The packages on sale, cheapest first."""
    async with storage.pool.connection() as connection:
        cursor = await connection.execute(
            "SELECT package_id, display_name, votes, bonus_votes, price_micros, currency_code,"
            "       apple_product_id, google_product_id"
            "  FROM vote_packages WHERE active ORDER BY price_micros, sort_order")
        rows: list[dict[str, Any]] = await cursor.fetchall()
    return [
        vote_service_pb2.VotePackage(
            package_id=row["package_id"], display_name=row["display_name"],
            votes=row["votes"], bonus_votes=row["bonus_votes"],
            total_votes=row["votes"] + row["bonus_votes"],
            price=vote_types_pb2.Money(currency_code=row["currency_code"].strip(),
                                       amount_micros=row["price_micros"]),
            apple_product_id=row["apple_product_id"],
            google_product_id=row["google_product_id"])
        for row in rows
    ]
