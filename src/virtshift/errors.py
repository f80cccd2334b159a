"""The one error hierarchy of virtshift.

Every failure a user can see is a :class:`VirtshiftError`. Errors that cross the API are
:class:`ApiError` subclasses and turn into Kubernetes ``Status`` objects with
:meth:`ApiError.status`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class VirtshiftError(Exception):
    """Base of every error virtshift raises on purpose."""


@dataclass(frozen=True)
class FieldError:
    """One offending field, as Kubernetes reports it in ``details.causes``.

    ``type`` is a Kubernetes cause type: FieldValueInvalid, FieldValueRequired,
    FieldValueNotSupported, FieldValueNotFound, FieldValueDuplicate, FieldValueForbidden,
    FieldValueTooLong,
    FieldValueTypeInvalid or FieldValueUnknown (an unknown field under strict validation).
    """

    type: str
    field: str
    message: str

    def text(self) -> str:
        """The human form used in the aggregated Status message."""
        prefix = {
            "FieldValueRequired": "Required value",
            "FieldValueInvalid": "Invalid value",
            "FieldValueNotSupported": "Unsupported value",
            "FieldValueDuplicate": "Duplicate value",
            "FieldValueForbidden": "Forbidden",
            "FieldValueTooLong": "Too long",
            "FieldValueTypeInvalid": "Invalid value",
            "FieldValueUnknown": "unknown field",
            "FieldValueNotFound": "Not found",
        }.get(self.type, "Invalid value")
        if self.type == "FieldValueUnknown":
            return f'unknown field "{self.field}"'
        if self.message:
            return f"{self.field}: {prefix}: {self.message}"
        return f"{self.field}: {prefix}"

    def cause(self) -> dict[str, str]:
        return {"reason": self.type, "message": self.text(), "field": self.field}


@dataclass(frozen=True)
class PlainCause(FieldError):
    """A status cause that is not a validation error: its message is shown as it is (no
    "Invalid value" prefix), e.g. a server-side apply conflict."""

    def text(self) -> str:
        return self.message

    def cause(self) -> dict[str, str]:
        out = {"reason": self.type, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class ApiError(VirtshiftError):
    """An error with a Kubernetes ``Status`` representation."""

    code = 500
    reason = "InternalError"

    def __init__(
        self,
        message: str,
        *,
        name: str | None = None,
        group: str | None = None,
        kind: str | None = None,
        causes: list[FieldError] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.name = name
        self.group = group
        self.kind = kind
        self.causes = list(causes or [])
        self.retry_after = retry_after

    def status(self) -> dict[str, Any]:
        """The ``Status`` object the API sends for this error."""
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        details: dict[str, Any] = {}
        if self.name is not None:
            details["name"] = self.name
        if self.group:
            details["group"] = self.group
        if self.kind:
            details["kind"] = self.kind
        if self.causes:
            details["causes"] = [c.cause() for c in self.causes]
        if self.retry_after is not None:
            details["retryAfterSeconds"] = self.retry_after
        if details:
            body["details"] = details
        if self.reason == "":
            del body["reason"]
        return body


class BadRequest(ApiError):
    code = 400
    reason = "BadRequest"


class AdmissionDenied(BadRequest):
    """A validating webhook's refusal without field causes: kube-apiserver answers 400 with the
    webhook's message and no reason."""

    reason = ""


class Unauthorized(ApiError):
    code = 401
    reason = "Unauthorized"


class Forbidden(ApiError):
    code = 403
    reason = "Forbidden"


class NotFound(ApiError):
    code = 404
    reason = "NotFound"


class MethodNotAllowed(ApiError):
    code = 405
    reason = "MethodNotAllowed"


class NotAcceptable(ApiError):
    code = 406
    reason = "NotAcceptable"


class AlreadyExists(ApiError):
    code = 409
    reason = "AlreadyExists"


class Conflict(ApiError):
    code = 409
    reason = "Conflict"


class Expired(ApiError):
    """A resourceVersion older than the retained history (HTTP 410 Gone)."""

    code = 410
    reason = "Expired"


class RequestEntityTooLarge(ApiError):
    code = 413
    reason = "RequestEntityTooLarge"


class UnsupportedMediaType(ApiError):
    code = 415
    reason = "UnsupportedMediaType"


class Invalid(ApiError):
    """422: the object fails validation; ``causes`` carry the field paths."""

    code = 422
    reason = "Invalid"

    @classmethod
    def for_object(
        cls, kind: str, group: str, name: str, causes: list[FieldError]
    ) -> Invalid:
        qualified = f"{kind}.{group}" if group else kind
        joined = ", ".join(c.text() for c in causes)
        if len(causes) > 1:
            joined = f"[{joined}]"
        return cls(
            f'{qualified} "{name}" is invalid: {joined}',
            name=name,
            group=group,
            kind=kind,
            causes=causes,
        )


class TooManyRequests(ApiError):
    code = 429
    reason = "TooManyRequests"


class InternalError(ApiError):
    code = 500
    reason = "InternalError"


class ServiceUnavailable(ApiError):
    code = 503
    reason = "ServiceUnavailable"


class StoreError(VirtshiftError):
    """Base of store-level failures (mapped to ApiErrors by the API server)."""


class KeyExists(StoreError):
    pass


class KeyNotFound(StoreError):
    pass


class RevisionMismatch(StoreError):
    """A compare-and-swap found a different modification revision."""

    def __init__(self, current: int) -> None:
        super().__init__(f"revision mismatch (current {current})")
        self.current = current


class Compacted(StoreError):
    """A watch or read from a revision the store no longer keeps."""

    def __init__(self, requested: int, compacted: int) -> None:
        super().__init__(f"revision {requested} is compacted (oldest kept {compacted + 1})")
        self.requested = requested
        self.compacted = compacted
