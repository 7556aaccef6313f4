"""Errors a user can act on. Domain code raises these; the gRPC layer maps `code` to a status code.

They carry no gRPC import so engines and workers stay free of the transport.
"""


class ServiceError(Exception):
    """An error whose message is safe and useful to show to the client."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(ServiceError):
    """The caller's key lacks the scope, or does not own what it asks to change."""

    code = "PERMISSION_DENIED"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    code = "CANCELLED"
