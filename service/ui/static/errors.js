// Every stable error code of the API (service/errors.py, and the app's own handlers in service/app.py) as a
// readable message. tests/service/test_ui_static.py checks that no code is missing here.
"use strict";

const ERROR_MESSAGES = {
  // input
  bad_request: "The request was not accepted",
  invalid_input: "The request was not accepted",
  text_too_long: "The sentence or the mention is too long",
  too_many_items: "Too many items in one request",
  duplicate_item_id: "Two items share the same id",
  // images
  invalid_image: "The image could not be read: it is corrupt, truncated, animated or not an image",
  unsupported_image_format: "This image format is not supported: use a JPEG, PNG or WebP image",
  image_too_large: "The image is too large (bytes or pixels): use a smaller image",
  payload_too_large: "The request is too large",
  unsupported_media_type: "The request was not sent as JSON or a form",
  // access
  unauthorized: "An API key is needed, or the key given is not valid: enter it at the top right",
  // lookups
  not_found: "Not found",
  entity_not_found: "This entity is not in the index (it may have been swapped)",
  entity_image_not_found: "The knowledge graph has no image for this entity",
  method_not_allowed: "This action is not allowed here",
  // service state
  not_ready: "The service is still loading its model and index (or failed to): try again in a few seconds",
  overloaded: "The service is busy: try again in a moment",
  deadline_exceeded: "The service took too long to answer: try again",
  client_disconnected: "The request was abandoned before it ran",
  internal: "The service hit an internal error (logged on the server)",
  http_error: "The request failed",
  // jobs and admin (not used by this page, listed so that every code reads well)
  conflict: "This conflicts with an operation in progress",
  idempotency_conflict: "This idempotency key was used for another request",
  updates_disabled: "This server does not accept changes to its knowledge graph",
  job_not_found: "No such job",
  job_not_finished: "The job has not finished yet",
  job_expired: "The job and its results have expired",
  job_queue_full: "The job queue is full: try again later",
  invalid_index: "The index folder failed verification",
};

// A readable line for an API error body {"error": {"code", "message"}} answered with `status`.
function describeError(status, body, headers) {
  const err = body && body.error ? body.error : null;
  if (!err) {
    return `The service answered ${status} without an error description.`;
  }
  const base = ERROR_MESSAGES[err.code] || "The request failed";
  let text = `${base}.`;
  if (err.message) text += ` (${err.message})`;
  const retry = headers && headers.get ? headers.get("Retry-After") : null;
  if (retry && (status === 429 || status === 503)) text += ` Retry after ${retry} s.`;
  return text;
}
