"""The shared runtime every televote service is built on: config, bootstrap, errors, storage."""
