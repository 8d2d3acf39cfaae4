"""Streaming trainer: consumes events from the log, trains online, publishes parameter deltas."""
