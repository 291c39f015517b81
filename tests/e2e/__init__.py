"""End-to-end tests: through the Envoy edge, the whole mesh, and a browser for pages."""
