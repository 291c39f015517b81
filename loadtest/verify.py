"""After a run: is every vote the simulator saw acknowledged in the ledger exactly once, does
every refusal carry a reason the scenario allows (and the ledger agrees with), does the final
result equal a recount, and do the balances and quotas hold?

Everything is read from PostgreSQL, the system of record, through one connection the caller
gives (so a test can damage the ledger inside a transaction and roll it back). The recount is
independent of results_svc's SQL: ledger rows are read here and counted with the round's
rules in plain Python (`results_svc.rules`, the module auditors run), and the result is also
compared with what the voters were told (their acknowledged votes).

An answer the client could not interpret (ERROR: a deadline, a reset, UNAVAILABLE) leaves the
vote's fate open; such a vote may be in the ledger or not, and the balance checks allow for
it. A vote that was acknowledged or refused has exactly one allowed fate.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection

from loadtest.driver import Attempt
from loadtest.funding import Funding
from loadtest.plan import FREE, PAID, SMS, Plan, Shot, sms_sender
from loadtest.show import Round
from loadtest.transports import ERROR, OK, REFUSED
from results_svc import rules
from results_svc.final import read_final
from results_svc.rounds import load_round
from sms_svc.inbound import REQUEST_ID_NAMESPACE
from sms_svc.parsing import pseudonym

_ROWS_SQL = """
SELECT v.vote_id::text, v.user_id, v.request_id, v.contestant_id::text, v.vote_type, v.count,
       v.channel, v.admitted_ms, v.received_ms, v.receipt_hash,
       EXISTS (SELECT 1 FROM fraud_rejections f
                WHERE f.round_id = v.round_id::text AND f.user_id = v.user_id
                  AND (f.vote_ref IS NULL OR f.vote_ref = v.request_id)) AS fraud_rejected
  FROM votes v WHERE v.round_id = %s
"""
_CONTEXT_SQL = """
SELECT v.vote_id::text, v.user_id, v.vote_type, v.count, v.admitted_ms, v.receipt_hash,
       v.episode_id = %(episode)s::uuid AS same_episode
  FROM votes v
 WHERE v.user_id = ANY(%(users)s::text[]) AND v.round_id <> %(round)s::uuid
"""


@dataclass
class RunRecord:
    """What the simulator did and saw: enough to verify the run afterwards."""

    plan: Plan
    voting_round: Round
    attempts: list[Attempt]
    rate_limit_per_minute: int = 100
    #: Allowance between the simulator's clock and the server's (same host: small).
    clock_tolerance_s: float = 0.5
    #: sms_svc's pseudonym key: an SMS voter's ledger user is "sms:" + its pseudonym.
    msisdn_secret: bytes = b""
    #: The packages paid voters bought (and which were refunded); None: operator grants.
    funding: Funding | None = None

    def credited(self, user: str) -> int:
        """The paid votes the simulator gave the user."""
        if self.funding is None:
            return self.plan.grants.get(user, 0)
        return self.funding.credited()[user]

    def clawed(self, user: str) -> int:
        return 0 if self.funding is None else self.funding.clawed()[user]


@dataclass
class Verdict:
    failures: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, what: str, examples: list[str] | None = None) -> None:
        if examples:
            what += ": " + ", ".join(examples[:5]) + (" ..." if len(examples) > 5 else "")
        self.failures.append(what)


@dataclass
class _ShotFate:
    """Every attempt of one shot, boiled down."""

    vote_ids: set[str] = field(default_factory=set)
    refusals: list[Attempt] = field(default_factory=list)
    mismatches: list[Attempt] = field(default_factory=list)
    errors: int = 0


async def verify(connection: AsyncConnection[Any], record: RunRecord) -> Verdict:
    """Check a finished run against the ledger. `connection` must use dict rows."""
    verdict = Verdict()
    shots = record.plan.shots
    fates = _fates(record.attempts)
    round_id = record.voting_round.round_id
    cursor = await connection.execute(_ROWS_SQL, (round_id,))
    rows: list[dict[str, Any]] = await cursor.fetchall()
    sms_records = await _sms_records(connection, record)
    _check_answers(verdict, shots, fates)
    _check_ledger(verdict, shots, fates, rows, record.msisdn_secret, {
        r["vote_id"] for r in sms_records if r["outcome"] == "COUNTED"}
        if record.plan.config.sms_via == "kannel" else set())
    _check_sms(verdict, record, fates, rows, sms_records)
    balances = await _balances(connection, record)
    _check_refusals(verdict, record, fates, balances)
    _check_balances(verdict, record, fates, balances, rows)
    if record.funding is not None:
        await _check_purchases(verdict, connection, record.funding)
    await _check_result(verdict, connection, record, rows)
    return verdict


async def ledger_check(connection: AsyncConnection[Any], round_id: str,
                       acknowledged: list[str]) -> tuple[list[str], list[str], int]:
    """(missing, doubled, rows): acknowledged vote ids absent from the round's ledger, those
    in it more than once, and its row count. The quick check for benchmarks (bench/)."""
    cursor = await connection.execute("SELECT vote_id::text FROM votes WHERE round_id = %s",
                                      (round_id,))
    rows = Counter(row[0] if isinstance(row, tuple) else row["vote_id"]
                   for row in await cursor.fetchall())
    return ([v for v in acknowledged if rows[v] == 0], [v for v in acknowledged if rows[v] > 1],
            sum(rows.values()))


def _fates(attempts: list[Attempt]) -> dict[int, _ShotFate]:
    fates: dict[int, _ShotFate] = defaultdict(_ShotFate)
    for attempt in attempts:
        fate = fates[attempt.shot]
        if attempt.mismatch:
            fate.mismatches.append(attempt)
        elif attempt.outcome == OK:
            # An SMS through Kannel is answered by its reply, which names no vote.
            if attempt.vote_id:
                fate.vote_ids.add(attempt.vote_id)
        elif attempt.outcome == REFUSED:
            fate.refusals.append(attempt)
        else:
            fate.errors += 1
    return fates


#: Refusals that say nothing against a request another attempt got acknowledged: its reuse
#: with another contestant, and a replica shedding load, which refuses before it looks at
#: the request (nothing recorded, retry: seen when a Redis Cluster failover slows vote_svc).
_NOT_A_VERDICT = frozenset({"IDEMPOTENCY_MISMATCH", "OVERLOADED"})


def _check_answers(verdict: Verdict, shots: list[Shot], fates: dict[int, _ShotFate]) -> None:
    """Retries and duplicates of one request must all name the same vote."""
    split = [shots[i].request_id for i, fate in fates.items() if len(fate.vote_ids) > 1]
    if split:
        verdict.fail(f"{len(split)} requests acknowledged with different vote ids", split)
    accepted_mismatch = [shots[i].request_id for i, fate in fates.items()
                         if any(a.outcome == OK for a in fate.mismatches)]
    if accepted_mismatch:
        verdict.fail(f"{len(accepted_mismatch)} reused request ids with another contestant "
                     "were accepted instead of IDEMPOTENCY_MISMATCH", accepted_mismatch)
    both = [shots[i].request_id for i, fate in fates.items()
            if fate.vote_ids and any(a.reason not in _NOT_A_VERDICT for a in fate.refusals)]
    if both:
        verdict.fail(f"{len(both)} requests both acknowledged and refused", both)


def ledger_key(shot: Shot, msisdn_secret: bytes) -> tuple[str, str]:
    """(user id, request id) of a shot's vote in the ledger: an SMS voter's is the keyed
    pseudonym of the number and the request id sms_svc derives from the carrier message id."""
    if shot.path != SMS:
        return shot.user, shot.request_id
    carrier, msisdn = sms_sender(shot.user)
    return ("sms:" + pseudonym(msisdn_secret, msisdn),
            str(uuid.uuid5(REQUEST_ID_NAMESPACE, f"{carrier}:{shot.request_id}")))


def _check_ledger(verdict: Verdict, shots: list[Shot], fates: dict[int, _ShotFate],
                  rows: list[dict[str, Any]], msisdn_secret: bytes,
                  sms_counted: set[str]) -> None:
    """`sms_counted`: the votes of the SMS records of messages sent through Kannel, whose ids
    (Kannel's) the plan does not know."""
    rows_per_vote = Counter(row["vote_id"] for row in rows)
    acknowledged = {vote_id: index for index, fate in fates.items()
                    for vote_id in fate.vote_ids}
    missing = [v for v in acknowledged if rows_per_vote[v] == 0]
    doubled = [v for v in acknowledged if rows_per_vote[v] > 1]
    if missing:
        verdict.fail(f"{len(missing)} acknowledged votes missing from the ledger", missing)
    if doubled:
        verdict.fail(f"{len(doubled)} acknowledged votes in the ledger more than once", doubled)
    by_request = {ledger_key(shot, msisdn_secret): index for index, shot in enumerate(shots)}
    unexplained, recorded_after_error, wrong = [], 0, []
    for row in rows:
        index = by_request.get((row["user_id"], row["request_id"]))
        fate = fates.get(index) if index is not None else None
        if fate is not None and row["vote_id"] in fate.vote_ids:
            shot = shots[index] if index is not None else None
            if shot is not None and (row["vote_type"] != shot.vote_type or row["count"] != 1):
                wrong.append(row["vote_id"])
        elif fate is not None and fate.errors and not fate.vote_ids:
            recorded_after_error += 1
        elif index is None and row["vote_id"] in sms_counted:
            continue
        else:
            unexplained.append(f"{row['vote_id']} ({row['user_id']}/{row['request_id']})")
    if unexplained:
        verdict.fail(f"{len(unexplained)} ledger rows that no client saw acknowledged",
                     unexplained)
    if wrong:
        verdict.fail(f"{len(wrong)} ledger rows differ from the vote sent", wrong)
    verdict.facts.update(acknowledged=len(acknowledged), ledger_rows=len(rows),
                         recorded_after_client_error=recorded_after_error)


_SMS_COLUMNS = """
SELECT carrier, carrier_message_id, outcome, charged, vote_id::text AS vote_id, pseudonym,
       (extract(epoch FROM received_at)) AS received_s
  FROM sms_records"""


async def _sms_records(connection: AsyncConnection[Any],
                       record: RunRecord) -> list[dict[str, Any]]:
    """The run's SMS records: by the carrier message ids the driver sent; through Kannel
    (which names the messages itself), those of the run's senders since voting opened."""
    shots = [shot for shot in record.plan.shots if shot.path == SMS]
    if not shots:
        return []
    if record.plan.config.sms_via != "kannel":
        cursor = await connection.execute(
            _SMS_COLUMNS + " WHERE carrier_message_id = ANY(%s)",
            ([shot.request_id for shot in shots],))
    else:
        cursor = await connection.execute(
            _SMS_COLUMNS + " WHERE pseudonym = ANY(%s) AND received_at >= to_timestamp(%s)",
            (sorted({_sms_pseudonym(shot, record.msisdn_secret) for shot in shots}),
             record.voting_round.opens_at - record.clock_tolerance_s))
    return list(await cursor.fetchall())


def _sms_pseudonym(shot: Shot, msisdn_secret: bytes) -> str:
    return pseudonym(msisdn_secret, sms_sender(shot.user)[1])


def _check_sms(verdict: Verdict, record: RunRecord, fates: dict[int, _ShotFate],
               rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """Premium SMS: each message counted at most once, charged exactly when counted (and as
    its carrier was told), none charged after the close."""
    shots = record.plan.shots
    sms = {shot.request_id: index for index, shot in enumerate(shots) if shot.path == SMS}
    if not sms:
        verdict.facts.update(sms_messages=0, sms_charged=0)
        return
    in_ledger = {row["vote_id"] for row in rows}
    problems: dict[str, list[str]] = defaultdict(list)
    per_message = Counter((r["carrier"], r["carrier_message_id"]) for r in records)
    problems["SMS recorded more than once"] += [f"{c}/{m}" for (c, m), n in per_message.items()
                                                if n > 1]
    charges = Counter(r["vote_id"] for r in records if r["charged"])
    problems["SMS votes charged more than once"] += [v for v, n in charges.items() if n > 1]
    close = record.voting_round.closes_at + record.clock_tolerance_s
    for row in records:
        counted = row["outcome"] == "COUNTED"
        if row["charged"] != counted:
            problems["SMS charged other than counted"].append(row["carrier_message_id"])
        if counted and row["vote_id"] not in in_ledger:
            problems["counted SMS without its ledger vote"].append(row["carrier_message_id"])
        if row["charged"] and float(row["received_s"]) >= close:
            problems["SMS charged after the close"].append(row["carrier_message_id"])
        fate = fates.get(sms.get(row["carrier_message_id"], -1))
        if fate is not None and fate.vote_ids and fate.vote_ids != {row["vote_id"]}:
            problems["SMS acknowledged with another vote than recorded"].append(
                row["carrier_message_id"])
    if record.plan.config.sms_via == "kannel":
        _check_sms_senders(problems, verdict.facts, record, records)
    for problem, examples in problems.items():
        if examples:
            verdict.fail(f"{len(examples)} {problem}", examples)
    verdict.facts.update(sms_messages=len(records),
                         sms_charged=sum(1 for r in records if r["charged"]))


def _check_sms_senders(problems: dict[str, list[str]], facts: dict[str, Any],
                       record: RunRecord, records: list[dict[str, Any]]) -> None:
    """Through Kannel the records name Kannel's message ids, so they are checked per
    subscriber: no more records than messages sent, no more "counted" replies than counted
    records, and every message answered by a reply (the outbox's promise)."""
    sent: Counter[str] = Counter()
    told_counted: Counter[str] = Counter()
    answered: set[int] = set()
    for attempt in record.attempts:
        shot = record.plan.shots[attempt.shot]
        if shot.path != SMS:
            continue
        sender = _sms_pseudonym(shot, record.msisdn_secret)
        sent[sender] += 1
        if attempt.outcome in (OK, REFUSED):
            answered.add(attempt.shot)
            told_counted[sender] += attempt.outcome == OK
    recorded = Counter(r["pseudonym"] for r in records)
    counted = Counter(r["pseudonym"] for r in records if r["outcome"] == "COUNTED")
    problems["SMS senders with more records than messages sent"] += [
        sender for sender, n in recorded.items() if n > sent[sender]]
    problems["SMS senders told counted more often than counted"] += [
        sender for sender, n in told_counted.items() if n > counted[sender]]
    unanswered = sum(sent.values()) - len(answered)
    if unanswered:
        problems["SMS sent through Kannel without a reply"] += [f"{unanswered} messages"]
    facts.update(sms_sent=sum(sent.values()), sms_replied=len(answered))


async def _balances(connection: AsyncConnection[Any],
                    record: RunRecord) -> dict[str, dict[str, int]]:
    users = sorted({shot.user for shot in record.plan.shots})
    balances: dict[str, dict[str, int]] = {
        user: {"credited": 0, "spent": 0, "clawed_back": 0, "free_used": 0,
               "quota": record.plan.config.free_quota}
        for user in users}
    cursor = await connection.execute(
        "SELECT user_id, credited, spent, clawed_back FROM wallets WHERE user_id = ANY(%s)",
        (users,))
    for row in await cursor.fetchall():
        balances[row["user_id"]].update(credited=row["credited"], spent=row["spent"],
                                        clawed_back=row["clawed_back"])
    cursor = await connection.execute(
        "SELECT user_id, used, quota FROM free_vote_usage WHERE episode_id = %s"
        " AND user_id = ANY(%s)", (record.voting_round.episode_id, users))
    for row in await cursor.fetchall():
        balances[row["user_id"]].update(free_used=row["used"], quota=row["quota"])
    return balances


def _check_refusals(verdict: Verdict, record: RunRecord, fates: dict[int, _ShotFate],
                    balances: dict[str, dict[str, int]]) -> None:
    """Each refusal's reason is one the scenario allows, and the ledger agrees with it."""
    shots = record.plan.shots
    unsure_users = {shots[i].user for i, fate in fates.items() if fate.errors}
    sends_by_user: dict[str, list[float]] = defaultdict(list)
    for attempt in record.attempts:
        sends_by_user[shots[attempt.shot].user].append(attempt.sent)
    for times in sends_by_user.values():
        times.sort()
    problems: dict[str, list[str]] = defaultdict(list)
    reasons: Counter[str] = Counter()
    close = record.voting_round.closes_at - record.clock_tolerance_s
    for index, fate in fates.items():
        shot = shots[index]
        for attempt in fate.mismatches:
            if attempt.outcome == REFUSED and attempt.reason not in _NOT_A_VERDICT:
                problems[f"reused request id refused with {attempt.reason}"].append(
                    shot.request_id)
        for attempt in fate.refusals:
            reasons[attempt.reason] += 1
            balance = balances[shot.user]
            if attempt.reason not in record.plan.expected_reasons:
                problems[f"unexpected reason {attempt.reason}"].append(shot.request_id)
            elif attempt.reason == "NO_FREE_VOTES" and (
                    shot.vote_type != FREE or (balance["free_used"] < balance["quota"]
                                               and shot.user not in unsure_users)):
                problems["NO_FREE_VOTES for a voter with free votes left"].append(
                    shot.request_id)
            elif attempt.reason == "INSUFFICIENT_BALANCE" and (
                    balance["spent"] + balance["clawed_back"] < balance["credited"]
                    and shot.user not in unsure_users):
                problems["INSUFFICIENT_BALANCE for a voter with paid votes left"].append(
                    shot.request_id)
            elif (attempt.reason == "VOTING_CLOSED"
                  and attempt.sent + attempt.latency_ms / 1000 < close):
                problems["VOTING_CLOSED answered before the round closed"].append(
                    shot.request_id)
            elif attempt.reason == "RATE_LIMITED" and _sends_within(
                    sends_by_user[shot.user], attempt.sent, 60 + record.clock_tolerance_s,
            ) <= record.rate_limit_per_minute:
                problems["RATE_LIMITED below the rate limit"].append(shot.request_id)
    for problem, examples in problems.items():
        verdict.fail(f"{len(examples)} refusals: {problem}", examples)
    verdict.facts["refused_by_reason"] = dict(reasons.most_common())


def _sends_within(times: list[float], moment: float, seconds: float) -> int:
    """How many of a user's requests were sent in the `seconds` up to `moment`."""
    return sum(1 for t in times if moment - seconds <= t <= moment)


def _check_balances(verdict: Verdict, record: RunRecord, fates: dict[int, _ShotFate],
                    balances: dict[str, dict[str, int]], rows: list[dict[str, Any]]) -> None:
    """Invariant 4 per voter, and the counters agree with the ledger and the answers."""
    shots = record.plan.shots
    ledger: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        ledger[row["user_id"]][row["vote_type"]] += row["count"]
    acked: dict[str, Counter[str]] = defaultdict(Counter)
    for index, fate in fates.items():
        if fate.vote_ids:
            acked[shots[index].user][shots[index].vote_type] += 1
    problems: dict[str, list[str]] = defaultdict(list)
    for user, balance in balances.items():
        if balance["spent"] + balance["clawed_back"] > balance["credited"]:
            problems["wallets overspent"].append(user)
        if balance["credited"] != record.credited(user):
            problems["wallets credited other than granted or bought"].append(user)
        if balance["clawed_back"] != record.clawed(user):
            problems["wallets clawed back other than refunded"].append(user)
        if balance["free_used"] > balance["quota"]:
            problems["voters over the free quota"].append(user)
        if balance["spent"] != ledger[user][PAID]:
            problems["wallets whose spent differs from the ledger's paid votes"].append(user)
        if balance["free_used"] != ledger[user][FREE]:
            problems["free-vote usage that differs from the ledger's free votes"].append(user)
        if ledger[user][PAID] < acked[user][PAID] or ledger[user][FREE] < acked[user][FREE]:
            problems["voters with fewer ledger votes than acknowledged"].append(user)
    for problem, users in problems.items():
        verdict.fail(f"{len(users)} {problem}", users)
    verdict.facts["voters_checked"] = len(balances)


async def _check_purchases(verdict: Verdict, connection: AsyncConnection[Any],
                           funding: Funding) -> None:
    """Every package bought is one purchase row with its votes; every refund planned is one
    refund that clawed the whole package back (those voters never needed it)."""
    bought = {(b.store, b.transaction_id): b for b in funding.purchases}
    users = sorted({b.user for b in funding.purchases})
    cursor = await connection.execute(
        "SELECT p.store, p.store_transaction_id, p.user_id, p.votes + p.bonus_votes AS votes,"
        "       r.clawed_back, r.already_spent"
        "  FROM purchases p LEFT JOIN purchase_refunds r USING (purchase_id)"
        " WHERE p.user_id = ANY(%s)", (users,))
    rows = {(row["store"], row["store_transaction_id"]): row for row in await cursor.fetchall()}
    problems: dict[str, list[str]] = defaultdict(list)
    for key in bought.keys() - rows.keys():
        problems["packages bought but not recorded"].append(key[1])
    for key in rows.keys() - bought.keys():
        problems["purchases recorded that were not made"].append(key[1])
    for key in bought.keys() & rows.keys():
        purchase, row = bought[key], rows[key]
        if (row["user_id"], row["votes"]) != (purchase.user, purchase.package.votes):
            problems["purchases credited to another user or amount"].append(key[1])
        refunded = row["clawed_back"] is not None
        if refunded != purchase.refund:
            problems["refunds applied other than the stores made"].append(key[1])
        elif refunded and (row["clawed_back"], row["already_spent"]) != (purchase.package.votes,
                                                                         0):
            problems["refunds that did not claw back the whole unneeded package"].append(key[1])
    for problem, examples in problems.items():
        verdict.fail(f"{len(examples)} {problem}", examples)
    verdict.facts.update(purchases=len(bought),
                         refunds=sum(1 for b in funding.purchases if b.refund),
                         votes_bought=sum(funding.credited().values()),
                         votes_clawed_back=sum(funding.clawed().values()))


async def _check_result(verdict: Verdict, connection: AsyncConnection[Any], record: RunRecord,
                        rows: list[dict[str, Any]]) -> None:
    round_id = record.voting_round.round_id
    final = await read_final(connection, round_id)
    info = await load_round(connection, round_id)
    if final is None or info is None:
        verdict.fail(f"round {round_id} has no final result")
        return
    users = sorted({row["user_id"] for row in rows})
    cursor = await connection.execute(_CONTEXT_SQL, {
        "episode": record.voting_round.episode_id, "users": users, "round": round_id})
    context = await cursor.fetchall()
    cursor = await connection.execute(
        "SELECT user_id, credited FROM wallets WHERE user_id = ANY(%s)", (users,))
    credited = {row["user_id"]: int(row["credited"]) for row in await cursor.fetchall()}
    ledger_rows = [rules.Row(
        vote_id=row["vote_id"], voter=row["user_id"], vote_type=row["vote_type"],
        count=row["count"], admitted_ms=row["admitted_ms"],
        leaf_hash=bytes(row["receipt_hash"]), contestant_id=row["contestant_id"],
        channel=row["channel"], fraud_rejected=row["fraud_rejected"],
        received_ms=row["received_ms"]) for row in rows]
    ledger_rows += [rules.Row(
        vote_id=row["vote_id"], voter=row["user_id"], vote_type=row["vote_type"],
        count=row["count"], admitted_ms=row["admitted_ms"],
        leaf_hash=bytes(row["receipt_hash"]), in_round=False,
        same_episode=row["same_episode"]) for row in context]
    recount = rules.recount(info.rules(), ledger_rows, credited)
    if recount.counts != final.counts:
        verdict.fail(f"final result {final.counts} differs from the recount {recount.counts}")
    for name, published, mine in (("total votes", final.total_votes, recount.total_votes),
                                  ("ledger votes", final.ledger_votes, recount.ledger_votes),
                                  ("invalidated votes", final.invalidated_votes,
                                   recount.invalidated_votes),
                                  ("tree size", final.tree_size, len(rows))):
        if published != mine:
            verdict.fail(f"final result's {name} {published} differs from the recount's {mine}")
    if sorted(final.winner_ids) != recount.winners():
        verdict.fail(f"final winners {final.winner_ids} are not the recount's "
                     f"{recount.winners()}")
    # What the voters were told: each acknowledged vote that the rules do not invalidate
    # counts once for the contestant it was cast for.
    told: Counter[str] = Counter(dict.fromkeys(record.voting_round.contestant_ids, 0))
    shots = record.plan.shots
    seen: set[str] = set()
    for attempt in record.attempts:
        if attempt.outcome == OK and not attempt.mismatch and attempt.vote_id not in seen:
            seen.add(attempt.vote_id)
            if attempt.vote_id not in recount.invalid:
                told[record.voting_round.contestant_ids[shots[attempt.shot].contestant]] += 1
    recorded_after_error = sum(1 for row in rows if row["vote_id"] not in seen
                               and row["vote_id"] not in recount.invalid)
    if recorded_after_error == 0 and dict(told) != final.counts:
        verdict.fail(f"final result {final.counts} differs from the acknowledged votes "
                     f"{dict(told)}")
    verdict.facts.update(final_counts=final.counts, recount_counts=recount.counts,
                         invalidated_by_reason=dict(Counter(recount.invalid.values())),
                         outcomes_with_error=sum(1 for a in record.attempts
                                                 if a.outcome == ERROR))
