"""The Starlette application of ``ddfm-fast serve`` (the optional ``web`` extra: starlette + uvicorn).

HTTP over :class:`~ddfm_fast.web.jobs.JobManager`:

| route | what |
| --- | --- |
| ``GET /`` and ``/static/*`` | the page (``static/index.html``, ``app.js``, ``app.css``, shipped in the package) |
| ``GET /api/info`` | the model, its default steps, the limits, the roles of each mode |
| ``POST /api/uploads?name=LABEL`` | one image as the raw request body; decoded by the CLI's readers; a token back |
| ``GET /api/uploads/{token}.png`` | that image as the page shows it |
| ``POST /api/jobs`` | JSON ``{ir, vis, mode, prior, steps, seed, color, size_policy}`` (tokens); the job back |
| ``GET /api/jobs`` | the queue: every job the server keeps, oldest first |
| ``GET /api/jobs/{id}``, ``/events`` | the job; the same as server-sent events until it ends (with the live x0 image) |
| ``POST /api/jobs/{id}/cancel`` | cancel it (a running job stops at its next step) |
| ``GET /api/jobs/{id}/{fused,color,fused16}.png`` | the outputs as downloads (``fused16``: 16-bit PNG) |
| ``GET /api/jobs/{id}/view/{ir,vis}.png`` | the sources cropped to the output, for the side-by-side view |

An upload is the raw body of one request (no multipart form), so the byte limit is checked while it arrives and
nothing is spooled to disk under any name by the framework. Bound to loopback, the app answers only requests whose
``Host`` header is a loopback name, so a web page elsewhere cannot reach it through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from importlib import resources
from pathlib import PurePosixPath
from typing import Any, AsyncIterator, Optional, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ddfm_fast import io
from ddfm_fast.web.jobs import (
    FINAL_STATES,
    MODES,
    OUTPUT_KINDS,
    JobManager,
    JobRequest,
    QueueFull,
    RequestError,
    UploadError,
    UploadTooLarge,
    display_name,
    too_large_message,
)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_EVENT_POLL_S = 0.1  # how often an event stream looks for changes (a step of the smallest runs takes ~50 ms)
_KEEPALIVE_S = 15.0


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_capped(request: Request, limit: int, label: str) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge(too_large_message(label, int(declared), limit))
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:  # what has arrived so far: the file is at least this large
            raise UploadTooLarge(too_large_message(label, total, limit, at_least=True))
        chunks.append(chunk)
    return b"".join(chunks)


def _int_field(body: dict[str, Any], name: str, default: Optional[int]) -> Optional[int]:
    value = body.get(name, default)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise RequestError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():  # not other scripts' digits
        return int(value.strip())
    raise RequestError(f"{name} must be a whole number, got {value!r}")


def _str_field(body: dict[str, Any], name: str, default: str) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {value!r}")
    return value


REQUEST_FIELDS = frozenset({"ir", "vis", "mode", "prior", "steps", "seed", "color", "size_policy"})


def parse_request(body: Any) -> tuple[str, str, JobRequest]:
    """The upload tokens and the :class:`JobRequest` of a ``POST /api/jobs`` body (:class:`RequestError` if bad)."""
    if not isinstance(body, dict):
        raise RequestError("the request must be a JSON object")
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:  # a setting the page does not offer would otherwise be dropped without a word
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; a job takes "
                           f"{', '.join(sorted(REQUEST_FIELDS))}")
    color = body.get("color", False)
    if not isinstance(color, bool):
        raise RequestError(f"color must be true or false, got {color!r}")
    seed = _int_field(body, "seed", 3407)
    req = JobRequest(mode=_str_field(body, "mode", "ivf"), prior=_str_field(body, "prior", "diffusion"),
                     steps=_int_field(body, "steps", None), seed=3407 if seed is None else seed, color=color,
                     size_policy=_str_field(body, "size_policy", "pad"))
    return _str_field(body, "ir", ""), _str_field(body, "vis", ""), req


def create_app(manager: JobManager, *, allowed_hosts: Optional[Sequence[str]] = LOOPBACK_HOSTS) -> Starlette:
    """The web app over ``manager``. ``allowed_hosts``: the ``Host`` names answered (None: any)."""
    page = (resources.files("ddfm_fast.web") / "static" / "index.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def info(request: Request) -> Response:
        return JSONResponse(manager.info())

    async def upload(request: Request) -> Response:
        slot = request.query_params.get("slot", "")
        mode = request.query_params.get("mode", "ivf")
        roles = MODES.get(mode, MODES["ivf"])
        role = roles[0] if slot == "ir" else roles[1] if slot == "vis" else "image"
        name = request.query_params.get("name")
        label = f"{role} {display_name(name, 'upload')}" if name else role
        suffix = PurePosixPath(display_name(name, "")).suffix.lower()
        try:
            data = await _read_capped(request, manager.limits.max_upload_bytes, label)
            item = await run_in_threadpool(manager.add_upload, data, label, suffix)
        except UploadTooLarge as exc:
            return _error(str(exc), 413)
        except UploadError as exc:
            return _error(str(exc))
        w, h = item.size
        return JSONResponse({"token": item.token, "label": item.label, "width": w, "height": h,
                             "chroma": io.has_chroma(item.rgb8), "url": f"/api/uploads/{item.token}.png"})

    async def upload_png(request: Request) -> Response:
        item = manager.uploads.get(request.path_params["token"])
        if item is None:
            return _error("no such upload (the server keeps only the most recent ones)", 404)
        return Response(item.display_png, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def submit(request: Request) -> Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested past the parser
            return _error("the request must be a JSON object")
        try:
            ir, vis, req = parse_request(body)
            job = await run_in_threadpool(manager.submit, ir, vis, req)
        except RequestError as exc:
            return _error(str(exc))
        except QueueFull as exc:
            return _error(str(exc), 429)
        return JSONResponse(manager.snapshot(job), status_code=201)

    async def queue(request: Request) -> Response:
        return JSONResponse({"jobs": manager.queue_view()})

    def _job_or_404(request: Request) -> Any:
        return manager.get(request.path_params["job_id"])

    async def job_view(request: Request) -> Response:
        job = _job_or_404(request)
        if job is None:
            return _error("no such job", 404)
        return JSONResponse(manager.snapshot(job))

    async def cancel(request: Request) -> Response:
        job = manager.cancel(request.path_params["job_id"])
        if job is None:
            return _error("no such job", 404)
        return JSONResponse(manager.snapshot(job))

    async def events(request: Request) -> Response:
        job = _job_or_404(request)
        if job is None:
            return _error("no such job", 404)

        async def stream() -> AsyncIterator[str]:
            seen_version, seen_preview, beat = None, -1, time.monotonic()
            while True:
                version = manager.version
                if manager.closing and version == seen_version:
                    # The server is stopping: what the page last got is the last it gets (a running job's
                    # cancelled state may come too late for the graceful shutdown, and never blocks it).
                    return
                if version != seen_version:
                    seen_version = version
                    preview_step = job.preview_step
                    snap = manager.snapshot(job, with_preview=preview_step != seen_preview)
                    seen_preview = preview_step
                    snap["queue"] = manager.queue_view()
                    yield f"data: {json.dumps(snap)}\n\n"
                    beat = time.monotonic()
                    if job.state in FINAL_STATES:
                        return
                elif time.monotonic() - beat > _KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    beat = time.monotonic()
                await asyncio.sleep(_EVENT_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def preview(request: Request) -> Response:
        job = _job_or_404(request)
        if job is None or job.preview is None:
            return _error("no live image for this job", 404)
        return Response(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def view(request: Request) -> Response:
        job = _job_or_404(request)
        slot = request.path_params["slot"]
        if job is None or slot not in job.views:
            return _error("no such image", 404)
        return Response(job.views[slot], media_type="image/png", headers={"Cache-Control": "no-store"})

    async def output(request: Request) -> Response:
        job = _job_or_404(request)
        kind = request.path_params["kind"]
        if job is None or kind not in OUTPUT_KINDS or kind not in job.outputs:
            return _error("no such output", 404)
        inline = request.query_params.get("inline") == "1"
        name = f"ddfm_{job.id}_{kind}.png"  # the server's own name, never the client's
        disposition = "inline" if inline else f'attachment; filename="{name}"'
        return Response(job.outputs[kind], media_type="image/png",
                        headers={"Content-Disposition": disposition, "Cache-Control": "no-store"})

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/uploads", upload, methods=["POST"]),
        Route("/api/uploads/{token:str}.png", upload_png),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs", queue, methods=["GET"]),
        Route("/api/jobs/{job_id:str}", job_view),
        Route("/api/jobs/{job_id:str}/events", events),
        Route("/api/jobs/{job_id:str}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{job_id:str}/preview.png", preview),
        Route("/api/jobs/{job_id:str}/view/{slot:str}.png", view),
        Route("/api/jobs/{job_id:str}/{kind:str}.png", output),
        Mount("/static", StaticFiles(packages=[("ddfm_fast.web", "static")]), name="static"),
    ]
    middleware = [] if allowed_hosts is None else [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(manager.close, 5.0)  # cancel the running job at its next step, drop the queue

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
