"""Benchmarks that print figures; `python -m bench` runs them all (bench/suite.py)."""

import ops  # noqa: F401  - first: it switches off grpc's fork handlers before grpc loads
