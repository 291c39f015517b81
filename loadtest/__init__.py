"""Show-night load simulator: drives the real edge with simulated voters, then proves every
acknowledged vote is in the ledger once and the final result equals a recount.

    televote loadtest seed --compress 30          # the seed's test, 30 minutes in one
    televote loadtest shownight --peak-rate 800   # performances, bursts, close-of-lines spike

Modules: `plan` (scenarios as timed vote shots, pure), `transports` and `grpcweb` (native
gRPC, gRPC-Web and JSON clients), `driver` (open-loop worker processes), `show` (the control
room: show, round, grants, cues, final result), `verify` (ledger, refusals, result, balances),
`report` (JSON, Markdown, PNG), `resources` (CPU and memory per process), `progress` (the live
terminal display) and `run` (all of it in order).
"""
