"""Domain errors: one base class, one JSON shape, stable codes.

Every error a client can cause is an `ELError` subclass with its own HTTP status and stable code.
The app registers one handler for the base class, so a new subclass needs no new handler.
The pipeline raises these too (it never imports fastapi); messages must be safe to show a client.
"""

from __future__ import annotations


class ELError(Exception):
    """Base of every client-visible error: `{"error": {"code", "message"}}` with `status`."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidInput(ELError):
    status, code = 422, "invalid_input"


class TextTooLong(ELError):
    status, code = 422, "text_too_long"


class TooManyItems(ELError):
    status, code = 422, "too_many_items"


class InvalidImage(ELError):
    status, code = 422, "invalid_image"


class UnsupportedImageFormat(ELError):
    status, code = 415, "unsupported_image_format"


class ImageTooLarge(ELError):
    status, code = 413, "image_too_large"


class PayloadTooLarge(ELError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ELError):
    status, code = 415, "unsupported_media_type"


class NotFound(ELError):
    status, code = 404, "not_found"


class EntityNotFound(NotFound):
    code = "entity_not_found"


class EntityImageNotFound(NotFound):
    """The entity exists but its KG has no image for it (or none that may be served)."""

    code = "entity_image_not_found"


class NotReady(ELError):
    status, code = 503, "not_ready"


class Overloaded(ELError):
    status, code = 429, "overloaded"


class DeadlineExceeded(ELError):
    status, code = 504, "deadline_exceeded"


class Unauthorized(ELError):
    status, code = 401, "unauthorized"


class Conflict(ELError):
    status, code = 409, "conflict"


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


class JobNotFound(NotFound):
    code = "job_not_found"


class JobNotFinished(Conflict):
    code = "job_not_finished"


class JobExpired(ELError):
    status, code = 410, "job_expired"


class JobQueueFull(Overloaded):
    code = "job_queue_full"


class DuplicateItemId(InvalidInput):
    code = "duplicate_item_id"


class ClientDisconnected(ELError):
    """The client went away while its request waited for a slot; the work is dropped and nobody reads this."""

    status, code = 499, "client_disconnected"


class InvalidIndex(ELError):
    """An index folder given to reload failed verification; the message names the file."""

    status, code = 422, "invalid_index"


class UpdatesDisabled(Conflict):
    """Entity changes were asked of a server that does not take them (EL_UPDATES__ENABLED=false)."""

    code = "updates_disabled"
