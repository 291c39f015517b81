"""Unit tests: logic called directly, no stack, seconds."""
