"""The service error hierarchy, mapped once to HTTP and gRPC status codes at the edge."""

from __future__ import annotations

import grpc


class FreshrecError(Exception):
    """Base of errors that reach a client; the message is safe to show."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL


class InvalidArgument(FreshrecError):
    """The request is malformed; the message names the field."""

    http_status = 422
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(FreshrecError):
    """No API key, or not a known one."""

    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FreshrecError):
    """The API key lacks the scope the call needs."""

    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(FreshrecError):
    """Over a rate limit; retry later. The call did nothing."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(FreshrecError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class Unavailable(FreshrecError):
    """A dependency (event log, store) is down; retry later. Nothing was acknowledged."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FreshrecError):
    """The call ran out of time (its deadline or the server's request timeout) before an answer."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
