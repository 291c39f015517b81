"""Operating the platform: the `televote` command, the local stack, the edge config, tokens."""
