"""Ranking: order retrieved candidates for one request."""
