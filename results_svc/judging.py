"""The round's rules in SQL, in one place: the full recount (`store.JUDGED_SQL`) and the
checkpoint's steps (`store.DELTA_SQL`) are composed from these pieces, so the two judge
every ledger row alike (invariant 5: the checkpoint path must store the recount's result).
`results_svc.rules` says the same rules in Python, for `televote audit verify`.

Parameters, named as `checkpoint.judge_params` gives them: round, episode, contestants, opens,
app / web / sms (each channel's close, ms), quota, cap, lag (the round's receive_lag_ms).
"""

#: A voter's rows in ledger order (alias `v`): the window the running totals are taken over.
WINDOW = ("WINDOW w AS (PARTITION BY v.user_id ORDER BY v.admitted_ms, v.vote_id,"
          " v.receipt_hash ROWS UNBOUNDED PRECEDING)")

#: A ledger row (`v`) with its voter's running totals up to it (window `w`): free votes in the
#: episode, free votes in the round, paid votes ever. Every row counts towards them, whether
#: it counts itself or not.
ROW_WITH_TOTALS = """
  v.vote_id, v.user_id, v.request_id, v.round_id, v.contestant_id, v.vote_type, v.count,
  v.channel, v.admitted_ms, v.received_ms, v.receipt_hash,
  sum(CASE WHEN v.vote_type = 'FREE' AND v.episode_id = %(episode)s::uuid
           THEN v.count ELSE 0 END) OVER w AS free_run,
  sum(CASE WHEN v.vote_type = 'FREE' AND v.round_id = %(round)s::uuid
           THEN v.count ELSE 0 END) OVER w AS round_free_run,
  sum(CASE WHEN v.vote_type = 'PAID' THEN v.count ELSE 0 END) OVER w AS paid_run"""


def judged_ms(row: str) -> str:
    """`rules.judged_ms` of the row aliased `row`: the time its window is judged by."""
    return (f"greatest(least(coalesce({row}.received_ms, {row}.admitted_ms), {row}.admitted_ms),"
            f" {row}.admitted_ms - %(lag)s)")


def reason(row: str, duplicate: str, fraud_rejected: str) -> str:
    """Why the row aliased `row` (with ROW_WITH_TOTALS' columns) does not count, NULL if it
    does; the first rule that applies wins. The DUPLICATE and FRAUD_REJECTED conditions are
    the caller's: each query finds earlier copies and rejections its own way."""
    return f"""CASE WHEN {duplicate} THEN 'DUPLICATE'
       WHEN NOT ({row}.contestant_id = ANY(%(contestants)s::uuid[])) THEN 'NOT_A_CONTESTANT'
       WHEN {judged_ms(row)} < %(opens)s OR {judged_ms(row)} >= CASE {row}.channel
            WHEN 'APP' THEN %(app)s WHEN 'WEB' THEN %(web)s ELSE %(sms)s END
            THEN 'OUTSIDE_WINDOW'
       WHEN {fraud_rejected} THEN 'FRAUD_REJECTED'
       WHEN {row}.vote_type = 'FREE' AND {row}.free_run > %(quota)s THEN 'OVER_FREE_QUOTA'
       WHEN {row}.vote_type = 'FREE' AND %(cap)s > 0 AND {row}.round_free_run > %(cap)s
            THEN 'OVER_ROUND_FREE_CAP'
       WHEN {row}.vote_type = 'PAID' AND {row}.paid_run > coalesce(
            (SELECT w.credited FROM wallets w WHERE w.user_id = {row}.user_id), 0)
            THEN 'NO_BALANCE'
  END"""
