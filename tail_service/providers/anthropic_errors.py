"""The errors of the Anthropic translation, and Anthropic's error types as HTTP statuses.

:class:`AnthropicRequestError` is raised by :mod:`.anthropic_request` for an OpenAI
request that cannot be expressed for Anthropic (the adapter answers 400);
:class:`AnthropicResponseError` by :mod:`.anthropic_response` and
:mod:`.anthropic_stream` for an upstream answer that is not the Messages wire format.
:data:`ERROR_STATUS` maps the ``error.type`` of an Anthropic error body to a status.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: HTTP status per Anthropic error type; ``overloaded_error`` (really 529) is reported as 503.
ERROR_STATUS: Mapping[str, int] = MappingProxyType(
    dict(invalid_request_error=400, authentication_error=401, billing_error=402, permission_error=403)
    | dict(not_found_error=404, request_too_large=413, rate_limit_error=429, api_error=500)
    | dict(timeout_error=504, overloaded_error=503)
)


class AnthropicConvertError(ValueError):
    """Base of the translation errors."""


class AnthropicRequestError(AnthropicConvertError):
    """The OpenAI request cannot be expressed for Anthropic; the adapter answers HTTP 400."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class AnthropicResponseError(AnthropicConvertError):
    """The upstream answer is not in the Messages wire format (a protocol error)."""
