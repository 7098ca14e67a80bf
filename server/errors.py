"""Domain errors, one tree for the whole server.

    QhxError                      base; carries an OpenAI-style type/code/param and HTTP status
    ├── InvalidRequest            400 invalid_request_error (bad field, unsupported value)
    │   ├── UnsupportedParameter  400, param names the field we cannot honour
    │   └── ContextLengthExceeded 400, code context_length_exceeded
    ├── AuthenticationFailed      401
    ├── ModelNotFound             404 model_not_found
    ├── Overloaded                429 (queue full), carries retry_after seconds
    ├── NoPhoneAvailable          503 (no phone free in time, or none serves the model now), carries retry_after
    └── BackendError              a phone or its session failed a request
        ├── PhoneLost             adb stream dropped / device gone / session process exited
        ├── PhoneStalled          no token within the stall timeout
        ├── ProtocolViolation     events out of order or malformed in a way we cannot skip
        ├── PhoneBusy             the phone answered `busy` (host bug: two requests on one phone)
        └── PhoneRequestError     the phone answered `error` for this request (bad_request, runtime...)

The HTTP layer maps these by class in exactly one place (server/api/errors.py). Nothing matches on
message strings.
"""

from __future__ import annotations


class QhxError(Exception):
    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(QhxError):
    status_code = 400
    error_type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(QhxError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(QhxError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class Overloaded(QhxError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class NoPhoneAvailable(QhxError):
    status_code = 503
    error_type = "service_unavailable_error"
    code = "no_phone_available"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class BackendError(QhxError):
    """A phone failed the request. `retryable` is true when no token reached the client yet
    could have been produced by the phone (the scheduler may then retry on another phone)."""

    status_code = 502
    error_type = "server_error"
    code = "phone_error"
    retryable = False


class PhoneLost(BackendError):
    code = "phone_lost"
    retryable = True


class PhoneStalled(BackendError):
    code = "phone_stalled"
    retryable = True


class ProtocolViolation(BackendError):
    code = "protocol_violation"
    retryable = True


class PhoneBusy(BackendError):
    code = "phone_busy"
    retryable = True


class PhoneRequestError(BackendError):
    """The phone rejected this request (`error` event with an id); the session lives on."""

    code = "phone_request_error"
