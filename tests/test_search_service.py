"""The site's HTTP search service (client/search_service.py): the API through FastAPI's TestClient, a real
``fedhash serve`` process on a loopback port, and the search page in headless Chromium."""
import io
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from hashing import catalogue as C
from hashing import retrieval as R
from tests.conftest import train_digits, write_png

TOKEN = "test-token-" + "q" * 32
CHROMIUM = "/usr/bin/chromium"
N_IMAGES = 200


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    return train_digits(tmp_path_factory.mktemp("runs"), cache_dir, bits=32)


@pytest.fixture(scope="module")
def built(run, tmp_path_factory, cache_dir, digits):
    """An index of N_IMAGES digits written as class/<i>.png; (folder, {id: (png path, label)})."""
    root = tmp_path_factory.mktemp("service")
    truth = {}
    for i in range(N_IMAGES):
        p = root / "images" / str(int(digits.labels[i])) / f"{i}.png"
        write_png(p, digits.images[i])
        truth[C.content_id(digits.images[i])] = (p, str(int(digits.labels[i])))
    idx, rep = R.build(root / "index", run, root / "images", cache_dir=cache_dir)
    idx.close()
    assert rep.added == len(truth) == N_IMAGES
    return root / "index", truth


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


@pytest.fixture(scope="module")
def index(built, cache_dir):
    idx = R.open_index(built[0], cache_dir=cache_dir)
    yield idx
    idx.close()


@pytest.fixture(scope="module")
def client(index):
    from fastapi.testclient import TestClient

    from client.search_service import make_app

    with TestClient(make_app(index, TOKEN, max_upload_bytes=64 * 1024)) as c:
        yield c


@pytest.fixture
def scratch(built, cache_dir, tmp_path):
    """A copy of the index that a test may change, and a client of it."""
    from fastapi.testclient import TestClient

    from client.search_service import make_app

    idx = R.open_index(_copy(built[0], tmp_path / "index"), cache_dir=cache_dir)
    with TestClient(make_app(idx, TOKEN)) as c:
        yield idx, c
    idx.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def unique_code_items(index, n: int) -> list[int]:
    """Ids of n indexed images whose code no other image shares (so each is its own unique nearest)."""
    ids, codes = index.cat.codes(index.model_version)
    _, inv, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    unique = ids[counts[inv.ravel()] == 1]
    assert len(unique) >= n, "the test model hashes too many digits to the same code"
    return [int(i) for i in unique[:n]]


def fake_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def one_line_detail(r) -> str:
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and "\n" not in body["detail"], body
    assert body["detail"]
    return body["detail"]


# --------------------------------------------------------------------------- the API


def test_health_is_open_and_everything_else_needs_the_token(client, index):
    h = client.get("/health")
    assert h.status_code == 200
    assert h.json() == {"status": "ok", "count": N_IMAGES, "model_version": index.model_version, "bits": 32}
    some = C.fmt_id(unique_code_items(index, 1)[0])
    for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": f"Bearer {TOKEN}x"}):
        for method, url in (("POST", "/search"), ("GET", f"/items/{some}"), ("GET", f"/items/{some}/image"),
                            ("DELETE", f"/items/{some}")):
            r = client.request(method, url, headers=bad)
            assert r.status_code == 401, (method, url, bad)
            assert "token" in one_line_detail(r)
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert index.item(some) is not None  # the unauthorised DELETE did nothing
    page = client.get("/")
    assert page.status_code == 200 and 'id="token"' in page.text
    assert "script-src 'sha256-" in page.headers["content-security-policy"]
    assert not re.search(r"https?:|<link|<script src|@import|url\(", page.text)  # no assets from anywhere


def test_search_by_uploaded_png_finds_the_image_itself(client, index, built, digits):
    _, truth = built
    for cid in unique_code_items(index, 3):
        path, label = truth[cid]
        r = client.post("/search", params={"k": 5}, headers=AUTH,
                        files={"image": ("query.png", path.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == index.model_version and body["k"] == 5 and len(body["results"]) == 1
        hits = body["results"][0]
        assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert hits[0]["id"] == C.fmt_id(cid) and hits[0]["distance"] == 0
        assert hits[0]["labels"] == [label] and hits[0]["path"] == str(path.resolve())
        assert all(hits[i]["distance"] <= hits[i + 1]["distance"] for i in range(4))
        assert body["query"]["id"] == C.fmt_id(cid)
        assert {"decode", "backbone", "search", "total"} <= set(body["timings_ms"])
    # a raw image body works as well, and the asymmetric re-rank still puts the image first
    cid = unique_code_items(index, 1)[0]
    r = client.post("/search?k=3&asymmetric=true", headers={**AUTH, "Content-Type": "image/png"},
                    content=truth[cid][0].read_bytes())
    assert r.status_code == 200 and r.json()["results"][0][0]["id"] == C.fmt_id(cid)


def _ids_equal_up_to_ties(api_ids, api_d, ref_ids, ref_d, all_d, all_ids):
    assert np.array_equal(api_d, ref_d)
    kth = ref_d[-1]
    strict = ref_d < kth
    assert set(np.asarray(api_ids)[strict]) == set(ref_ids[strict])
    at_kth = set(all_ids[all_d == kth].tolist())  # every image at the k-th distance may be chosen
    assert set(np.asarray(api_ids)[~strict]) <= at_kth and len(set(api_ids)) == len(api_ids)


def test_search_by_codes_equals_search_codes_and_brute_force(client, index):
    from hashing.codes import hamming

    version = index.model_version
    ids, codes = index.cat.codes(version)
    rng = np.random.default_rng(0)
    queries = np.concatenate([codes[[0, 7, 50]], rng.integers(0, 256, size=(3, codes.shape[1]), dtype=np.uint8)])
    k = 17
    r = client.post("/search", headers=AUTH, json={"codes": [q.tobytes().hex() for q in queries],
                                                   "model_version": version, "k": k})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == version and body["k"] == k and len(body["results"]) == len(queries)
    ref = index.search_codes(queries, k, model_version=version)
    assert body["results"] == [[h.to_json() for h in q] for q in ref]
    bd, bi = R.brute_force(codes, ids, queries, k)
    full = hamming(queries, codes)
    for qi, hits in enumerate(body["results"]):
        api_ids = [C.parse_id(h["id"]) for h in hits]
        api_d = np.array([h["distance"] for h in hits])
        _ids_equal_up_to_ties(api_ids, api_d, bi[qi], bd[qi], full[qi], ids)
    # k from the query string when the body has none; all of the index when k exceeds it
    r = client.post("/search?k=1000", headers=AUTH, json={"codes": [queries[0].tobytes().hex()], "model_version": version})
    assert r.status_code == 200 and len(r.json()["results"][0]) == N_IMAGES


def test_get_and_delete_an_item(scratch, built, digits):
    idx, c = scratch
    _, truth = built
    gone, kept = unique_code_items(idx, 2)
    gid = C.fmt_id(gone)
    r = c.get(f"/items/{gid}", headers=AUTH)
    assert r.status_code == 200
    row = r.json()
    assert row["id"] == gid and row["labels"] == [truth[gone][1]] and row["path"] == str(truth[gone][0].resolve())
    assert row == idx.item(gone).to_json()
    r = c.get(f"/items/{gid}/image", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    from PIL import Image

    thumb = Image.open(io.BytesIO(r.content))
    assert max(thumb.size) <= 256 and thumb.size[0] == thumb.size[1] and thumb.size[0] >= 128  # 8x8, enlarged
    small = np.asarray(thumb.convert("L").resize((8, 8), Image.Resampling.NEAREST))
    assert np.array_equal(small, np.asarray(Image.open(truth[gone][0]).convert("L")))  # the pixels, only enlarged

    r = c.delete(f"/items/{gid}", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"removed": gid}
    for what in (f"/items/{gid}", f"/items/{gid}/image"):
        r = c.get(what, headers=AUTH)
        assert r.status_code == 404 and gid in one_line_detail(r)
    r = c.delete(f"/items/{gid}", headers=AUTH)
    assert r.status_code == 404
    assert c.get("/health").json()["count"] == N_IMAGES - 1
    # the removed image is never returned again: neither by its own pixels nor over the whole index
    r = c.post("/search?k=1000", headers=AUTH, files={"image": ("q.png", truth[gone][0].read_bytes(), "image/png")})
    ids = [h["id"] for h in r.json()["results"][0]]
    assert gid not in ids and len(ids) == N_IMAGES - 1
    r = c.post("/search", headers=AUTH, json={"codes": [idx.cat.codes(idx.model_version)[1][0].tobytes().hex()],
                                              "model_version": idx.model_version, "k": 1000})
    assert gid not in [h["id"] for h in r.json()["results"][0]]
    assert c.get(f"/items/{C.fmt_id(kept)}", headers=AUTH).status_code == 200
    # the audit log says who removed it
    last = idx.cat.audit()[-1]
    assert last["action"] == "remove" and last["count"] == 1 and last["detail"]["ids"] == [gid]
    assert last["command"] == f"HTTP DELETE /items/{gid} from testclient"
    # an id that is not one
    r = c.get("/items/not-an-id", headers=AUTH)
    assert r.status_code == 404 and "16 hex digits" in one_line_detail(r)
    r = c.delete("/items/0000000000000001", headers=AUTH)
    assert r.status_code == 404 and len(idx) == N_IMAGES - 1


def test_bad_requests_get_one_line_reasons(client, index, built):
    png = next(iter(built[1].values()))[0].read_bytes()
    version = index.model_version

    def upload(data, name="q.png", ctype="image/png", **params):
        return client.post("/search", params=params, headers=AUTH, files={"image": (name, data, ctype)})

    # not an image
    r = upload(b"hello, I am a text file\n", "notes.txt", "text/plain")
    assert r.status_code == 415 and "PNG" in one_line_detail(r)
    r = upload(png[:40])  # a truncated PNG
    assert r.status_code == 415 and "PNG" in one_line_detail(r)
    r = upload(b"")
    assert r.status_code == 415 and "empty" in one_line_detail(r)
    # too large: by Content-Length (the client's limit here is 64 KiB) and by the bytes of a body without one
    r = upload(png + b"\0" * (70 * 1024))
    assert r.status_code == 413 and "limit of 64 KiB" in one_line_detail(r)
    chunks = (b"\0" * 8192 for _ in range(40))
    r = client.post("/search", headers={**AUTH, "Content-Type": "image/png"}, content=chunks)
    assert r.status_code == 413 and "limit" in one_line_detail(r)
    # decompression bombs: refused from the header, never decoded
    r = upload(fake_png(20000, 20000))
    assert r.status_code == 413 and "pixels" in one_line_detail(r)
    r = upload(fake_png(8000, 8000))
    assert r.status_code == 413 and "8000x8000" in one_line_detail(r)
    # no file field, wrong body type
    r = client.post("/search", headers=AUTH, files={"picture": ("q.png", png, "image/png")})
    assert r.status_code == 422 and "'image'" in one_line_detail(r)
    r = client.post("/search", headers={**AUTH, "Content-Type": "text/plain"}, content=b"hi")
    assert r.status_code == 415 and "multipart" in one_line_detail(r)
    # k out of range or not a number
    for k in (0, 1001, -3, "ten", 2.5):
        r = upload(png, k=k)
        assert r.status_code == 422 and "k must" in one_line_detail(r), k
        r = client.post("/search", headers=AUTH, json={"codes": ["00" * 4], "model_version": version, "k": k})
        assert r.status_code == 422 and "k must" in one_line_detail(r), k
    # codes: wrong length, not hex, another model, no version, malformed JSON
    r = client.post("/search", headers=AUTH, json={"codes": ["00" * 8], "model_version": version})
    assert r.status_code == 422 and "64 bits" in one_line_detail(r) and "32-bit" in one_line_detail(r)
    r = client.post("/search", headers=AUTH, json={"codes": ["zz" * 4], "model_version": version})
    assert r.status_code == 422 and "hex" in one_line_detail(r)
    r = client.post("/search", headers=AUTH, json={"codes": ["00" * 4], "model_version": "0123456789abcdef"})
    assert r.status_code == 409
    assert "0123456789abcdef" in one_line_detail(r) and version in one_line_detail(r)
    r = client.post("/search", headers=AUTH, json={"codes": ["00" * 4]})
    assert r.status_code == 422 and "model_version" in one_line_detail(r)
    r = client.post("/search", headers=AUTH, json={"codes": [], "model_version": version})
    assert r.status_code == 422
    r = client.post("/search", headers={**AUTH, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 400 and "JSON" in one_line_detail(r)
    r = client.post("/search?asymmetric=maybe", headers=AUTH, files={"image": ("q.png", png, "image/png")})
    assert r.status_code == 422 and "asymmetric" in one_line_detail(r)
    # after all of that the service still answers
    assert upload(png).status_code == 200


def test_token_comes_from_the_caller_a_file_the_environment_or_a_new_0600_file(tmp_path, monkeypatch):
    from client.search_service import TOKEN_FILE, make_app, resolve_token
    from hashing.errors import FedhashError

    monkeypatch.delenv("FEDHASH_TOKEN", raising=False)
    token, where = resolve_token(tmp_path, None, None)
    f = tmp_path / TOKEN_FILE
    assert f.read_text().strip() == token and len(token) >= 40 and (f.stat().st_mode & 0o777) == 0o600
    assert token not in where and str(f) in where
    assert resolve_token(tmp_path, None, None)[0] == token  # kept across restarts
    assert [p.name for p in tmp_path.iterdir()] == [TOKEN_FILE]  # no temp file left beside it
    monkeypatch.setenv("FEDHASH_TOKEN", "e" * 32)
    assert resolve_token(tmp_path, None, None) == ("e" * 32, "from $FEDHASH_TOKEN")
    tf = tmp_path / "t"
    tf.write_text("f" * 32 + "\n")
    assert resolve_token(tmp_path, None, tf)[0] == "f" * 32
    assert resolve_token(tmp_path, "g" * 32, tf)[0] == "g" * 32
    with pytest.raises(FedhashError, match="token file"):
        resolve_token(tmp_path, None, tmp_path / "missing")
    with pytest.raises(FedhashError, match="at least 16"):
        make_app(None, "short")


# --------------------------------------------------------------------------- a real server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(built, tmp_path_factory, cache_dir):
    """``fedhash serve`` on a copy of the index, on a free loopback port; stopped by its pid."""
    import httpx

    root = tmp_path_factory.mktemp("serve")
    folder = _copy(built[0], root / "index")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = _free_port()
    log_path = root / "serve.log"
    fedhash = Path(sys.executable).with_name("fedhash")
    cmd = [str(fedhash), "serve", "--index", str(folder), "--host", "127.0.0.1", "--port", str(port),
           "--token-file", str(token_file), "--cache-dir", str(cache_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("FEDHASH_TOKEN", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fedhash serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"fedhash serve did not answer /health in 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base, folder, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def test_real_server_searches_and_deletes_concurrently(server, built, cache_dir):
    import httpx

    base, folder, log_path = server
    _, truth = built
    assert httpx.get(f"{base}/health").json()["count"] == N_IMAGES
    assert httpx.post(f"{base}/search").status_code == 401
    with R.open_index(folder, cache_dir=cache_dir) as idx:
        victims = unique_code_items(idx, 4)
    pngs = {cid: truth[cid][0].read_bytes() for cid in victims}
    with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
        r = c.post("/search", params={"k": 3}, files={"image": ("q.png", pngs[victims[0]], "image/png")})
        assert r.status_code == 200 and r.json()["results"][0][0]["id"] == C.fmt_id(victims[0])

    # searches for the victims' own pixels in 3 threads while the main thread deletes them
    done: dict[str, float] = {}  # id -> when its DELETE had returned
    seen: list[tuple[float, set]] = []  # (when the search started, ids it returned)
    errors: list[str] = []
    stop = threading.Event()

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
            while not stop.is_set():
                cid = victims[int(rng.integers(len(victims)))]
                t = time.monotonic()
                r = c.post("/search?k=5", files={"image": ("q.png", pngs[cid], "image/png")})
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text}")
                    continue
                seen.append((t, {h["id"] for h in r.json()["results"][0]}))

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
            for cid in victims:
                time.sleep(0.3)
                r = c.delete(f"/items/{C.fmt_id(cid)}")
                assert r.status_code == 200, r.text
                done[C.fmt_id(cid)] = time.monotonic()
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    assert len(seen) >= 10
    late = [(t, gid) for t, ids in seen for gid, when in done.items() if t > when and gid in ids]
    assert not late, late[:3]
    assert any(C.fmt_id(victims[-1]) in ids for t, ids in seen if t < done[C.fmt_id(victims[-1])])
    assert httpx.get(f"{base}/health").json()["count"] == N_IMAGES - len(victims)
    # the audit trail, read by another process (this one), names the HTTP deletes; the log never shows the token
    with R.open_index(folder, cache_dir=cache_dir) as idx:
        cmds = [a["command"] for a in idx.cat.audit() if a["action"] == "remove"]
    assert cmds == [f"HTTP DELETE /items/{C.fmt_id(cid)} from 127.0.0.1" for cid in victims]
    assert TOKEN not in log_path.read_text()


# --------------------------------------------------------------------------- the page


def test_search_page_in_headless_chromium(server, built, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    base, folder, _ = server
    _, truth = built
    with R.open_index(folder) as idx:
        cid = unique_code_items(idx, 1)[0]
        version = idx.model_version
    png, label = truth[cid]
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    shot = tmp_path / "search-page.png"
    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(f"{base}/")
            # no token: the page says so and sends nothing
            page.set_input_files("#file", str(png))
            page.click("#search")
            page.wait_for_function("document.querySelector('#error').textContent.includes('token')")
            page.fill("#token", TOKEN)
            page.fill("#k", "6")
            page.click("#search")
            page.wait_for_selector("#results[data-state=done]", timeout=30_000)
            hits = page.locator(".hit")
            assert hits.count() == 6
            assert hits.nth(0).get_attribute("data-id") == C.fmt_id(cid)
            assert hits.nth(0).locator(".distance").text_content() == "0"
            assert hits.nth(0).locator(".labels").text_content() == label
            dists = [int(d) for d in page.locator(".hit .distance").all_text_contents()]
            assert dists == sorted(dists)
            widths = page.eval_on_selector_all(".hit img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            assert len(widths) == 6 and all(w > 0 for w in widths), widths
            assert page.eval_on_selector("#query", "e => e.naturalWidth") > 0
            assert page.text_content("#model") == version
            assert page.text_content("#error") == ""
            assert page.evaluate("sessionStorage.getItem('fedhash-token')") == TOKEN
            page.screenshot(path=str(shot), full_page=True)
            # a file that is not an image: the API's reason in #error
            page.set_input_files("#file", str(text))
            page.click("#search")
            page.wait_for_selector("#results[data-state=error]", state="attached", timeout=30_000)
            err = page.text_content("#error")
            assert err.startswith("415") and "not an image" in err and "PNG" in err
            assert page.locator(".hit").count() == 0
            # the token survives a reload (sessionStorage); a wrong one gets the 401's reason
            page.reload()
            assert page.input_value("#token") == TOKEN
            page.fill("#token", "wrong-token")
            page.set_input_files("#file", str(png))
            page.click("#search")
            page.wait_for_selector("#results[data-state=error]", state="attached", timeout=30_000)
            assert page.text_content("#error").startswith("401")
        finally:
            browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 1000
    assert not [m for m in console if "Content Security Policy" in m], console
