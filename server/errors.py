"""Domain errors, one tree for the whole server.

    QhxError                      base; carries an OpenAI-style type/code/param and HTTP status
    ├── InvalidRequest            400 invalid_request_error (bad field, unsupported value)
    │   ├── UnsupportedParameter  400, param names the field we cannot honour
    │   ├── ContextLengthExceeded 400, code context_length_exceeded
    │   ├── RequestTooLarge       413, the body (or what it decompresses to) is over max_body_bytes
    │   └── UnsupportedMediaType  415, a body that is not JSON, or a Content-Encoding we do not decode
    ├── AuthenticationFailed      401
    ├── ModelNotFound             404 model_not_found
    ├── NotFound                  404 (an id that names nothing: an unknown or expired stored response)
    ├── Overloaded                429 (queue full), carries retry_after seconds
    ├── NoPhoneAvailable          503 (no phone free in time, or none serves the model now), carries retry_after
    ├── ShuttingDown              503, the server is draining (SIGTERM) or its grace period ran out
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


class RequestTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class RequestTimeout(InvalidRequest):
    """The request's body did not arrive within ``Settings.body_timeout_s``."""

    status_code = 408
    code = "request_timeout"


class UnsupportedMediaType(InvalidRequest):
    status_code = 415
    code = "unsupported_media_type"


class AuthenticationFailed(QhxError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(QhxError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFound(QhxError):
    """An object the request names by id does not exist (never did, expired, or was deleted)."""

    status_code = 404
    error_type = "invalid_request_error"


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


class ShuttingDown(QhxError):
    """The server is shutting down: no new requests, and those still running when the grace period
    ends are cancelled on their phones (docs/reliability.md)."""

    status_code = 503
    error_type = "service_unavailable_error"
    code = "server_shutting_down"


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
