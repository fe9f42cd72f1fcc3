"""The web page: GET / redirects to /ui/, which serves service/ui/static/index.html and its files (no build step, no
CDN: every script and style ships in the package). The page only calls the public API (/v1/link, /v1/entities/...,
/readyz, /openapi.json) with the user's API key, so it needs no key itself (service/auth.py: OPEN_PATHS)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "ui" / "static"
UI_PREFIX = "/ui/"  # the page and its files: open without a key (static, no data)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("ui/", status_code=307)  # relative: stays right behind a path prefix (root_path)


@router.get("/ui")
async def ui_no_slash() -> RedirectResponse:
    return RedirectResponse("ui/", status_code=307)


@router.get("/ui/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
