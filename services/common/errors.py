"""Domain errors: raised by the plain core, mapped to gRPC statuses by one interceptor.

The core never imports grpc; each error class names the status a client should see, and
its message is written for a person.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a caller is told about. ``status`` names a grpc.StatusCode."""

    status = "INTERNAL"


class InvalidArgument(ServiceError):
    status = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    status = "NOT_FOUND"


class ResourceExhausted(ServiceError):
    status = "RESOURCE_EXHAUSTED"


class AlreadyExists(ServiceError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    status = "FAILED_PRECONDITION"


class Unavailable(ServiceError):
    status = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    status = "DEADLINE_EXCEEDED"
