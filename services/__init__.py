"""Service processes: gateway (REST + gRPC), serving replica, configuration, metrics, CLI."""
