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


# Trailing metadata of a RESOURCE_EXHAUSTED answer, for programs (the HTTP front turns them
# into Retry-After and an error code): how long to wait, and which limit was hit.
RETRY_AFTER_TRAILER = "retry-after-ms"
LIMIT_TRAILER = "ssjf-limit"
# The limits, named as they are configured: a tenant's (the credentials file) and a model's
# queue (the scheduler's --max-queue-depth).
LIMIT_REQUESTS_PER_S = "requests_per_s"
LIMIT_MAX_STREAMS = "max_streams"
LIMIT_MAX_QUEUED_JOBS = "max_queued_jobs"
LIMIT_MAX_QUEUE_DEPTH = "max_queue_depth"


class ResourceExhausted(ServiceError):
    """Over a limit; ``retry_after_s`` (when set) is sent to the client as the trailing
    metadata ``retry-after-ms``, and should also be said in the message; ``limit`` (one of
    the LIMIT_* names, when set) as ``ssjf-limit``."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, retry_after_s: float | None = None, limit: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit


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
