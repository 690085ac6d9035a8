"""The ground floor every stage stands on: the config schema and its checks, Ray start-up and the quiet console,
atomic file writes, where models come from, and experiment tracking."""
