"""Tests that need no running service: seconds, no PostgreSQL, Redis or Envoy."""
