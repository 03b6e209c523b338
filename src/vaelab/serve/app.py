"""The HTTP API of `vaelab serve`: a FastAPI app over one run directory (vaelab.serve.served.ServedRun).

FastAPI on uvicorn: the OpenAPI document (/openapi.json) and browsable docs (/docs) come with the routes, pydantic
checks each body's fields before a route sees it, and the app is plain ASGI, so any ASGI server can run it.

Every error is answered as JSON {"error": "..."}: 422 for a body the server cannot use (wrong shape, dtype, a NaN,
a label the model does not take, a field it does not know), 404 for what does not exist (a route, a test row, a
picture), 413 for a body over the size limit, 401 for a missing or wrong token, 409 when the run's data is not
available. A request never takes the server down: anything unexpected is a 500 with its message.
"""

from __future__ import annotations

import hmac
import json
import math
from pathlib import Path
from typing import Literal, Optional, Union

from vaelab.errors import ConfigError, VaelabError
from vaelab.serve.served import DEFAULT_MAX_BATCH, LATENT_MAP_DEFAULT, RequestError, ServedRun

STATIC = Path(__file__).resolve().parent / "static"

try:  # the serve extra; vaelab.serve.create_app says what to install when it is missing
    from fastapi import FastAPI, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
    from starlette.exceptions import HTTPException
except ImportError as e:  # pragma: no cover - exercised by an environment without the extra
    raise ConfigError(f"`vaelab serve` needs FastAPI and uvicorn ({e.name} is missing): pip install "
                      "\"vaelab[serve]\"", "setup") from None

Label = Optional[Union[StrictInt, list[StrictInt]]]
Format = Literal["array", "png"]
ARRAY = "nested lists of numbers, row-major"


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class Inputs(Body):
    x: Optional[list] = Field(None, description=f"inputs (B, *input_shape) in data space, {ARRAY}; or png")
    png: Optional[list[StrictStr]] = Field(None, description="inputs as base64 PNG images of the model's size")


class EncodeRequest(Inputs):
    label: Label = Field(None, description="class index (one for all rows, or one per row): conditional models")


class ReconstructRequest(EncodeRequest):
    format: Format = "array"


class DecodeRequest(Body):
    z: list = Field(..., description=f"latent points (B, *latent_shape), {ARRAY}")
    label: Label = Field(None, description="class index (one for all rows, or one per row): conditional models")
    format: Format = Field("array", description="array: {\"x\": (B, *input_shape)}; png: base64 PNG images")


class DecodeCodesRequest(Body):
    indices: list = Field(..., description="VQ-VAE code indices (B, *code_grid), integers in [0, codebook_size)")
    format: Format = "array"


class SampleRequest(Body):
    n: StrictInt = Field(..., description="number of samples, 1..max_batch")
    seed: StrictInt = 0
    label: Optional[StrictInt] = None
    format: Format = "array"


class InterpolateRequest(Body):
    z0: Optional[list] = Field(None, description="start point (*latent_shape); or index0")
    z1: Optional[list] = Field(None, description="end point (*latent_shape); or index1")
    index0: Optional[StrictInt] = Field(None, description="start at this test row's posterior mean")
    index1: Optional[StrictInt] = Field(None, description="end at this test row's posterior mean")
    steps: StrictInt = Field(10, description="frames, the two ends included (>= 2)")
    label: Optional[StrictInt] = None
    format: Format = "array"


class TraverseRequest(Body):
    z: Optional[list] = Field(None, description="the point to move from (latent_dim,); or index")
    index: Optional[StrictInt] = Field(None, description="move from this test row's posterior mean")
    dim: StrictInt = Field(..., description="the latent dimension to vary")
    values: Optional[list] = Field(None, description="the values z[dim] takes [default 11 values in -3..3]")
    label: Optional[StrictInt] = None
    format: Format = "array"


class ScoreRequest(Inputs):
    kind: Optional[StrictStr] = Field(None, description="recon | elbo | iwae | latent | gmm | zrecon | combined "
                                                        "[default elbo, or recon for models without a posterior]; "
                                                        "latent, gmm, zrecon and combined are fitted on the run's "
                                                        "training split")


def _json(obj, status: int = 200) -> Response:
    # json.dumps straight away: FastAPI's jsonable_encoder walks every number of a large array in Python
    return Response(json.dumps(obj, separators=(",", ":"), allow_nan=False), status_code=status,
                    media_type="application/json")


def _error(message: str, status: int, headers=None) -> Response:
    r = _json({"error": message}, status)
    if headers:
        r.headers.update(headers)
    return r


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            parts.append("the body is not valid JSON; send a JSON object")
            continue
        if err.get("type") == "missing":
            parts.append(f"{loc}: missing; this field is required")
            continue
        if err.get("type") == "extra_forbidden":
            parts.append(f"{loc}: not a field of this request (see /docs for the fields it takes)")
            continue
        parts.append(f"{loc}: {err.get('msg')}" + (f", got {err['input']!r}"[:200] if "input" in err and
                                                    not isinstance(err["input"], (dict, list)) else ""))
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_app(run_dir, *, token: str | None = None, max_batch: int = DEFAULT_MAX_BATCH, trust_code: bool = False,
               data_dir: str | None = None, max_body: int | None = None) -> FastAPI:
    """The ASGI app serving the run in `run_dir` (loaded once, here). token: every request must carry it
    (`Authorization: Bearer TOKEN`, `?token=TOKEN`, or the cookie a `?token=` request sets). max_batch: the most
    rows one request may carry. max_body: the largest body in bytes [default room for max_batch inputs as JSON]."""
    served = ServedRun(run_dir, trust_code=trust_code, max_batch=max_batch, data_dir=data_dir)
    if max_body is None:  # ~24 bytes a number as JSON text, for max_batch inputs, plus room for the rest
        max_body = max_batch * math.prod(served.input_shape) * 24 + (1 << 20)
    if token is not None and not token:
        raise VaelabError("the token is empty; give a non-empty --token (or none, on a loopback address)")

    app = FastAPI(title="vaelab serve", version=_version(),
                  description=f"The model of run {served.run_dir.name!r} ({served.model.config.model}) over HTTP. "
                              f"Arrays are nested JSON lists in data space; at most {max_batch} rows per request; "
                              "errors are {\"error\": message}.")
    app.state.served = served

    _error_handlers(app)
    _page_and_run_routes(app, served)
    _model_routes(app, served)
    _test_split_routes(app, served)

    # the outermost layers: the token first, then the body's size (a request without the token is not read)
    app.add_middleware(BodyLimit, max_body=max_body)
    if token is not None:
        app.add_middleware(TokenCheck, token=token)
    return app


def _error_handlers(app) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return _error(_validation_message(exc), 422)

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        message = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else \
            f"no such route or file: {request.url.path} (the API's routes are listed at /docs)"
        return _error(str(message), exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(RequestError)
    async def _refused(request, exc):
        return _error(str(exc), exc.status)

    @app.exception_handler(VaelabError)
    async def _vaelab(request, exc):  # the model's own checks (vaelab.generation, the models): the request's fault
        return _error(str(exc), 422)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500)


def _page_and_run_routes(app, served: ServedRun) -> None:
    # ---------------------------------------------------------------------------------------- the page

    @app.get("/", include_in_schema=False)
    def page():
        index = STATIC / "index.html"
        if not index.is_file():
            return _error("the explorer page is not installed (vaelab/serve/static/index.html is missing); the API "
                          "under /api works, see /docs", 404)
        return FileResponse(index, media_type="text/html")

    @app.get("/static/{path:path}", include_in_schema=False)
    def static(path: str):
        root = STATIC.resolve()
        file = (root / path).resolve()
        if root not in file.parents or not file.is_file():  # never a file outside the static folder
            return _error(f"no static file {path!r}", 404)
        return FileResponse(file)

    # ---------------------------------------------------------------------------------------- the run

    @app.get("/api/info", summary="the run's model, shapes, capabilities, classes and limits")
    def info():
        return _json(served.info())

    @app.get("/api/metrics", summary="the rows of the run's metrics.jsonl")
    def metrics():
        return _json(served.metrics())

    @app.get("/api/pictures", summary="the PNG files of the run directory")
    def pictures():
        return _json(served.pictures())

    @app.get("/api/pictures/{name}", summary="one PNG file of the run directory", response_class=FileResponse)
    def picture(name: str):
        return FileResponse(served.picture_path(name), media_type="image/png")


def _model_routes(app, served: ServedRun) -> None:
    # ------------------------------------------------------------------------------------- the model

    @app.post("/api/encode", summary="posterior means (and log-variances, VQ code indices) of inputs")
    def encode(body: EncodeRequest):
        return _json(served.encode(body.x, body.png, body.label))

    @app.post("/api/decode", summary="decode latent points: model.decode(z, label)")
    def decode(body: DecodeRequest):
        return _json(served.decode(body.z, body.label, body.format))

    @app.post("/api/decode-codes", summary="decode VQ-VAE code grids")
    def decode_codes(body: DecodeCodesRequest):
        return _json(served.decode_codes(body.indices, body.format))

    @app.post("/api/reconstruct", summary="decode the posterior means of inputs")
    def reconstruct(body: ReconstructRequest):
        return _json(served.reconstruct(body.x, body.png, body.label, body.format))

    @app.post("/api/sample", summary="n samples from the prior (seeded)")
    def sample(body: SampleRequest):
        return _json(served.sample(body.n, body.seed, body.label, body.format))

    @app.post("/api/interpolate", summary="a straight latent path between two points or two test rows")
    def interpolate(body: InterpolateRequest):
        return _json(served.interpolate(body.z0, body.z1, body.index0, body.index1, body.steps, body.label,
                                        body.format))

    @app.post("/api/traverse", summary="vary one latent dimension around a point or a test row")
    def traverse(body: TraverseRequest):
        return _json(served.traverse(body.z, body.index, body.dim, body.values, body.label, body.format))

    @app.post("/api/score", summary="anomaly scores of inputs (higher = more anomalous)")
    def score(body: ScoreRequest):
        return _json(served.score(body.x, body.png, body.kind))


def _test_split_routes(app, served: ServedRun) -> None:
    # ------------------------------------------------------------------------------------ the test split

    @app.get("/api/latent-map", summary="the test split's codes as 2-D points (identity or PCA)")
    def latent_map(n: int = Query(LATENT_MAP_DEFAULT, ge=1, description="the first n test rows")):
        return _json(served.latent_map(n))

    @app.get("/api/kl", summary="average KL per latent dimension on the test split, largest first")
    def kl():
        return _json(served.kl())

    @app.get("/api/test-image/{index}", summary="test row `index` as a PNG image", response_class=Response)
    def test_image(index: int):
        return Response(served.test_image_png(index), media_type="image/png")

    @app.get("/api/scores", summary="anomaly scores of the test split, with its labels")
    def scores(kind: Optional[str] = Query(None, description="recon | elbo | iwae | latent")):
        return _json(served.test_scores(kind))


class BodyLimit:
    """Answers 413 to a body over `max_body` bytes: at once when Content-Length says so, else as soon as the
    streamed body passes the limit (nothing more is read)."""

    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_body
        message = (f"the request body is larger than this server's limit of {limit} bytes; send fewer rows per "
                   "request (the limit follows --max-batch)")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await _error(message, 413)(scope, receive, send)
        # read the whole body here (the route would anyway), stopping as soon as it passes the limit, then hand
        # it on: an exception raised from inside the route's own reading would turn into FastAPI's 400
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await _error(message, 413)(scope, receive, send)
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would say

        await self.app(scope, replay, send)


class TokenCheck:
    """Every request must carry the token: `Authorization: Bearer TOKEN`, `?token=TOKEN` (a link to the page; the
    answer then sets a cookie, so that the page's own requests and /docs carry it too) or that cookie. The
    comparison takes the same time wherever the strings differ (hmac.compare_digest)."""

    COOKIE = "vaelab_token"

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    def _ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from http.cookies import SimpleCookie
        from urllib.parse import parse_qs

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        auth = headers.get("authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
        cookie = None
        if "cookie" in headers:
            try:
                jar = SimpleCookie(headers["cookie"])
                cookie = jar[self.COOKIE].value if self.COOKIE in jar else None
            except Exception:  # a malformed Cookie header counts as none
                cookie = None
        if not (self._ok(bearer) or self._ok(query) or self._ok(cookie)):
            why = "a wrong token" if (bearer or query or cookie) else "no token"
            return await _error(f"this server needs its token and the request carried {why}: send the header "
                                "'Authorization: Bearer TOKEN' (or add ?token=TOKEN to the address)", 401,
                                {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if not self._ok(query):
            return await self.app(scope, receive, send)
        value = f"{self.COOKIE}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict"

        async def send_with_cookie(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), (b"set-cookie", value.encode("latin-1"))]}
            await send(msg)

        await self.app(scope, receive, send_with_cookie)


def _version() -> str:
    from vaelab import __version__

    return __version__
