"""The one exception tree of Tail Service, and the only table that maps it to HTTP.

Two branches. Every error a client can see is a :class:`TailError`. A
:class:`ProviderError` is one failed attempt against one deployment: the adapters raise
it, the model proxy decides on retries and fallback from it, and maps the last one to a
``TailError`` (:func:`tail_service.core.proxy.to_tail_error`); it is never shown as is.
 Each subclass fixes the HTTP
status and the OpenAI ``type``/``code`` pair; instances carry the message and, for
request errors, the ``param`` that was wrong. ``api/errors.py`` renders them in the
OpenAI envelope ``{"error": {"message", "type", "param", "code"}}``. Exceptions that
are not ``TailError`` are bugs: they become a 500 ``server_error`` with the request id
and are logged with a traceback, never a 4xx.

::

    TailError (500 server_error)
     ├── InvalidRequestError (400 invalid_request_error)
     │    ├── UnsupportedParameterError (400, code unsupported_parameter)
     │    └── UpstreamRejectedError (upstream said 4xx: its status, its message)
     ├── AuthenticationError (401 invalid_api_key)
     ├── PermissionDeniedError (403 model_not_allowed)
     ├── NotFoundError (404)
     │    └── ModelNotFoundError (404 model_not_found)
     ├── MethodNotAllowedError (405)
     ├── RequestTimeoutError (408 request_timeout): the body stalled
     ├── RequestTooLargeError (413 request_too_large)
     ├── RateLimitError (429 rate_limit_exceeded, type ``requests``)
     │    └── TokenRateLimitError (429, type ``tokens``)
     ├── UpstreamError (502 upstream_error): the provider failed or broke the protocol
     │    └── UpstreamConnectionError (502 upstream_connection_error)
     ├── ServiceUnavailableError (503 service_unavailable)
     │    └── UpstreamUnavailableError (503 upstream_unavailable): every deployment failed,
     │         is cooling down, or is rate limited
     ├── UpstreamTimeoutError (504 upstream_timeout)
     ├── StreamTimeoutError (504 stream_timeout): an event stream outlived the request
     │    timeout (the run goes on; the stream can be resumed)
     └── ClientDisconnected (499): the client left first; logged, never sent

    ProviderError: one attempt failed (``retryable``, ``failover``, ``retry_after``)
     ├── ProviderHTTPError: a non-2xx answer (status and body kept)
     ├── ProviderConnectionError
     ├── ProviderTimeoutError
     ├── ProviderProtocolError: not the provider's documented wire format
     ├── ProviderStreamCut: a stream ended before its end marker
     ├── ProviderUnsupportedError: the adapter cannot serve this operation or parameter
     └── ProviderNotInstalledError: this installation lacks what the deployment needs
          (shown as a 503 with its own code and message: what is missing, how to get it)
"""

from __future__ import annotations

from typing import Any, ClassVar


class TailError(Exception):
    """Base of every client-visible error.

    ``retry_after`` (seconds) becomes a ``Retry-After`` header; ``should_retry`` becomes
    ``x-should-retry`` so the official SDKs stop retrying errors that cannot heal.
    """

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after
        self.should_retry = should_retry
        self.headers = headers or {}

    @property
    def http_status(self) -> int:
        """The HTTP status of this instance (subclasses may vary it per instance)."""
        return self.status

    def body(self) -> dict[str, Any]:
        """The OpenAI error envelope, with all four keys always present."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(TailError):
    status = 400
    type = "invalid_request_error"


class UnsupportedParameterError(InvalidRequestError):
    default_code = "unsupported_parameter"


class UpstreamRejectedError(InvalidRequestError):
    """The provider refused the request as invalid (a 4xx that is the caller's fault).

    The upstream's own status (400, 404, 413, 422→400) and message are kept so the
    client sees what the provider objected to.
    """

    def __init__(self, message: str, *, upstream_status: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self._status = 400 if upstream_status == 422 else upstream_status

    @property
    def http_status(self) -> int:
        return self._status


class AuthenticationError(TailError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(TailError):
    status = 403
    type = "invalid_request_error"
    default_code = "model_not_allowed"


class NotFoundError(TailError):
    status = 404
    type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )


class ConflictError(TailError):
    """409: the request conflicts with the object's state (or an earlier request)."""

    status = 409
    type = "invalid_request_error"


class MethodNotAllowedError(TailError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeoutError(TailError):
    """The client stopped sending its request body (408; the connection is closed)."""

    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class RequestTooLargeError(TailError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimitError(TailError):
    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"
    #: which limit refused (one of :data:`tail_service.core.ratelimit.REASONS`, ``budget``
    #: or ``tenant_budget``): a bounded label for the rejection metrics
    reason: str = "requests"


class TokenRateLimitError(RateLimitError):
    """429 on tokens per minute (OpenAI's ``type: "tokens"``)."""

    type = "tokens"
    reason = "tokens"


class QuotaExceededError(RateLimitError):
    """429 ``insufficient_quota``: the key's or tenant's budget is spent. Waiting a few
    seconds does not help, so the SDKs are told not to retry (``x-should-retry: false``)."""

    type = "insufficient_quota"
    default_code = "insufficient_quota"
    reason = "budget"


class UpstreamError(TailError):
    status = 502
    default_code = "upstream_error"


class UpstreamConnectionError(UpstreamError):
    default_code = "upstream_connection_error"


class ServiceUnavailableError(TailError):
    status = 503
    default_code = "service_unavailable"


class UpstreamUnavailableError(ServiceUnavailableError):
    default_code = "upstream_unavailable"


class UpstreamTimeoutError(TailError):
    status = 504
    default_code = "upstream_timeout"


class StreamTimeoutError(TailError):
    status = 504
    default_code = "stream_timeout"


class ClientDisconnected(TailError):
    """The client closed the connection before the answer was ready (nginx's 499)."""

    status = 499
    type = "client_closed_request"


class ProviderError(Exception):
    """An attempt against one deployment failed.

    ``retryable``: worth retrying on the same deployment (after ``retry_after`` seconds
    when the upstream said so). ``failover``: worth trying another deployment.
    """

    retryable: bool = False
    failover: bool = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ProviderHTTPError(ProviderError):
    """The upstream answered with a non-2xx status.

    429, 408, 409 and 5xx are retryable and fail over. 401/403 fail over (the
    credential of this deployment is bad) but are not retried. Other 4xx are the
    caller's fault: neither retried nor failed over, and shown to the client.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status = status
        self.body = body
        self.retryable = status in (408, 409, 429) or status >= 500
        self.failover = self.retryable or status in (401, 403)


class ProviderConnectionError(ProviderError):
    """Connecting failed, or the connection broke before a response."""

    retryable = True


class ProviderTimeoutError(ProviderError):
    """The attempt ran past its deadline."""

    retryable = True


class ProviderProtocolError(ProviderError):
    """The upstream answered with something that is not its documented wire format."""

    retryable = True


class ProviderStreamCut(ProviderError):
    """A stream ended or broke before its end marker."""

    retryable = True


class ProviderUnsupportedError(ProviderError):
    """The adapter cannot serve this operation or parameter (e.g. embeddings on Anthropic)."""

    retryable = False
    failover = True


class ProviderNotInstalledError(ProviderError):
    """The deployment cannot run on this installation: a package or model file is missing.

    Not the upstream's fault nor the request's: another deployment may still serve (so it
    fails over, without counting toward a cooldown), and if none does the client gets a
    503 with ``code`` and this message, which names what is missing and how to install it.
    """

    retryable = False
    failover = True

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code
