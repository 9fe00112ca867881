"""A site's HTTP search service over its index (:mod:`hashing.retrieval`): ``fedhash serve``.

Routes (JSON unless said; every error is ``{"detail": "<one line: what is wrong and the fix>"}``)::

    GET    /health              no auth: {"status": "ok", "count", "model_version", "bits"}
    GET    /                    no auth: the search page (it asks for the token and sends it as a bearer header)
    POST   /search              bearer: a query image (multipart field ``image``, or a raw image/* body), or
                                JSON {"codes": [hex of packed codes, one per query], "model_version", "k"};
                                query parameters k (1..1000) and asymmetric (image queries only)
    GET    /items/{id}          bearer: the catalogue row of a content id (16 hex digits)
    GET    /items/{id}/image    bearer: a PNG thumbnail of it (at most 256 px a side)
    DELETE /items/{id}          bearer: remove it from the index and the catalogue (written to the audit log)

Every route but the two open ones needs ``Authorization: Bearer <token>`` (compared in constant time).
Uploads are bounded: the Content-Length is checked before anything is read, and the bytes actually read
are counted, so a body without a length (chunked) cannot grow past the limit either; images are refused
above :data:`MAX_QUERY_PIXELS` before they are decoded (a decompression bomb never expands); a search by
codes is bounded in queries and in queries x k.

Searches and deletes run in the thread pool side by side. A search encodes its image outside the index's
lock (several backbone passes overlap) and runs FAISS and reads the catalogue under it (the
:class:`~hashing.retrieval.SearchIndex` lock, which deletes hold too), so a search that starts after a
DELETE has returned never sees the removed image; another process's change is picked up by the
index's generation check on every search.

This module imports only hashing.*, FastAPI/Starlette/uvicorn, NumPy, PIL and the standard library.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from hashing import catalogue as C
from hashing.errors import CodeLengthError, DataError, FedhashError, ModelVersionError
from hashing.retrieval import SearchIndex, UnknownItemsError, open_index

log = logging.getLogger("fedhash.serve")

MAX_K = 1000
MAX_CODE_QUERIES, MAX_CODE_RESULTS = 1000, 100_000  # a codes search: queries, and queries x k, per request
MAX_QUERY_PIXELS = 40_000_000  # a 40-megapixel query decodes to 120 MB of RGB; larger ones are refused unread
THUMB_SIDE = 256
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the image, on top of max_upload_bytes
MAX_JSON_BYTES = 4 * 2**20
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")  # what PIL may try: no exotic decoders
TOKEN_FILE = "serve.token"
PAGE = Path(__file__).with_name("search_page.html")


class ServiceError(Exception):
    """An HTTP error with a one-line reason."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, _one_line(detail), headers


def _one_line(s: Any, limit: int = 400) -> str:
    t = " ".join(str(s).split())
    return t if len(t) <= limit else t[: limit - 3] + "..."


def _status_of(e: FedhashError) -> int:
    if isinstance(e, UnknownItemsError):
        return 404
    if isinstance(e, ModelVersionError):
        return 409
    if isinstance(e, CodeLengthError):
        return 422
    return 400


# --------------------------------------------------------------------------- the page


def _page() -> tuple[str, str]:
    """(the page's HTML, its Content-Security-Policy): the inline script and style are allowed by hash,
    nothing else is loaded from anywhere (images are blob: URLs the page makes from authorised fetches)."""
    html = PAGE.read_text("utf-8")

    def hashes(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                        for m in re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S))

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "img-src 'self' blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
    return html, csp


# --------------------------------------------------------------------------- bodies and images


async def _read_body(request: Request, limit: int, what: str, shown: int | None = None) -> bytes:
    """The request body, refused (413) past ``limit`` bytes: by its Content-Length before reading, and by
    the bytes read (a chunked body has no length). ``shown``: the limit the message names."""
    too_big = f"{what} is larger than the limit of {_mb(shown or limit)}; send a smaller one"
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise ServiceError(400, f"Content-Length {cl!r} is not a number; send a valid request") from None
        if n > limit:
            raise ServiceError(413, too_big + f" (Content-Length {n} bytes)")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ServiceError(413, too_big)
    return bytes(buf)


def _mb(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.3g} MiB"
    return f"{n / 2**10:.3g} KiB" if n >= 2**10 else f"{n} bytes"


async def _multipart_image(request: Request, body: bytes, max_bytes: int) -> bytes:
    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=8,
                                     max_part_size=64 * 1024).parse()
    except MultiPartException as e:
        raise ServiceError(400, f"the multipart body cannot be read ({e.message}); send one file in the field 'image'") from e
    try:
        f = form.get("image")
        if not isinstance(f, UploadFile):
            raise ServiceError(422, "no file in the multipart field 'image'; upload the query image as "
                                    "-F image=@query.png (or POST JSON {\"codes\": [...], \"model_version\": ...})")
        data = await f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ServiceError(413, f"the image is larger than the limit of {_mb(max_bytes)}; send a smaller one")
        return data
    finally:
        await form.close()


def decode_image(data: bytes, max_pixels: int = MAX_QUERY_PIXELS) -> np.ndarray:
    """An uploaded image's pixels (uint8 RGB), or a ServiceError: 415 for what is not an image, 413 for one
    too large to decode (its size is read from the header; a decompression bomb is never expanded)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ServiceError(415, "the uploaded file is empty; upload a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below, by size
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise ServiceError(413, "the image header claims more pixels than can be decoded safely (a decompression "
                                f"bomb?); send an image of at most {max_pixels // 10**6} megapixels") from e
    except UnidentifiedImageError:
        raise ServiceError(415, "the uploaded file is not an image this service can read; upload a PNG, JPEG, "
                                "BMP, TIFF, WebP or GIF file") from None
    except Exception as e:  # PIL raises many kinds for broken headers
        raise ServiceError(415, f"the uploaded image cannot be read ({type(e).__name__}: {e}); upload a valid "
                                "PNG or JPEG file") from e
    with im:
        w, h = im.size
        if w < 1 or h < 1:
            raise ServiceError(415, f"the uploaded image is {w}x{h} pixels; upload a non-empty image")
        if w * h > max_pixels:
            raise ServiceError(413, f"the image is {w}x{h} pixels, more than this service decodes "
                                    f"({max_pixels // 10**6} megapixels); downscale it and search again")
        try:
            px = np.asarray(im.convert("RGB"))
        except Exception as e:  # truncated or corrupt data after a valid header
            raise ServiceError(415, f"the uploaded image is damaged ({type(e).__name__}: {_one_line(e, 120)}); "
                                    "upload a complete PNG or JPEG file") from e
    return px


def thumbnail_png(px: np.ndarray, side: int = THUMB_SIDE) -> bytes:
    """PNG bytes of an image scaled to at most ``side`` pixels a side (tiny ones enlarged by whole
    factors, nearest neighbour, so their pixels stay sharp)."""
    from PIL import Image

    im = Image.fromarray(C.canonical_pixels(px))
    w, h = im.size
    m = max(w, h)
    if m > side:
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
    elif m * 2 <= side:
        f = side // m
        im = im.resize((w * f, h * f), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _parse_k(raw: Any, default: int) -> int:
    if raw is None or raw == "":
        return default
    if isinstance(raw, bool):
        raise ServiceError(422, f"k must be a whole number from 1 to {MAX_K}, got {raw!r}")
    try:
        k = int(raw)
        if isinstance(raw, float) and raw != k:
            raise ValueError
    except (TypeError, ValueError):
        raise ServiceError(422, f"k must be a whole number from 1 to {MAX_K}, got {raw!r}") from None
    if not 1 <= k <= MAX_K:
        raise ServiceError(422, f"k must be from 1 to {MAX_K}, got {k}")
    return k


def _parse_bool(raw: str | None, name: str) -> bool:
    if raw is None or raw == "":
        return False
    t = raw.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ServiceError(422, f"{name} must be true or false, got {raw!r}")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class _SecurityHeaders:
    """Pure ASGI middleware: no caching of answers (they show a site's images), no sniffing, no framing."""

    HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
               (b"x-frame-options", b"DENY"))

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                headers.extend(h for h in self.HEADERS if h[0] not in names)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------- the app


def make_app(index: SearchIndex, token: str, *, max_upload_bytes: int = 20 * 2**20, default_k: int = 10) -> FastAPI:
    """The HTTP API and search page of ``index``, guarded by the bearer ``token``."""
    if not isinstance(token, str) or len(token) < 16:
        raise FedhashError("the service's bearer token must be a string of at least 16 characters; "
                           "make one with python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    max_upload_bytes = int(max_upload_bytes)
    if max_upload_bytes < 1:
        raise FedhashError(f"max_upload_bytes must be >= 1, got {max_upload_bytes}")
    default_k = _parse_k(default_k, 10)
    secret = token.encode("utf-8")
    page, csp = _page()

    app = FastAPI(title="fedhash search", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.index = index

    # ------------------------------------------------------------------ errors: always one line
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)

    @app.exception_handler(FedhashError)
    async def _fedhash_error(request: Request, e: FedhashError):
        return JSONResponse({"detail": _one_line(e)}, status_code=_status_of(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"detail": _one_line(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'request'}: {err.get('msg')}"
                 for err in e.errors()]
        return JSONResponse({"detail": _one_line("; ".join(parts) or "invalid request")}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(e).__name__}); see the server log"}, status_code=500)

    app.add_middleware(_SecurityHeaders)

    def authorise(request: Request) -> None:
        h = request.headers.get("authorization")
        if not h:
            raise ServiceError(401, "no bearer token; send the header Authorization: Bearer <token> "
                                    "(the token is in the file fedhash serve names)", {"WWW-Authenticate": "Bearer"})
        scheme, _, given = h.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), secret):
            raise ServiceError(401, "wrong bearer token; send the token fedhash serve wrote for this index",
                               {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    # ------------------------------------------------------------------ open routes
    @app.get("/health")
    def health() -> dict[str, Any]:
        with index.lock:
            return {"status": "ok", "count": len(index), "model_version": index.model_version, "bits": index.bits}

    @app.get("/", response_class=HTMLResponse)
    def root() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": csp})

    # ------------------------------------------------------------------ search
    def search_image(px: np.ndarray, k: int, asymmetric: bool, t_decode: float, t0: float) -> dict[str, Any]:
        timings: dict[str, float] = {}
        # not under index.lock: SearchIndex.search encodes outside it and searches inside it, so several
        # searches overlap in their backbone pass while a DELETE still never races a search's FAISS step
        version = index.model_version
        (hits,) = index.search([px], k, asymmetric=asymmetric, timings=timings)
        out = {"model_version": version, "k": k, "asymmetric": asymmetric,
               "query": {"id": C.fmt_id(C.content_id(px)), "width": int(px.shape[1]), "height": int(px.shape[0])},
               "results": [[h.to_json() for h in hits]]}
        out["timings_ms"] = {"decode": _ms(t_decode), **{n: _ms(v) for n, v in timings.items()},
                             "total": _ms(time.perf_counter() - t0)}
        return out

    def search_codes(body: Any, k_query: str | None, t0: float) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ServiceError(422, 'the JSON body must be an object {"codes": [...], "model_version": "...", "k": 10}')
        codes, version = body.get("codes"), body.get("model_version")
        k = _parse_k(body["k"], default_k) if body.get("k") is not None else _parse_k(k_query, default_k)
        if not isinstance(version, str) or not version:
            raise ServiceError(422, "model_version is missing: say which model encoded the codes "
                                    "(GET /health names the index's model)")
        if not isinstance(codes, list) or not codes or not all(isinstance(c, str) for c in codes):
            raise ServiceError(422, 'codes must be a non-empty list of hex strings, one packed code per query')
        if len(codes) > MAX_CODE_QUERIES or len(codes) * k > MAX_CODE_RESULTS:
            raise ServiceError(413, f"{len(codes)} queries x k={k} is more than one request may ask "
                                    f"(at most {MAX_CODE_QUERIES} queries and {MAX_CODE_RESULTS:,} results); "
                                    "send them in smaller batches")
        with index.lock:
            current, bits = index.model_version, index.bits
            if version != current:
                raise ModelVersionError(f"the codes are of model {version}, this index holds model {current}; "
                                        f"encode the queries with model {current}")
            nbytes = bits // 8
            rows = []
            for i, c in enumerate(codes):
                try:
                    b = bytes.fromhex(c)
                except ValueError:
                    raise ServiceError(422, f"code {i} is not hex ({_one_line(c, 40)!r}); send packed codes as "
                                            "hex strings (hashing.codes.pack, then .hex())") from None
                if len(b) != nbytes:
                    raise CodeLengthError(f"code {i} is {len(b) * 8} bits ({len(c)} hex digits), model {current} "
                                          f"makes {bits}-bit codes ({2 * nbytes} hex digits); encode with that model")
                rows.append(np.frombuffer(b, np.uint8))
            t1 = time.perf_counter()
            hits = index.search_codes(np.stack(rows), k, model_version=version)
            t_search = time.perf_counter() - t1
        return {"model_version": current, "k": k, "asymmetric": False,
                "results": [[h.to_json() for h in q] for q in hits],
                "timings_ms": {"search": _ms(t_search), "total": _ms(time.perf_counter() - t0)}}

    @app.post("/search")
    async def search(request: Request, k: str | None = Query(None), asymmetric: str | None = Query(None)):
        t0 = time.perf_counter()
        authorise(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            raw = await _read_body(request, MAX_JSON_BYTES, "the JSON body")
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ServiceError(400, f"the body is not valid JSON ({_one_line(e, 120)}); send "
                                        '{"codes": [...], "model_version": "...", "k": 10}') from None
            if _parse_bool(asymmetric, "asymmetric"):
                raise ServiceError(422, "asymmetric search needs the query image (its soft code); "
                                        "upload the image, or drop asymmetric for codes")
            return await run_in_threadpool(search_codes, body, k, t0)
        kk = _parse_k(k, default_k)
        asym = _parse_bool(asymmetric, "asymmetric")
        if ctype == "multipart/form-data":
            raw = await _read_body(request, max_upload_bytes + MULTIPART_OVERHEAD, "the upload", max_upload_bytes)
            data = await _multipart_image(request, raw, max_upload_bytes)
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            data = await _read_body(request, max_upload_bytes, "the image")
        else:
            raise ServiceError(415, f"cannot search a body of type {ctype or 'none'}; upload the image as "
                                    "multipart/form-data in the field 'image', or POST application/json codes")
        t1 = time.perf_counter()
        px = await run_in_threadpool(decode_image, data)
        return await run_in_threadpool(search_image, px, kk, asym, time.perf_counter() - t1, t0)

    # ------------------------------------------------------------------ items
    def _id(raw: str) -> int:
        try:
            return C.parse_id(raw)
        except FedhashError as e:
            raise ServiceError(404, str(e)) from None

    def _unknown(cid: int) -> ServiceError:
        return ServiceError(404, f"id {C.fmt_id(cid)} is not in this index (removed, or never added)")

    @app.get("/items/{item_id}")
    def get_item(item_id: str, request: Request) -> dict[str, Any]:
        authorise(request)
        cid = _id(item_id)
        with index.lock:
            it = index.item(cid)
        if it is None:
            raise _unknown(cid)
        return it.to_json()

    @app.get("/items/{item_id}/image")
    def get_image(item_id: str, request: Request) -> Response:
        authorise(request)
        cid = _id(item_id)
        try:  # not under index.lock: SearchIndex.image locks its catalogue read only, not the file's
            px = index.image(cid)
        except UnknownItemsError:
            raise _unknown(cid) from None
        except DataError as e:
            raise ServiceError(409, str(e)) from None
        return Response(thumbnail_png(px), media_type="image/png")

    @app.delete("/items/{item_id}")
    def delete_item(item_id: str, request: Request) -> dict[str, Any]:
        authorise(request)
        cid = _id(item_id)
        host = request.client.host if request.client else "unknown"
        command = f"HTTP DELETE /items/{C.fmt_id(cid)} from {host}"
        with index.lock:
            try:
                n = index.remove(ids=[cid], command=command)
            except UnknownItemsError:
                raise _unknown(cid) from None
        if n != 1:
            raise _unknown(cid)
        log.info("removed %s (%s)", C.fmt_id(cid), command)
        return {"removed": C.fmt_id(cid)}

    return app


# --------------------------------------------------------------------------- fedhash serve


def write_token_file(path: str | os.PathLike) -> str:
    """A new random token, written to ``path`` with mode 0600 (atomically: a temp file beside it, then a
    rename); returns it."""
    import tempfile

    path = Path(path)
    token = secrets.token_urlsafe(32)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return token


def _read_token_file(path: Path) -> str:
    try:
        token = path.read_text("utf-8").strip()
    except OSError as e:
        raise FedhashError(f"cannot read the token file {path} ({e.strerror}); write the bearer token into it "
                           "(python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE)") from None
    if not token:
        raise FedhashError(f"the token file {path} is empty; write the bearer token into it")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("the token file %s can be read by other users; chmod 600 it", path)
    return token


def resolve_token(folder: Path, token: str | None, token_file: str | os.PathLike | None) -> tuple[str, str]:
    """(the bearer token, where it came from, for the log; never the token itself)."""
    if token:
        return token, "given by the caller"
    if token_file:
        return _read_token_file(Path(token_file)), f"from {token_file}"
    env = os.environ.get("FEDHASH_TOKEN", "").strip()
    if env:
        return env, "from $FEDHASH_TOKEN"
    path = folder / TOKEN_FILE
    if path.is_file() and path.read_text("utf-8").strip():
        return _read_token_file(path), f"in {path} (delete it for a new one)"
    return write_token_file(path), f"new, written to {path} (mode 0600)"


def serve(folder: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
          token_file: str | os.PathLike | None = None, weights: str | None = None,
          cache_dir: str | os.PathLike | None = None, max_upload_mb: float = 20) -> None:
    """Open the index in ``folder`` and serve it with uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = Path(folder)
    if max_upload_mb <= 0:
        raise FedhashError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    index = open_index(folder, weights=weights, cache_dir=cache_dir)
    try:
        secret, where = resolve_token(folder, token, token_file)
        app = make_app(index, secret, max_upload_bytes=int(max_upload_mb * 2**20))
        enc = index.encoder()
        if enc.reads_features:
            enc.backbone()  # built once here, not in the first query
        shown = f"[{host}]" if ":" in host else host
        print(f"fedhash serve: index {folder} ({len(index)} images, model {index.model_version}, {index.bits} bits) "
              f"on http://{shown}:{port}/ ; bearer token {where}", file=sys.stderr, flush=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("serving on %s over plain HTTP: put a TLS reverse proxy in front of it", host)
        uvicorn.run(app, host=host, port=int(port), log_level="info", server_header=False)
    finally:
        index.close()


__all__ = ["make_app", "serve", "decode_image", "thumbnail_png", "write_token_file", "resolve_token"]
