"""The HTTP API (FastAPI): image generation per character, the character list, health, readiness and metrics.

Every refusal is a 4xx with a reason (401 key, 403 namespace, 404 character or version, 409 artifact refused,
422 parameters with the field named, 429 queue full) or a 503 while storage is unreachable; never a 500 for bad
input. Generation runs on the pipeline worker; the handler only awaits its future.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import time
from typing import Annotated, Any, Literal

import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from charlora.api.base import VersionName
from charlora.api.serving import ServingEntry
from charlora_inference.loras import FetchedLoRA, LoRARefused, LoRAUnavailable, VersionNotFound
from charlora_inference.pipelines import FreeU, GenerationJob, QueueFull
from charlora_inference.serving import InferenceServer
from charlora_inference.tenants import ApiKey, Tenants

MAX_SEED = 2**63 - 1


class FreeUParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    s1: float = Field(ge=0, le=3, description="Skip-feature scale, first stage.")
    s2: float = Field(ge=0, le=3, description="Skip-feature scale, second stage.")
    b1: float = Field(ge=0, le=3, description="Backbone-feature scale, first stage.")
    b2: float = Field(ge=0, le=3, description="Backbone-feature scale, second stage.")


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    character: str = Field(
        min_length=1, max_length=317, description="namespace/name, or name alone with a single-namespace key."
    )
    version: VersionName | None = Field(default=None, description="A version other than the served one (e.g. v1).")
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str = Field(default="", max_length=4000)
    n: int = Field(default=1, ge=1, le=64, description="Number of images; image i uses seed + i.")
    width: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    height: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    steps: int = Field(default=30, ge=1, le=150)
    cfg_scale: float = Field(default=7.0, ge=0, le=30)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED - 64, description="Unset: a random seed, reported.")
    lora_scale: float = Field(default=1.0, ge=-4, le=4)
    freeu: bool | FreeUParams | None = Field(
        default=None, description="null: the server default; false: off; true: the family's defaults; or values."
    )
    response_format: Literal["b64_json", "png"] = Field(
        default="b64_json", description="png returns image/png and needs n = 1."
    )


def _field_error(field: str, message: str) -> HTTPException:
    # The same shape FastAPI gives its own validation errors, so clients parse one format.
    return HTTPException(422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


def encode_png(image: Image.Image, provenance: dict[str, str]) -> bytes:
    info = PngInfo()
    for key, value in provenance.items():
        info.add_text(key, value)
    info.add_text("charlora", json.dumps(provenance, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def resolve(server: InferenceServer, *, caller: ApiKey | None, character: str) -> ServingEntry:
    """The table entry a request names, after the caller's namespace check (403) and existence check (404)."""
    metrics = server.metrics
    if "/" in character:
        namespace, _, name = character.partition("/")
    elif caller is not None and caller.only_namespace is not None:
        namespace, name = caller.only_namespace, character
    else:
        raise _field_error("character", "name the namespace: namespace/name")
    if caller is not None and not caller.reaches(namespace):
        metrics.rejected.labels(status="403").inc()
        raise HTTPException(403, detail=f"this key does not reach namespace {namespace!r}")
    entry = server.table.get(f"{namespace}/{name}")
    if entry is None:
        metrics.rejected.labels(status="404").inc()
        raise HTTPException(404, detail=f"character {namespace}/{name} is not served here")
    return entry


def provenance(server: InferenceServer, job: GenerationJob, *, index: int) -> dict[str, str]:
    """The PNG text chunks of image ``index``: enough to reproduce it exactly."""
    entry = job.lora.entry
    assert server.pipeline is not None
    return {
        "base_model": str(server.settings.base_uri or server.settings.base_dir),
        "base_model_family": server.settings.base_family,
        "base_model_version": server.settings.base_version,
        "character": entry.key,
        "lora_version": entry.version,
        "lora_epoch": "" if entry.epoch is None else str(entry.epoch),
        "lora_sha256": entry.sha256,
        "lora_scale": repr(job.lora_scale),
        "seed": str(job.seed + index),
        "steps": str(job.steps),
        "cfg_scale": repr(job.cfg_scale),
        "width": str(job.width),
        "height": str(job.height),
        "scheduler": server.pipeline.scheduler_class,
        "dtype": server.settings.dtype,
        "freeu": "off" if job.freeu is None else json.dumps(job.freeu.__dict__),
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
    }


def pick_freeu(server: InferenceServer, value: bool | FreeUParams | None) -> FreeU | None:
    if value is None:
        return server.default_freeu()
    if value is True:
        return server.family_freeu()
    if value is False:
        return None
    return FreeU(value.s1, value.s2, value.b1, value.b2)


async def fetch_lora(server: InferenceServer, entry: ServingEntry, *, version: str | None) -> FetchedLoRA:
    """The verified LoRA of the entry (or of another version of its character), mapped to HTTP errors."""
    metrics = server.metrics
    assert server.fetcher is not None
    fetcher = server.fetcher
    try:
        if version is not None and version != entry.version:
            entry = await run_in_threadpool(fetcher.entry_for_version, entry, version)
        return await run_in_threadpool(fetcher.fetch, entry)
    except VersionNotFound as err:
        metrics.rejected.labels(status="404").inc()
        raise HTTPException(404, detail=f"version {version} of {entry.key} does not exist") from err
    except LoRARefused as err:
        metrics.rejected.labels(status="409").inc()
        raise HTTPException(409, detail=f"LoRA refused: {err}") from err
    except LoRAUnavailable as err:
        metrics.rejected.labels(status="503").inc()
        raise HTTPException(503, detail=f"LoRA unavailable: {err}", headers={"Retry-After": "2"}) from err


def authenticate(request: Request, authorization: Annotated[str | None, Header()] = None) -> ApiKey | None:
    """The caller's key (401 without a known one); None when the app runs without keys."""
    tenants: Tenants | None = request.app.state.tenants
    if tenants is None:
        return None
    raw = authorization.removeprefix("Bearer ").strip() if authorization else None
    key = tenants.authenticate(raw)
    if key is None:
        request.app.state.server.metrics.rejected.labels(status="401").inc()
        raise HTTPException(401, detail="missing or unknown API key", headers={"WWW-Authenticate": "Bearer"})
    return key


Caller = Annotated[ApiKey | None, Depends(authenticate)]


def check_limits(server: InferenceServer, body: GenerationRequest) -> None:
    """The server's own limits, beyond the request schema (422 naming the field)."""
    if body.response_format == "png" and body.n != 1:
        raise _field_error("n", "response_format png returns one image: use n = 1 or b64_json")
    if body.n > server.settings.max_images:
        raise _field_error("n", f"at most {server.settings.max_images} images per request")
    if body.width * body.height > server.settings.max_pixels:
        raise _field_error("width", f"width x height must be at most {server.settings.max_pixels} pixels")


def describe(server: InferenceServer, caller: ApiKey | None) -> dict[str, Any]:
    """The base model, scheduler, precision and the caller's characters with the tier each LoRA sits in."""
    assert server.pipeline is not None
    rows = [
        {
            "character": entry.key,
            "version": entry.version,
            "epoch": entry.epoch,
            "sha256": entry.sha256,
            "pinned": entry.pinned,
            "tier": server.tier_of(entry),
            "refused": server.refused.get(entry.sha256),
        }
        for entry in server.table.entries()
        if caller is None or caller.reaches(entry.namespace)
    ]
    freeu = server.default_freeu()
    return {
        "baseModel": {
            "family": server.settings.base_family,
            "version": server.settings.base_version,
            "uri": server.settings.base_uri or str(server.settings.base_dir),
        },
        "scheduler": server.pipeline.scheduler_class,
        "dtype": server.settings.dtype,
        "freeuDefault": None if freeu is None else freeu.__dict__,
        "characters": rows,
    }


async def run_generation(server: InferenceServer, body: GenerationRequest, *, caller: ApiKey | None) -> Response:
    """Admits a request (limits, namespace, table row, queue), runs it on the pipeline worker, encodes the PNGs."""
    metrics = server.metrics
    check_limits(server, body)
    entry = resolve(server, caller=caller, character=body.character)
    if not server.ready.is_set():
        raise HTTPException(503, detail="not ready: " + "; ".join(server.waiting_for))
    assert server.worker is not None
    assert server.pipeline is not None
    if server.worker.full():
        metrics.rejected.labels(status="429").inc()
        raise HTTPException(429, detail="the request queue is full; retry later", headers={"Retry-After": "1"})
    metrics.in_progress.inc()
    try:
        lora = await fetch_lora(server, entry, version=body.version)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
        job = GenerationJob(
            lora=lora,
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            n=body.n,
            width=body.width,
            height=body.height,
            steps=body.steps,
            cfg_scale=body.cfg_scale,
            seed=seed,
            lora_scale=body.lora_scale,
            freeu=pick_freeu(server, body.freeu),
        )
        pipeline = server.pipeline
        try:
            future = server.worker.submit(lambda: pipeline.generate(job))
        except QueueFull as err:
            metrics.rejected.labels(status="429").inc()
            raise HTTPException(429, detail=str(err), headers={"Retry-After": "1"}) from err
        try:
            images = await asyncio.wrap_future(future)
        except LoRARefused as err:
            metrics.rejected.labels(status="409").inc()
            raise HTTPException(409, detail=f"LoRA refused: {err}") from err
        except torch.cuda.OutOfMemoryError as err:
            # Too large a request for what the GPU has free now: the client may retry smaller or later.
            torch.cuda.empty_cache()
            metrics.rejected.labels(status="503").inc()
            raise HTTPException(503, detail="out of GPU memory for this request", headers={"Retry-After": "2"}) from err
        pngs = await run_in_threadpool(
            lambda: [encode_png(image, provenance(server, job, index=index)) for index, image in enumerate(images)]
        )
    finally:
        metrics.in_progress.dec()
    served = job.lora.entry
    headers = {
        "X-Charlora-Character": served.key,
        "X-Charlora-Version": served.version,
        "X-Charlora-Seed": str(seed),
        "X-Charlora-Scheduler": pipeline.scheduler_class,
    }
    if body.response_format == "png":
        return Response(content=pngs[0], media_type="image/png", headers=headers)
    return JSONResponse(
        {
            "created": int(time.time()),
            "character": served.key,
            "version": served.version,
            "epoch": served.epoch,
            "sha256": served.sha256,
            "seed": seed,
            "scheduler": pipeline.scheduler_class,
            "data": [
                {"b64_json": base64.b64encode(png).decode(), "seed": seed + index} for index, png in enumerate(pngs)
            ],
        },
        headers=headers,
    )


def build_app(server: InferenceServer, *, tenants: Tenants | None) -> FastAPI:
    """The FastAPI app around a started ``InferenceServer``. ``tenants=None`` disables keys (local runs only)."""
    app = FastAPI(
        title="charlora inference",
        description="One base model, many characters: LoRAs switched per request.",
        version="v1",
    )
    metrics = server.metrics
    app.state.server = server
    app.state.tenants = tenants

    @app.post("/v1/images/generations", response_model=None)
    async def generate(body: GenerationRequest, caller: Caller) -> Response:
        started = time.perf_counter()
        try:
            response = await run_generation(server, body, caller=caller)
        except HTTPException as err:
            metrics.request_seconds.labels(status=str(err.status_code)).observe(time.perf_counter() - started)
            raise
        metrics.request_seconds.labels(status="200").observe(time.perf_counter() - started)
        return response

    @app.get("/v1/characters")
    async def characters(caller: Caller) -> dict[str, Any]:
        return describe(server, caller)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    async def readyz() -> Response:
        if server.ready.is_set():
            return JSONResponse({"ready": True, "refused": server.refused})
        return JSONResponse({"ready": False, "waitingFor": server.waiting_for}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, err: QueueFull) -> Response:
        return JSONResponse({"detail": str(err)}, status_code=429)

    return app
