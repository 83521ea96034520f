"""The HTTP API, a thin router: OpenAI-compatible completions, chat and models; vLLM's adapter
endpoints; probes and metrics.

Each route parses the body into its request model, calls one method of
:class:`~.serving.OpenAIServing` (which owns the logic) and wraps the result in a response;
errors are :class:`~.errors.APIError`, rendered in OpenAI's format by the handlers below.
Nothing here waits on torch.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import NOT_FOUND, SERVER_ERROR, APIError, from_validation_error
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
from .serving import CHAT, COMPLETIONS, OpenAIServing

if TYPE_CHECKING:
    from .backend import ServingBackend

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
router = APIRouter()


def build_app(server: ServingBackend) -> FastAPI:
    app = FastAPI(title="kubetune model server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.state.serving = OpenAIServing(server)
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(router)
    return app


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


def _server(request: Request) -> ServingBackend:
    return request.app.state.server


# -------------------------------------------------------------------- errors


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error(exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = NOT_FOUND if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return _error(APIError(exc.status_code, message, type=kind))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(APIError(400, f"invalid request: {exc.errors()[0].get('msg')}"))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return _error(APIError(500, f"internal server error: {exc}", type=SERVER_ERROR))


async def _parse(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


# -------------------------------------------------------------------- probes and metrics


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    server = _server(request)
    if server.fatal is not None:
        return JSONResponse({"status": "failed", "error": str(server.fatal)}, status_code=503)
    if not server.engine.running:
        return JSONResponse(
            {"status": "failed", "error": "the engine thread is not running"}, status_code=503
        )
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    ok, detail = _server(request).readiness()
    return JSONResponse(detail, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_server(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


# -------------------------------------------------------------------- models


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": _serving(request).cards()})


@router.get("/v1/models/{model_id}")
async def get_model(request: Request, model_id: str) -> JSONResponse:
    return JSONResponse(_serving(request).card(model_id))


# -------------------------------------------------------------------- generation


async def _generate(request: Request, endpoint: str, cls: type[Any]) -> Response:
    serving = _serving(request)
    try:
        req = await _parse(request, cls)
    except APIError as exc:
        serving.count_refused(endpoint, exc)
        raise
    result = await serving.generate(endpoint, req)
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post(COMPLETIONS)
async def completions(request: Request) -> Response:
    return await _generate(request, COMPLETIONS, CompletionRequest)


@router.post(CHAT)
async def chat_completions(request: Request) -> Response:
    return await _generate(request, CHAT, ChatCompletionRequest)


# -------------------------------------------------------------------- adapters (vLLM's endpoints)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> Response:
    req = await _parse(request, LoadLoraAdapterRequest)
    return PlainTextResponse(await _serving(request).load_adapter(req))


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> Response:
    req = await _parse(request, UnloadLoraAdapterRequest)
    return PlainTextResponse(await _serving(request).unload_adapter(req))
