"""Through Envoy, the whole mesh: what a client of the edge sees."""
