"""The FastAPI application of the job server (``autonnunet serve``).

HTTP JSON API under ``/v1`` (OpenAPI docs at ``/docs``), bearer tokens on everything but
``/v1/health``; a user sees only their own uploads and jobs (another user's id answers 404, the
same as a missing one, so ids cannot be probed). Uploads: :mod:`.uploads`; jobs: :mod:`.queue`;
durable state: :mod:`.store`.

FastAPI is imported only when the app is created, so ``autonnunet --help`` stays fast and the
rest of the library (and the Slicer module) never needs it.
"""


# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations,
# and those name classes imported inside create_app (lazily), which string annotations can't see.
import contextlib
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from ... import __version__
from ...events import ProgressEvent, read_events
from ...errors import AutoNNUNetError
from ...jobs import ARTIFACTS_DIR, EVENTS_NAME, LOG_NAME, PARAMS_TYPES, read_log
from ...states import JobState
from .queue import JobQueue
from .settings import API_PREFIX, MiB, ApiError, DataDir, ServerSettings
from .store import FINAL_JOB_STATES, Artifact, Store
from .uploads import DISK_FULL, UploadService, disk_full_message
from .views import (
    ERROR_DESCRIPTIONS, ErrorBody, EventsChunk, Health, JobView, LogChunk, Me, UploadCreate, UploadView, request_schema,
)

#: Jobs per page of GET /v1/jobs (default and most).
JOBS_PAGE = 200
MAX_JOBS_PAGE = 1000

log = logging.getLogger("AutoNNUNetLib.remote.server")

def read_events_page(path: Path, offset: int, limit: int) -> tuple[list[Any], int]:
    """Like :func:`events.read_events`, but reads at most ``limit`` bytes (long searches write
    megabytes of events; a client pages through them). A line longer than ``limit`` is read whole."""
    data, _ = read_log(path, offset, limit)
    end = data.rfind(b"\n")
    if end < 0 and len(data) == limit:  # one very long line: take it whole
        return read_events(path, offset)
    if end < 0:
        return [], offset
    events = []
    for line in data[: end + 1].splitlines():
        if line.strip():
            try:
                events.append(ProgressEvent.from_json(line.decode("utf-8")))
            except (ValueError, KeyError):
                continue
    return events, offset + end + 1


def _decode_text(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, leaving a character cut at the end of a page for the next page."""
    for cut in range(0, 4):
        try:
            return data[: len(data) - cut].decode("utf-8"), len(data) - cut
        except UnicodeDecodeError as error:
            if error.start < len(data) - 4:
                break
    return data.decode("utf-8", errors="replace"), len(data)



class Server:
    """Everything one server process owns: store, upload service, job queue."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        # Everything the server and its jobs write is the owner's only (see DataDir).
        os.umask(0o077)
        self.paths = DataDir(settings.data_dir)
        self.store = Store(self.paths.db)
        self.uploads = UploadService(settings, self.store, self.paths)
        self.queue = JobQueue(settings, self.store, self.paths)

    def start(self) -> None:
        self.uploads.recover()
        self.queue.tick()  # re-attach or re-queue jobs before the first request is served
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self.uploads.shutdown()


def create_app(settings: ServerSettings):  # -> fastapi.FastAPI (imported lazily)
    """The FastAPI app of a server over ``settings.data_dir``."""
    from fastapi import Body, Depends, FastAPI, Header, Path as PathParam, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    server = Server(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(
        title="AutoNNUNet job server",
        version=__version__,
        description="Upload labeled volumes, run nnU-Net searches and trainings on this machine's GPUs, "
                    "download the best model. All endpoints but /v1/health need `Authorization: Bearer <token>` "
                    "(create one with `autonnunet token create --user NAME`).",
        lifespan=lifespan,
    )
    app.state.server = server
    bearer = HTTPBearer(auto_error=False, description="token from `autonnunet token create`")

    def auth_error() -> ApiError:
        return ApiError(401, "missing or invalid token: send `Authorization: Bearer <token>`; a token is created "
                             "on the server with `autonnunet token create --user NAME`",
                        {"WWW-Authenticate": "Bearer"})

    def current_user(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> str:
        if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
            raise auth_error()
        user = server.store.user_for_token(credentials.credentials)
        if user is None:
            raise auth_error()
        return user

    # -- errors: one JSON shape, {"detail": message}, with a readable message -------------------
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
            if item.get("type") == "json_invalid":
                reason = item.get("ctx", {}).get("error", "")
                problems.append(f"malformed JSON in the request body ({reason})" if reason else
                                "malformed JSON in the request body")
            else:
                problems.append(f"{where}: {item.get('msg', 'invalid')}")
        return JSONResponse(
            {"detail": "invalid request: " + "; ".join(problems),
             "errors": [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                         "type": str(e.get("type", ""))} for e in error.errors()]},
            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400 and "parsing the body" in str(error.detail):
            # A body that is not UTF-8 JSON at all: the same answer as malformed JSON.
            return JSONResponse({"detail": "malformed JSON in the request body (not UTF-8 JSON text)"},
                                status_code=422)
        return JSONResponse({"detail": str(error.detail)}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, error: Exception) -> JSONResponse:
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return JSONResponse({"detail": disk_full_message(settings.data_dir)}, status_code=507)
        log.exception("internal error")
        return JSONResponse({"detail": f"internal server error: {type(error).__name__}; see the server log"},
                            status_code=500)

    upload_id_param = PathParam(..., max_length=64, description="upload id")
    job_id_param = PathParam(..., max_length=64, description="job id")

    def errors(*codes: int, **notes: str) -> dict:
        """OpenAPI entries for the error answers of a route: every one has the ErrorBody shape.
        Routes with a token also answer 401, and every route with parameters 422."""
        texts = {**ERROR_DESCRIPTIONS, **{int(k[1:]): v for k, v in notes.items()}}
        return {code: {"model": ErrorBody, "description": texts[code]} for code in sorted(set(codes))}

    authed = (401, 422)

    # -- meta -----------------------------------------------------------------------------------
    @app.get(API_PREFIX + "/health", response_model=Health, tags=["meta"])
    def health() -> Health:
        return Health("ok", __version__, settings.executor, len(settings.devices), list(settings.gpus))

    @app.get(API_PREFIX + "/me", response_model=Me, tags=["meta"], responses=errors(*authed))
    def me(user: str = Depends(current_user)) -> Me:
        return Me(user)

    # -- uploads --------------------------------------------------------------------------------
    @app.post(API_PREFIX + "/uploads", response_model=UploadView, status_code=201, tags=["uploads"],
              responses={200: {"model": UploadView,
                               "description": "an upload of the same content exists: resume or reuse it"},
                         **errors(*authed, 413, 429, 507)})
    def create_upload(body: UploadCreate, user: str = Depends(current_user)) -> Any:
        record, created = server.uploads.create(user, body)
        view = UploadView.of(record)
        return view if created else JSONResponse(asdict(view), status_code=200)

    @app.get(API_PREFIX + "/uploads", response_model=list[UploadView], tags=["uploads"], responses=errors(*authed))
    def list_uploads(user: str = Depends(current_user)) -> list[UploadView]:
        return [UploadView.of(r) for r in server.store.list_uploads(user=user)]

    @app.get(API_PREFIX + "/uploads/{upload_id}", response_model=UploadView, tags=["uploads"],
             responses=errors(*authed, 404))
    def get_upload(upload_id: str = upload_id_param, user: str = Depends(current_user)) -> UploadView:
        return UploadView.of(server.uploads.own(user, upload_id))

    @app.put(
        API_PREFIX + "/uploads/{upload_id}/chunks", response_model=UploadView, tags=["uploads"],
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
        responses=errors(*authed, 400, 404, 409, 413, 507,
                         _409="wrong offset (resume from the `Upload-Offset` header), the upload accepts no more "
                              "data, or another chunk of it is being written",
                         _422="the chunk failed its SHA-256 or CRC32 check, or a header is malformed"),
    )
    async def put_chunk(request: Request, upload_id: str = upload_id_param,
                        offset: int = Query(..., ge=0, le=1 << 50, description="byte offset of this chunk"),
                        x_chunk_sha256: Optional[str] = Header(None, max_length=128,
                                                                description="SHA-256 (hex) of this chunk"),
                        x_chunk_crc32: Optional[str] = Header(None, max_length=16,
                                                               description="or its CRC32 (8 hex digits)"),
                        user: str = Depends(current_user)) -> UploadView:
        length = request.headers.get("content-length")
        content_length = int(length) if length and length.isdigit() and len(length) < 20 else None
        try:
            record = await server.uploads.write_chunk(user, upload_id, offset, request.stream(), content_length,
                                                      x_chunk_sha256, x_chunk_crc32)
        except ClientDisconnect:
            raise ApiError(400, "the connection dropped during the chunk; query the offset and resume") from None
        return UploadView.of(record)

    @app.post(API_PREFIX + "/uploads/{upload_id}/complete", response_model=UploadView, status_code=202,
              tags=["uploads"], responses=errors(*authed, 404, 409, 507,
                                                 _422="the whole file failed its SHA-256 check"))
    def complete_upload(upload_id: str = upload_id_param, user: str = Depends(current_user)) -> UploadView:
        return UploadView.of(server.uploads.complete(user, upload_id))

    @app.delete(API_PREFIX + "/uploads/{upload_id}", status_code=204, tags=["uploads"],
                responses=errors(*authed, 404, 409))
    def delete_upload(upload_id: str = upload_id_param, user: str = Depends(current_user)) -> None:
        server.uploads.delete(user, upload_id, server.queue)

    # -- jobs -----------------------------------------------------------------------------------
    def submit(kind: str, params: Any, user: str, key: Optional[str]) -> Any:
        job, created = server.queue.submit(user, kind, params, key)
        view = server.queue.view(job)
        return view if created else JSONResponse(asdict(view), status_code=200)

    key_header = Header(None, alias="Idempotency-Key", max_length=200,
                        description="a retried request with the same key returns the first job instead of a new one")
    submit_errors = {200: {"model": JobView, "description": "a retry with the same Idempotency-Key: the first job"},
                     **errors(*authed, 404, 409, 429,
                              _422="a parameter cannot run (the request record's rules), the upload is of another "
                                   "kind, or the Idempotency-Key was used for another request")}

    def request_body(kind: str) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(kind)}}}}

    def parse(kind: str, body: Any) -> Any:
        """The kind's request record from the JSON body: its own checks decide (422 with its words)."""
        try:
            return PARAMS_TYPES[kind].from_dict(body)
        except AutoNNUNetError as error:
            raise ApiError(422, f"invalid request: {error}") from None

    @app.post(API_PREFIX + "/jobs/search", response_model=JobView, status_code=201, tags=["jobs"],
              responses=submit_errors, openapi_extra=request_body("search"))
    def submit_search(body: dict[str, Any] = Body(...), user: str = Depends(current_user),
                      idempotency_key: Optional[str] = key_header) -> Any:
        return submit("search", parse("search", body), user, idempotency_key)

    @app.post(API_PREFIX + "/jobs/train", response_model=JobView, status_code=201, tags=["jobs"],
              responses=submit_errors, openapi_extra=request_body("train"))
    def submit_train(body: dict[str, Any] = Body(...), user: str = Depends(current_user),
                     idempotency_key: Optional[str] = key_header) -> Any:
        return submit("train", parse("train", body), user, idempotency_key)

    @app.post(API_PREFIX + "/jobs/predict", response_model=JobView, status_code=201, tags=["jobs"],
              responses=submit_errors, openapi_extra=request_body("predict"))
    def submit_predict(body: dict[str, Any] = Body(...), user: str = Depends(current_user),
                       idempotency_key: Optional[str] = key_header) -> Any:
        return submit("predict", parse("predict", body), user, idempotency_key)

    @app.post(API_PREFIX + "/jobs/select", response_model=JobView, status_code=201, tags=["jobs"],
              responses=submit_errors, openapi_extra=request_body("select"))
    def submit_select(body: dict[str, Any] = Body(...), user: str = Depends(current_user),
                      idempotency_key: Optional[str] = key_header) -> Any:
        return submit("select", parse("select", body), user, idempotency_key)

    @app.get(API_PREFIX + "/jobs", response_model=list[JobView], tags=["jobs"], responses=errors(*authed))
    def list_jobs(state: Optional[JobState] = Query(None, description="only jobs in this state"),
                  offset: int = Query(0, ge=0, le=1 << 40, description="skip this many jobs (paging)"),
                  limit: int = Query(JOBS_PAGE, ge=1, le=MAX_JOBS_PAGE,
                                     description="at most this many jobs; page on with offset + limit"),
                  user: str = Depends(current_user)) -> list[JobView]:
        return server.queue.list_views(user, state, offset, limit)

    @app.get(API_PREFIX + "/jobs/{job_id}", response_model=JobView, tags=["jobs"], responses=errors(*authed, 404))
    def get_job(job_id: str = job_id_param, user: str = Depends(current_user)) -> JobView:
        return server.queue.view(server.queue.own(user, job_id))

    @app.post(API_PREFIX + "/jobs/{job_id}/cancel", response_model=JobView, tags=["jobs"],
              responses=errors(*authed, 404))
    def cancel_job(job_id: str = job_id_param, user: str = Depends(current_user)) -> JobView:
        return server.queue.view(server.queue.cancel(user, job_id))

    @app.delete(API_PREFIX + "/jobs/{job_id}", status_code=204, tags=["jobs"], responses=errors(*authed, 404, 409))
    def delete_job(job_id: str = job_id_param, user: str = Depends(current_user)) -> None:
        server.queue.delete(user, job_id)

    @app.get(API_PREFIX + "/jobs/{job_id}/log", response_model=LogChunk, tags=["jobs"],
             responses=errors(*authed, 404))
    def job_log(job_id: str = job_id_param, offset: int = Query(0, ge=0, le=1 << 50),
                limit: int = Query(65536, ge=1, le=4 * MiB), user: str = Depends(current_user)) -> LogChunk:
        job = server.queue.own(user, job_id)
        path = server.paths.job(job.id) / LOG_NAME
        size = path.stat().st_size if path.exists() else 0
        data, _ = read_log(path, offset, limit)
        text, used = _decode_text(data)
        next_offset = offset + used
        return LogChunk(offset, next_offset, size, text, job.state in FINAL_JOB_STATES and next_offset >= size)

    @app.get(API_PREFIX + "/jobs/{job_id}/events", response_model=EventsChunk, tags=["jobs"],
             responses=errors(*authed, 404))
    def job_events(job_id: str = job_id_param, offset: int = Query(0, ge=0, le=1 << 50),
                   limit: int = Query(1 << 20, ge=1024, le=16 * MiB, description="bytes of events to read at most"),
                   user: str = Depends(current_user)) -> EventsChunk:
        job = server.queue.own(user, job_id)
        path = server.paths.job(job.id) / EVENTS_NAME
        events, next_offset = read_events_page(path, offset, limit)
        size = path.stat().st_size if path.exists() else 0
        return EventsChunk([{"kind": e.kind, "time": e.time, "data": e.data} for e in events], next_offset,
                           job.state in FINAL_JOB_STATES and next_offset >= size)

    @app.get(API_PREFIX + "/jobs/{job_id}/artifacts", response_model=list[Artifact], tags=["jobs"],
             responses=errors(*authed, 404))
    def job_artifacts(job_id: str = job_id_param, user: str = Depends(current_user)) -> list[Artifact]:
        return server.queue.own(user, job_id).artifacts

    @app.get(API_PREFIX + "/jobs/{job_id}/artifacts/{name}", tags=["jobs"],
             responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}},
                              "description": "the file; `X-Checksum-SHA256` header, Range requests supported"},
                        206: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}},
                              "description": "partial content (Range)"},
                        416: {"description": "the Range is outside the file"},
                        **errors(*authed, 404)})
    def download_artifact(job_id: str = job_id_param, name: str = PathParam(..., max_length=100),
                          user: str = Depends(current_user)) -> Any:
        job = server.queue.own(user, job_id)
        artifact = next((a for a in job.artifacts if a.name == name), None)
        if artifact is None:
            raise ApiError(404, f"job {job_id} has no artifact {name!r}"
                                + ("" if job.state == "succeeded" else f" (the job is {job.state})"))
        path = server.paths.job(job.id) / ARTIFACTS_DIR / artifact.name
        return FileResponse(path, filename=artifact.name, media_type="application/octet-stream",
                            headers={"X-Checksum-SHA256": artifact.sha256, "ETag": f'"{artifact.sha256}"'})

    return app
