"""Operating the platform: the `televote` command, the local stack, the edge config, tokens."""

import os

# This package starts child processes (PostgreSQL as another OS user is a fork, not a vfork)
# from processes that also run gRPC. grpc-core's fork handlers then run in the child between
# fork and exec and can abort it ("ev_epoll1_linux.cc Check failed: next_worker->state ==
# KICKED", seen as a PostgreSQL that exits at start). Nothing here relies on gRPC surviving a
# fork, so they are switched off; it must happen before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
