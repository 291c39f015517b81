"""Integration tests: a real grpc.aio server against real PostgreSQL and Redis."""
