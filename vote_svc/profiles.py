"""Voters' self-declared profiles (VoteService.SetVoterProfile), read by the post-show report.

A profile only ever says what the voter told; an empty field is "not told". Nothing here is
inferred from votes, devices or places.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import FieldViolation, invalid_argument
from runtime.places import NAMES
from runtime.storage import Storage

AGE_BANDS = ("under-18", "18-24", "25-34", "35-44", "45-54", "55+")
GENDERS = ("female", "male", "other")
ABROAD = "abroad"


@dataclass(frozen=True)
class Profile:
    age_band: str = ""
    gender: str = ""
    province: str = ""


def validate(age_band: str, gender: str, province: str) -> Profile:
    """The profile, or INVALID_REQUEST naming every field outside its list."""
    violations = []
    if age_band and age_band not in AGE_BANDS:
        violations.append(FieldViolation("age_band", f"must be one of {', '.join(AGE_BANDS)}"))
    if gender and gender not in GENDERS:
        violations.append(FieldViolation("gender", f"must be one of {', '.join(GENDERS)}"))
    if province and province not in NAMES and province != ABROAD:
        violations.append(FieldViolation(
            "province", "must be a province of Cambodia as in ISO 3166-2:KH, or \"abroad\""))
    if violations:
        raise invalid_argument(*violations)
    return Profile(age_band, gender, province)


async def set_profile(storage: Storage, user_id: str, profile: Profile) -> Profile:
    """Replace the voter's profile (the same profile twice changes nothing)."""
    async with storage.pool.connection() as connection:
        await connection.execute(
            "INSERT INTO voter_profiles (user_id, age_band, gender, province)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (user_id) DO UPDATE"
            " SET age_band = excluded.age_band, gender = excluded.gender,"
            " province = excluded.province, updated_at = now()"
            " WHERE (voter_profiles.age_band, voter_profiles.gender, voter_profiles.province)"
            " IS DISTINCT FROM (excluded.age_band, excluded.gender, excluded.province)",
            (user_id, profile.age_band, profile.gender, profile.province))
    return profile
