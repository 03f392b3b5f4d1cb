"""hub.py: downloads for tinydistil, from the Hugging Face Hub and from dataset sites.

    from hub import fetch_url, snapshot_download
    folder = snapshot_download("bert-base-uncased")      # -> .../models--bert-base-uncased/snapshots/<commit>
    path = fetch_url(url, Path("data/glue/SST-2.zip"))   # any other file, e.g. a dataset archive

snapshot_download speaks the Hub's resolve protocol with plain `requests` and writes the huggingface_hub
cache layout (blobs/<etag>, snapshots/<commit>/<file> symlinks, refs/<revision>), so a user's existing cache
is reused and ours is readable by huggingface_hub and transformers. Every download goes to a `.incomplete`
file that a later call resumes with a Range request, and is renamed into place only once its size (and
sha256, when known) check out. Not part of the paper: the paper's teacher is the bert-base-uncased checkpoint
(Sanh et al. 2019, section 3), and this module is how we fetch it.
"""

import hashlib
import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote, urljoin

import requests
from tqdm import tqdm

from common import UserError

_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "ON", "YES", "TRUE"}
_TIMEOUT = (10, 60)  # (connect, read) seconds


class _Unreachable(UserError):
    """The Hub did not answer (network down, timeout, 5xx): a complete cached snapshot may stand in."""


def _offline_var():
    return next((v for v in ("HF_HUB_OFFLINE", "TINYDISTIL_OFFLINE") if os.environ.get(v, "").upper() in _TRUE), None)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stream(url, tmp, *, headers=None, size=None, sha256=None, desc=None, where=""):
    """Download url into tmp, continuing what tmp already holds, then verify it. Returns nothing; raises UserError.

    A broken connection keeps the partial file so the next call resumes it; a file that fails verification
    is deleted, since resuming it could only reproduce the same bad bytes."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    have = tmp.stat().st_size if tmp.exists() else 0
    if size is not None and have > size:
        tmp.unlink()
        have = 0
    if size is None or have < size:
        h = {"User-Agent": "tinydistil", **(headers or {}), "Accept-Encoding": "identity"}  # sizes are raw bytes
        if have:
            h["Range"] = f"bytes={have}-"
        try:
            with requests.get(url, headers=h, stream=True, timeout=_TIMEOUT) as r:
                if r.status_code == 416:  # what we hold does not fit the file any more: start over
                    tmp.unlink()
                    return _stream(url, tmp, headers=headers, size=size, sha256=sha256, desc=desc, where=where)
                if r.status_code >= 400:
                    raise UserError(f"download of {url} failed: HTTP {r.status_code} {r.reason}{where}")
                if r.status_code != 206 or not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                    have = 0  # the server ignored the Range header and sends the whole file
                total = size or (int(r.headers["Content-Length"]) + have if "Content-Length" in r.headers else None)
                with open(tmp, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                                  unit_divisor=1024, desc=desc or tmp.name) as bar:
                    for chunk in r.iter_content(1 << 16):  # small: a broken read loses its whole chunk
                        f.write(chunk)
                        bar.update(len(chunk))
        except requests.RequestException as e:
            kept = f"; partial file kept at {tmp}, run again to resume" if tmp.exists() else ""
            raise UserError(f"download of {url} failed ({type(e).__name__}: {e}){kept}{where}") from None
    got = tmp.stat().st_size
    if size is not None and got != size:
        tmp.unlink()
        raise UserError(f"download of {url} is {got} bytes, expected {size}: deleted it, run again{where}")
    if sha256 is not None and (digest := _sha256(tmp)) != sha256.lower():
        tmp.unlink()
        raise UserError(f"download of {url} is corrupt (sha256 {digest}, expected {sha256}): "
                        f"deleted it, run again{where}")


def fetch_url(url, dest, *, headers=None, sha256=None, size=None, desc=None):
    """Download url to the path dest (parents created) and return it; an existing dest is returned untouched."""
    dest = Path(dest)
    if dest.exists():
        return dest
    where = f"; or download it yourself and put it at {dest}"
    if var := _offline_var():
        raise UserError(f"{url} is needed but {var}=1 is set: unset it to download, or put the file at {dest}")
    tmp = dest.with_name(dest.name + ".incomplete")
    _stream(url, tmp, headers=headers, size=size, sha256=sha256, desc=desc or dest.name, where=where)
    os.replace(tmp, dest)
    return dest


def _hf_home():
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expandvars(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface")))).expanduser()


def cache_dir():
    """The huggingface_hub cache root, resolved exactly as huggingface_hub does."""
    hub_cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(os.path.expandvars(hub_cache)).expanduser() if hub_cache else _hf_home() / "hub"


def _token():
    saved = _hf_home() / "token"  # written by `huggingface-cli login`
    return os.environ.get("HF_TOKEN") or (saved.read_text().strip() if saved.is_file() else None)


def _cached(folder, revision, required):
    """The cached snapshot of revision if it holds every required file, else None."""
    ref = folder / "refs" / revision
    commit = revision if _COMMIT.fullmatch(revision) else ref.read_text().strip() if ref.is_file() else None
    snap = folder / "snapshots" / commit if commit else None
    return snap if snap and all((snap / f).is_file() for f in required) else None


def _metadata(url, headers, repo_id, revision):
    """HEAD a resolve URL: (commit, etag, size), or None when the file does not exist in the repo."""
    for _ in range(5):
        try:
            r = requests.head(url, headers=headers, allow_redirects=False, timeout=_TIMEOUT)
        except requests.RequestException as e:
            raise _Unreachable(f"cannot reach the Hub at {url} ({type(e).__name__})") from None
        # A renamed repo redirects to its new name without metadata; a large (LFS) file redirects to a
        # CDN, and that first answer carries the metadata, so we stop there.
        if not r.is_redirect or "X-Repo-Commit" in r.headers:
            break
        url = urljoin(url, r.headers["Location"])
    code = r.headers.get("X-Error-Code", "")
    if code == "RepoNotFound":
        raise UserError(f"repository {repo_id} not found on the Hub ({url}): check the name, "
                        "or set HF_TOKEN if it is private")
    if code == "RevisionNotFound":
        raise UserError(f"revision {revision!r} not found in {repo_id} ({url})")
    if r.status_code == 404:
        return None
    if r.status_code in (401, 403):
        raise UserError(f"access to {repo_id} was refused (HTTP {r.status_code}, gated or private): accept its terms "
                        "on the Hub and set HF_TOKEN to a token that may read it")
    if r.status_code >= 500:
        raise _Unreachable(f"the Hub answered HTTP {r.status_code} for {url}")
    if r.status_code >= 400:
        raise UserError(f"the Hub answered HTTP {r.status_code} {r.reason} for {url}")
    etag = (r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or "").removeprefix("W/").strip('"')
    size = r.headers.get("X-Linked-Size") or (None if r.is_redirect else r.headers.get("Content-Length"))
    commit = r.headers.get("X-Repo-Commit")
    if not (commit and etag and size):
        raise UserError(f"{url} did not answer like the Hugging Face Hub (no commit, ETag or size): check HF_ENDPOINT")
    return commit, etag, int(size)


def _link(blob, pointer):
    """snapshots/<commit>/<file> -> ../../blobs/<etag>, a relative symlink as huggingface_hub makes; a copy if
    the file system has no symlinks."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.unlink(missing_ok=True)
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:
        shutil.copyfile(blob, pointer)


def snapshot_download(repo_id, *, revision="main", required=("config.json", "model.safetensors"),
                      optional=("tokenizer.json", "vocab.txt")):
    """Fetch a Hub repo's files into the huggingface_hub cache and return the snapshot folder.

    A required file missing on the Hub is an error, an optional one is skipped. The snapshot appears only
    once every file is verified, so a failed call leaves no half-made snapshot behind."""
    folder = cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if var := _offline_var():
        if snap := _cached(folder, revision, required):
            return snap
        raise UserError(f"{repo_id}@{revision} is not in the cache at {folder} and {var}=1 is set: "
                        "unset it to download")
    try:
        return _download_snapshot(folder, repo_id, revision, required, optional)
    except _Unreachable as e:
        if snap := _cached(folder, revision, required):
            return snap
        raise UserError(f"{e}, and {repo_id}@{revision} is not in the cache at {folder}") from None


def _download_snapshot(folder, repo_id, revision, required, optional):
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    headers = {"User-Agent": "tinydistil", "Accept-Encoding": "identity"}  # identity: sizes are raw bytes
    if token := _token():
        headers["Authorization"] = f"Bearer {token}"
    commit, found, missing = None, {}, []
    for name in (*required, *optional):
        # Once we know the commit, the rest is resolved at it, so a push in between cannot mix two revisions.
        url = f"{endpoint}/{repo_id}/resolve/{quote(commit or revision, safe='')}/{quote(name)}"
        meta = _metadata(url, headers, repo_id, revision)
        if meta is None and name in required:
            raise UserError(f"{repo_id}@{revision} has no {name} on the Hub ({url}); "
                            f"tinydistil needs {', '.join(required)}")
        if meta is None:
            missing.append(name)
            continue
        commit = commit or meta[0]
        found[name] = (url, *meta[1:])
    snap = folder / "snapshots" / commit
    for name, (url, etag, size) in found.items():
        blob = folder / "blobs" / etag
        if not blob.exists() and not (snap / name).is_file():
            sha = etag if _SHA256.fullmatch(etag) else None  # LFS files: the ETag is the content's sha256
            _stream(url, blob.with_name(etag + ".incomplete"), headers=headers, size=size, sha256=sha,
                    desc=f"{repo_id}/{name}", where=f" ({repo_id}@{revision})")
            os.replace(blob.with_name(etag + ".incomplete"), blob)
    for name, (url, etag, size) in found.items():
        if not (snap / name).is_file():
            _link(folder / "blobs" / etag, snap / name)
    for name in missing:  # huggingface_hub's marker that lets transformers skip asking again
        (folder / ".no_exist" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / ".no_exist" / commit / name).touch()
    if revision != commit:
        (folder / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / revision).write_text(commit)
    return snap
