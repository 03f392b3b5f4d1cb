"""test_hub.py: hub.py against a real HTTP server on 127.0.0.1 that answers like the Hugging Face Hub.

    python -m pytest -q test_hub.py

The server speaks the Hub's resolve protocol (X-Repo-Commit, ETag, a 302 to a CDN path with X-Linked-Etag and
X-Linked-Size for the LFS file, 404 with X-Error-Code, Range requests) and can inject faults: a corrupt blob,
a connection cut mid-body, a short body, a CDN that ignores Range. No paper section: this is infrastructure.
"""

import hashlib
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hub import UserError, fetch_url, snapshot_download

REPO, GATED, RENAMED, TOKEN = "org/tiny-bert", "org/gated", "org/old-name", "hf_secret"
COMMIT = hashlib.sha1(b"the only commit").hexdigest()
MODEL = random.Random(0).randbytes(200_000)  # stands in for model.safetensors: this tests the transport only
FILES = {"config.json": b'{"model_type": "bert", "hidden_size": 8}\n', "model.safetensors": MODEL,
         "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n"}  # no tokenizer.json: the optional file to skip


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def git_sha1(data):  # the Hub's ETag for a small (non-LFS) file
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.blobs = {sha256(MODEL): MODEL}  # what the CDN serves, by sha256
        self.log = []  # (method, path, request headers) of every request
        self.fault = None  # "corrupt" | "cut" | "short" | "no-range", applied by the CDN
        self.cdn = ""  # prefix of the CDN Location: "" is a relative redirect, else an absolute URL


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def send(self, status, headers, data, body, length=None):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def answer(self, body):
        hub = self.server.hub
        hub.log.append((self.command, self.path, dict(self.headers)))
        parts = self.path.split("/")
        if parts[1] == "cdn":
            return self.cdn(parts[2], body)
        if len(parts) < 6 or parts[3] != "resolve":
            return self.send(404, {}, b"Not found", body)
        repo, rev, name = "/".join(parts[1:3]), parts[4], "/".join(parts[5:])
        if repo == RENAMED:  # the Hub redirects a renamed repo's URLs to its new name, without metadata
            return self.send(307, {"Location": self.path.replace(RENAMED, REPO)}, b"Temporary Redirect", body)
        if repo not in (REPO, GATED):
            return self.send(404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", body)
        if repo == GATED and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.send(403, {"X-Error-Code": "GatedRepo"}, b"Access to this model is restricted", body)
        if rev not in ("main", COMMIT):
            return self.send(404, {"X-Error-Code": "RevisionNotFound"}, b"Invalid rev id", body)
        if name not in FILES:
            return self.send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"Entry not found", body)
        data = FILES[name]
        if name == "model.safetensors":
            # The redirect's own Content-Length is its short body, not the file: a client must use X-Linked-Size.
            loc = f"{hub.cdn}/cdn/{sha256(data)}"
            meta = {"Location": loc, "X-Repo-Commit": COMMIT, "ETag": f'"{sha256(data)}"',
                    "X-Linked-Etag": f'"{sha256(data)}"', "X-Linked-Size": str(len(data))}
            return self.send(302, meta, f"Found. Redirecting to {loc}".encode(), body)
        self.send_range(data, {"X-Repo-Commit": COMMIT, "ETag": f'"{git_sha1(data)}"'}, body)

    def cdn(self, sha, body):
        hub = self.server.hub
        if sha not in hub.blobs:
            return self.send(404, {}, b"NoSuchKey", body)
        data = hub.blobs[sha]
        if hub.fault == "corrupt":
            data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
        self.send_range(data, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}, body, hub.fault)  # S3-style ETag

    def send_range(self, data, headers, body, fault=None):
        rng = self.headers.get("Range")
        start, status = 0, 200
        if rng and fault != "no-range":
            start, status = int(rng.removeprefix("bytes=").split("-")[0]), 206
            if start >= len(data):
                return self.send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        part = data[start:]
        if fault == "cut":  # announce the whole body, send half, hang up
            return self.send(status, headers, part[:len(part) // 2], body, length=len(part))
        if fault == "short":  # a consistent but short answer
            part = part[:len(part) // 2]
        self.send(status, headers, part, body)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.hub = fake = FakeHub()
    fake.port = server.server_port
    fake.url = f"http://127.0.0.1:{fake.port}"
    fake.cache = tmp_path / "hub"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(fake.cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HF_HUB_OFFLINE", "TINYDISTIL_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    yield fake
    server.shutdown()
    server.server_close()
    thread.join()


def repo_dir(hub, repo=REPO):
    return hub.cache / ("models--" + repo.replace("/", "--"))


def gets(hub, prefix="/cdn/"):
    return [headers for method, path, headers in hub.log if method == "GET" and path.startswith(prefix)]


def assert_nothing_left(hub):
    folder = repo_dir(hub)
    assert not (folder / "blobs" / sha256(MODEL)).exists()
    assert not (folder / "snapshots").exists()
    assert not (folder / "refs" / "main").exists()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_writes_the_huggingface_hub_layout(hub):
    snap = snapshot_download(REPO)
    folder = repo_dir(hub)
    assert snap == folder / "snapshots" / COMMIT
    assert (folder / "refs" / "main").read_text() == COMMIT
    etags = {name: sha256(data) if name == "model.safetensors" else git_sha1(data) for name, data in FILES.items()}
    assert sorted(p.name for p in (folder / "blobs").iterdir()) == sorted(etags.values())
    assert sorted(p.name for p in snap.iterdir()) == sorted(FILES)
    for name, data in FILES.items():
        assert (snap / name).is_symlink()
        assert str((snap / name).readlink()) == f"../../blobs/{etags[name]}"
        assert (snap / name).read_bytes() == data
    assert (folder / ".no_exist" / COMMIT / "tokenizer.json").is_file()  # optional file skipped, as hf marks it
    heads = [(path, headers) for method, path, headers in hub.log if method == "HEAD"]
    assert all(h["Accept-Encoding"] == "identity" for _, h in heads)
    assert heads[0][0] == f"/{REPO}/resolve/main/config.json"
    assert all(f"/resolve/{COMMIT}/" in path for path, _ in heads[1:])  # pinned once the commit is known
    assert len(gets(hub)) == 1 and "Range" not in gets(hub)[0]


def test_cached_snapshot_is_reused_and_offline_makes_no_request(hub, monkeypatch):
    snap = snapshot_download(REPO)
    hub.log.clear()
    assert snapshot_download(REPO) == snap
    assert [m for m, _, _ in hub.log] == ["HEAD"] * 4  # online: metadata only, no download
    hub.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert snapshot_download(REPO) == snap
    assert snapshot_download(REPO, revision=COMMIT) == snap
    assert hub.log == []


def test_offline_with_empty_cache_is_a_user_error(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"not in the cache at .*HF_HUB_OFFLINE=1 is set"):
        snapshot_download(REPO)
    assert hub.log == []


def test_unreachable_hub_falls_back_to_the_cache(hub, monkeypatch):
    snap = snapshot_download(REPO)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert snapshot_download(REPO) == snap
    with pytest.raises(UserError, match="cannot reach the Hub.*not in the cache"):
        snapshot_download("org/other")


def test_corrupt_blob_leaves_nothing(hub):
    hub.fault = "corrupt"
    with pytest.raises(UserError, match="corrupt"):
        snapshot_download(REPO)
    assert_nothing_left(hub)
    assert not list((repo_dir(hub) / "blobs").glob("*.incomplete"))


def test_short_body_leaves_nothing(hub):
    hub.fault = "short"
    with pytest.raises(UserError, match="expected 200000"):
        snapshot_download(REPO)
    assert_nothing_left(hub)
    assert not list((repo_dir(hub) / "blobs").glob("*.incomplete"))


def test_cut_download_is_resumed_with_a_range_request(hub):
    hub.fault = "cut"
    with pytest.raises(UserError, match="run again to resume"):
        snapshot_download(REPO)
    assert_nothing_left(hub)
    partial = repo_dir(hub) / "blobs" / (sha256(MODEL) + ".incomplete")
    kept = partial.read_bytes()
    assert 0 < len(kept) <= 100_000 and MODEL.startswith(kept)  # what arrived before the cut, whole chunks
    hub.fault, hub.log = None, []
    snap = snapshot_download(REPO)
    assert [h.get("Range") for h in gets(hub)] == [f"bytes={len(kept)}-"]
    assert (snap / "model.safetensors").read_bytes() == MODEL
    assert not partial.exists()


def test_server_ignoring_range_restarts_the_file(hub):
    partial = repo_dir(hub) / "blobs" / (sha256(MODEL) + ".incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 100)  # wrong bytes: appending the 200 body to them would fail the sha256
    hub.fault = "no-range"
    snap = snapshot_download(REPO)
    assert [h.get("Range") for h in gets(hub)] == ["bytes=100-"]
    assert (snap / "model.safetensors").read_bytes() == MODEL


def test_unknown_repo(hub):
    with pytest.raises(UserError, match="repository org/nope not found on the Hub"):
        snapshot_download("org/nope")


def test_renamed_repo_redirect_is_followed(hub):
    snap = snapshot_download(RENAMED)
    assert snap == repo_dir(hub, RENAMED) / "snapshots" / COMMIT  # cached under the name asked for, as hf does
    assert (snap / "model.safetensors").read_bytes() == MODEL


def test_unknown_revision(hub):
    with pytest.raises(UserError, match="revision 'v9' not found"):
        snapshot_download(REPO, revision="v9")


def test_missing_required_file(hub):
    with pytest.raises(UserError, match="no pytorch_model.bin"):
        snapshot_download(REPO, required=("config.json", "pytorch_model.bin"))
    assert not (repo_dir(hub) / "snapshots").exists()


def test_gated_repo_needs_hf_token_which_stays_on_the_hub(hub, monkeypatch):
    with pytest.raises(UserError, match="HF_TOKEN"):
        snapshot_download(GATED)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.cdn = f"http://localhost:{hub.port}"  # another host, like the real CDN
    snap = snapshot_download(GATED)
    assert (snap / "model.safetensors").read_bytes() == MODEL
    assert "Authorization" not in gets(hub)[0]


def test_fetch_url(hub, tmp_path):
    url, dest = f"{hub.url}/cdn/{sha256(MODEL)}", tmp_path / "data" / "sub" / "model.bin"
    assert fetch_url(url, dest, sha256=sha256(MODEL), size=len(MODEL)) == dest
    assert dest.read_bytes() == MODEL
    assert not dest.with_name("model.bin.incomplete").exists()
    hub.log.clear()
    assert fetch_url(url, dest) == dest
    assert hub.log == []


def test_fetch_url_sha_mismatch(hub, tmp_path):
    dest = tmp_path / "model.bin"
    with pytest.raises(UserError, match="corrupt"):
        fetch_url(f"{hub.url}/cdn/{sha256(MODEL)}", dest, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TINYDISTIL_OFFLINE"])
def test_fetch_url_offline(hub, tmp_path, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    url, dest = f"{hub.url}/cdn/{sha256(MODEL)}", tmp_path / "model.bin"
    with pytest.raises(UserError) as err:
        fetch_url(url, dest)
    assert url in str(err.value) and str(dest) in str(err.value) and var in str(err.value)
    assert hub.log == []


def test_fetch_url_resumes(hub, tmp_path):
    dest = tmp_path / "model.bin"
    dest.with_name("model.bin.incomplete").write_bytes(MODEL[:1000])
    fetch_url(f"{hub.url}/cdn/{sha256(MODEL)}", dest, sha256=sha256(MODEL))
    assert [h.get("Range") for h in gets(hub)] == ["bytes=1000-"]
    assert dest.read_bytes() == MODEL


def test_fetch_url_errors_name_url_and_path(hub, tmp_path):
    dest = tmp_path / "x.zip"
    cases = [(f"{hub.url}/cdn/{'0' * 64}", "HTTP 404"), (f"http://127.0.0.1:{closed_port()}/x.zip", "ConnectionError")]
    for url, why in cases:
        with pytest.raises(UserError, match=why) as err:
            fetch_url(url, dest)
        assert url in str(err.value) and str(dest) in str(err.value)
    assert list(tmp_path.iterdir()) == []
