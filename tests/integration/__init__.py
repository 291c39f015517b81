"""Real grpc.aio servers against the session stack's real PostgreSQL and Redis."""
