"""The OpenAPI document states the limits the server enforces, taken from the same Settings instance.

FastAPI builds the request schemas from the pydantic models once, at import; the caps live in Settings,
known only when `create_app(settings)` runs. So the document is post-processed here, from `settings.limits`
and `settings.jobs` and the text rules of `service.pipeline.decode` (`text_pattern`): a client generated from
the document sends nothing the server refuses for its shape, and a change of a limit setting changes the
document with it. What JSON Schema cannot say (an image must decode; item ids are unique within a job) is
said in the descriptions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from service.pipeline.decode import text_pattern
from service.schemas import ENTITY_ID_PATTERN
from service.settings import Settings

JOB_ID_PATTERN = "^[0-9a-f]{32}$"  # uuid4().hex, as the job store makes them

Schema = dict[str, Any]


def constrain(doc: Schema, settings: Settings) -> Schema:
    """Add the server's input limits to an OpenAPI document (in place; returned for chaining)."""
    lim = settings.limits
    comps = doc.get("components", {}).get("schemas", {})
    paths = doc.get("paths", {})

    def body(path: str, media: str) -> Schema | None:
        content = paths.get(path, {}).get("post", {}).get("requestBody", {}).get("content", {})
        return content.get(media, {}).get("schema")

    for schema in _link_request_schemas(doc):
        _constrain_link_request(schema, settings)
    if (batch := comps.get("BatchLinkRequest")) is not None:
        _set(batch["properties"]["items"], maxItems=lim.max_batch_items)
    if (jobs := body("/v1/jobs", "application/json")) is not None:
        _set(jobs["properties"]["items"], maxItems=settings.jobs.max_items,
             description=f"1 to {settings.jobs.max_items} link requests, each with an id unique within the job. "
                         "Each item is checked when it runs, by the rules of /v1/link: one they refuse gets its "
                         "error in the results.")
    content = paths.get("/v1/link", {}).get("post", {}).get("requestBody", {}).get("content", {})
    if (form := body("/v1/link", "multipart/form-data")) is not None:
        content["multipart/form-data"]["encoding"] = {"image": {"contentType": ", ".join(
            f"image/{fmt.lower()}" for fmt in lim.image_formats)}}
        form["additionalProperties"] = False
        _set(form["properties"]["image"], maxLength=lim.max_image_bytes,
             description=f"An image file (one of {', '.join(lim.image_formats)}), at most {lim.max_image_bytes} bytes.")
    if (form := body("/v1/jobs", "multipart/form-data")) is not None:
        jobs_content = paths["/v1/jobs"]["post"]["requestBody"]["content"]
        jobs_content["multipart/form-data"]["encoding"] = {"file": {"contentType": "application/x-ndjson"}}
        form["additionalProperties"] = False
        _set(form["properties"]["file"], description=(
            "A JSONL file: one link request with an id per line (ids unique within the job; at most "
            f"{settings.jobs.max_items} lines; the whole body at most {settings.jobs.max_body_bytes} bytes, else 413)."))
    for item in paths.values():
        for op in item.values():
            for param in op.get("parameters", []) if isinstance(op, dict) else []:
                if param.get("in") == "path" and param.get("name") == "job_id":
                    _set(param["schema"], pattern=JOB_ID_PATTERN)
                if param.get("in") == "path" and param.get("name") == "entity_id":
                    _set(param["schema"], pattern=ENTITY_ID_PATTERN)
    for schema in _entity_request_schemas(doc):
        _constrain_entity_request(schema, settings)
    entity_put = paths.get("/v1/entities/{entity_id}", {}).get("put", {}).get("requestBody", {}).get("content", {})
    if "multipart/form-data" in entity_put:
        entity_put["multipart/form-data"]["encoding"] = {"image": {"contentType": ", ".join(
            f"image/{fmt.lower()}" for fmt in lim.image_formats)}}
        form = entity_put["multipart/form-data"]["schema"]
        form["additionalProperties"] = False
        _set(form["properties"]["image"], maxLength=lim.max_image_bytes,
             description=f"An image file (one of {', '.join(lim.image_formats)}), at most {lim.max_image_bytes} bytes.")
    batch = paths.get("/v1/entities:batch", {}).get("post", {}).get("requestBody", {}).get("content", {})
    if "application/json" in batch:
        _set(batch["application/json"]["schema"], maxItems=settings.updates.max_batch_items)
    return doc


def _entity_request_schemas(doc: Schema) -> Iterator[Schema]:
    """Every object schema of an entity to put: EntityRequest, a batch's put item, the PUT multipart form."""
    def walk(node: Any) -> Iterator[Schema]:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and "name" in props and "start_year" in props:
                yield node
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    seen: set[int] = set()
    for schema in walk({"paths": doc.get("paths", {}), "components": doc.get("components", {})}):
        if id(schema) not in seen:
            seen.add(id(schema))
            yield schema


def _constrain_entity_request(schema: Schema, settings: Settings) -> None:
    lim = settings.limits
    props = schema["properties"]
    _on_type(props["name"], "string", minLength=1, maxLength=lim.max_text_chars, pattern=text_pattern(required=True))
    if "description" in props:
        _on_type(props["description"], "string", maxLength=settings.updates.max_description_chars,
                 pattern=text_pattern(required=False))
    if "id" in props:
        _on_type(props["id"], "string", pattern=ENTITY_ID_PATTERN)
    if "image" in props and _has_type(props["image"], "string") and props["image"].get("format") != "binary":
        _on_type(props["image"], "string", maxLength=4 * (lim.max_image_bytes // 3))
        props["image"]["description"] = (f"Base64 image ({', '.join(lim.image_formats)}; at most "
                                         f"{lim.max_image_bytes} bytes decoded), optionally a data: URL; the "
                                         "image rules of /v1/link apply.")


def _link_request_schemas(doc: Schema) -> Iterator[Schema]:
    """Every object schema with a `mention` property that the server checks on arrival: LinkRequest, BatchItem,
    the multipart form. Not a job's items: those are checked when they run, and one that fails gets its error
    in the results (the job is accepted)."""
    seen: set[int] = set()

    def walk(node: Any) -> Iterator[Schema]:
        if isinstance(node, dict):
            if id(node) not in seen and isinstance(node.get("properties"), dict) and "mention" in node["properties"]:
                seen.add(id(node))
                yield node
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    yield from walk({p: item for p, item in doc.get("paths", {}).items() if not p.startswith("/v1/jobs")})
    yield from walk(doc.get("components", {}))


def _constrain_link_request(schema: Schema, settings: Settings) -> None:
    lim = settings.limits
    props = schema["properties"]
    cap = lim.max_text_chars
    _on_type(props["mention"], "string", minLength=1, maxLength=cap, pattern=text_pattern(required=True))
    if "context" in props:
        _on_type(props["context"], "string", maxLength=cap, pattern=text_pattern(required=False))
    if "top_k" in props:
        _on_type(props["top_k"], "integer", minimum=1, maximum=lim.max_top_k)
    if "image" in props and _has_type(props["image"], "string") and props["image"].get("format") != "binary":
        # Base64 of at most max_image_bytes: 4 characters per 3 bytes (a data: URL prefix is allowed on top).
        _on_type(props["image"], "string", maxLength=4 * (lim.max_image_bytes // 3))
        props["image"]["description"] = (f"Base64 image ({', '.join(lim.image_formats)}; at most "
                                         f"{lim.max_image_bytes} bytes decoded), optionally a data: URL.")


def _branches(node: Schema) -> list[Schema]:
    return [b for b in node.get("anyOf", []) if isinstance(b, dict)] or [node]


def _has_type(node: Schema, type_: str) -> bool:
    return any(b.get("type") == type_ for b in _branches(node))


def _on_type(node: Schema, type_: str, **keywords: Any) -> None:
    """Set keywords on the branch of `node` (itself, or an anyOf member) that has this type."""
    for branch in _branches(node):
        if branch.get("type") == type_:
            branch.update(keywords)


def _set(node: Schema, **keywords: Any) -> None:
    node.update(keywords)


def install(app: Any, settings: Settings) -> None:
    """Make `app.openapi()` return the constrained document (built once, then cached like FastAPI's own)."""
    build: Callable[[], Schema] = app.openapi

    def openapi() -> Schema:
        if app.openapi_schema:
            return app.openapi_schema
        # A copy: FastAPI's document shares dicts with the routes' openapi_extra, which other apps use too.
        app.openapi_schema = constrain(copy.deepcopy(build()), settings)
        return app.openapi_schema

    app.openapi = openapi
