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
    """Over a limit; ``retry_after_s`` (when set) is sent to the client as the trailing
    metadata ``retry-after-ms``, and should also be said in the message."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(ServiceError):
    """No credential, or one that is not valid."""

    status = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """A valid credential of a principal that may not do this."""

    status = "PERMISSION_DENIED"


class AlreadyExists(ServiceError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    status = "FAILED_PRECONDITION"


class Unavailable(ServiceError):
    status = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    status = "DEADLINE_EXCEEDED"
