"""The test suite (tests/conftest.py starts the real mesh once per session)."""

import ops  # noqa: F401  - first: it switches off grpc's fork handlers before grpc loads
