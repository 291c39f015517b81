"""vote_svc: the write path: admission, the durable vote ledger, the wallet."""
