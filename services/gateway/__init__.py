"""The gateway: one set of operations (`core.Gateway`) behind REST (`rest`) and gRPC (`grpc_server`)."""
