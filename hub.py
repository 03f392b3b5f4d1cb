"""hub.py: checkpoint files and downloads for tinydistil: the checkpoint folder, config.json and
safetensors formats, the Hugging Face Hub, dataset sites. Plumbing, not paper.

    from hub import checkpoint_folder, fetch_url, load_safetensors, snapshot_download
    folder = checkpoint_folder("bert-base-uncased")     # a local folder as is, else a Hub snapshot
    tensors = load_safetensors(folder / "model.safetensors")   # {name: tensor}, every rule checked
    path = fetch_url(url, Path("data/glue/SST-2.zip"))   # any other file, e.g. a dataset archive

snapshot_download speaks the Hub's resolve protocol with plain `requests` and writes the
huggingface_hub cache layout (blobs/<etag>, snapshots/<commit>/<file> symlinks, refs/<revision>), so
a user's existing cache is reused and ours is readable by huggingface_hub and transformers. Every
download goes to a `.incomplete` file that a later call resumes with a Range request, and is renamed
into place only once its size (and sha256, when known) check out. The paper's teacher is the
bert-base-uncased checkpoint (Sanh et al. 2019, section 3); this module is how we fetch and read it.
"""
import hashlib
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path
from urllib.parse import quote, urljoin

import requests
import torch
from tqdm import tqdm

from common import (UserError, atomic_write, check_folder, folder_from_env, looks_like_path,
                    write_error)

_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "ON", "YES", "TRUE"}
_TIMEOUT = (10, 60)  # (connect, read) seconds


class _Unreachable(UserError):
    """The Hub did not answer (network down, timeout, 5xx): a complete cached snapshot may stand
    in."""


def _offline_var():
    """The name of the environment variable that forbids downloads, if one is set."""
    for name in ("HF_HUB_OFFLINE", "TINYDISTIL_OFFLINE"):
        if os.environ.get(name, "").upper() in _TRUE:
            return name
    return None


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stream(url, tmp, *, headers=None, size=None, sha256=None, desc=None, where=""):
    """Download url into tmp, continuing what tmp already holds, then verify it; raises UserError.

    A broken connection keeps the partial file so the next call resumes it; a file that fails
    verification is deleted, since resuming it could only reproduce the same bad bytes."""
    try:
        _stream_into(url, tmp, headers, size, desc, where)
    except OSError as e:  # a full disk: a partial file there would only fill it further
        tmp.unlink(missing_ok=True)
        raise write_error(tmp, e, "then run again") from None
    got = tmp.stat().st_size
    if size is not None and got != size:
        tmp.unlink()
        raise UserError(f"download of {url} is {got} bytes, expected {size}: deleted it, "
                        f"run again{where}")
    if sha256 is not None and (digest := _sha256(tmp)) != sha256.lower():
        tmp.unlink()
        raise UserError(f"download of {url} is corrupt (sha256 {digest}, expected {sha256}): "
                        f"deleted it, run again{where}")


def _stream_into(url, tmp, headers, size, desc, where):
    """The download part of _stream: continue tmp (or start it over), keeping it when the
    connection breaks."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    have = tmp.stat().st_size if tmp.exists() else 0
    if size is not None and have > size:
        tmp.unlink()
        have = 0
    if size is None or have < size:
        try:
            if not _receive(url, tmp, have, headers, size, desc, where):  # 416: start over
                tmp.unlink()
                return _stream_into(url, tmp, headers, size, desc, where)
        except requests.RequestException as e:
            kept = f"; partial file kept at {tmp}, run again to resume" if tmp.exists() else ""
            raise UserError(f"download of {url} failed ({type(e).__name__}: {e}){kept}{where}") \
                from None


def _receive(url, tmp, have, headers, size, desc, where) -> bool:
    """One GET of url appended to the `have` bytes of tmp (a Range request), with a progress bar.
    False when the server says those bytes do not fit the file any more (HTTP 416)."""
    request = {"User-Agent": "tinydistil", **(headers or {}),
               "Accept-Encoding": "identity"}  # identity: sizes are raw bytes
    if have:
        request["Range"] = f"bytes={have}-"
    with requests.get(url, headers=request, stream=True, timeout=_TIMEOUT) as r:
        if r.status_code == 416:
            return False
        if r.status_code >= 400:
            raise UserError(f"download of {url} failed: HTTP {r.status_code} {r.reason}{where}")
        resumed = r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        if r.status_code != 206 or not resumed:
            have = 0  # the server ignored the Range header and sends the whole file
        total = size
        if total is None and "Content-Length" in r.headers:
            total = int(r.headers["Content-Length"]) + have
        with (open(tmp, "ab" if have else "wb") as f,
              tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=desc or tmp.name) as bar):
            for chunk in r.iter_content(1 << 16):  # small: a broken read loses its whole chunk
                f.write(chunk)
                bar.update(len(chunk))
    return True


def fetch_url(url, dest, *, headers=None, sha256=None, size=None, desc=None):
    """Download url to the path dest (parents created) and return it; an existing dest is returned
    untouched."""
    dest = Path(dest)
    if dest.exists():
        return dest
    where = f"; or download it yourself and put it at {dest}"
    if var := _offline_var():
        raise UserError(f"{url} is needed but {var}=1 is set: unset it to download, or put the "
                        f"file at {dest}")
    tmp = dest.with_name(dest.name + ".incomplete")
    _stream(url, tmp, headers=headers, size=size, sha256=sha256, desc=desc or dest.name,
            where=where)
    os.replace(tmp, dest)
    return dest


def _hf_home():
    """$HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface; checked: a variable
    that names a file is an error that names the variable."""
    if home := folder_from_env("HF_HOME"):
        return home
    xdg = folder_from_env("XDG_CACHE_HOME") or Path("~", ".cache").expanduser()
    return xdg / "huggingface"


def cache_dir():
    """The huggingface_hub cache root, resolved exactly as huggingface_hub does."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if folder := folder_from_env(var):
            return folder
    return check_folder(_hf_home() / "hub", "$HF_HOME" if os.environ.get("HF_HOME") else
                        "the Hub cache")


def _token():
    saved = _hf_home() / "token"  # written by `huggingface-cli login`
    return os.environ.get("HF_TOKEN") or (saved.read_text().strip() if saved.is_file() else None)


def _cached(folder, revision, required):
    """The cached snapshot of revision if it holds every required file, else None."""
    ref = folder / "refs" / revision
    commit = None
    if _COMMIT.fullmatch(revision):
        commit = revision
    elif ref.is_file():
        commit = ref.read_text().strip()
    snap = folder / "snapshots" / commit if commit else None
    return snap if snap and all((snap / f).is_file() for f in required) else None


def _metadata(url, headers, repo_id, revision):
    """HEAD a resolve URL: (commit, etag, size), or None when the repo has no such file."""
    for _ in range(5):
        try:
            r = requests.head(url, headers=headers, allow_redirects=False, timeout=_TIMEOUT)
        except requests.RequestException as e:
            raise _Unreachable(f"cannot reach the Hub at {url} ({type(e).__name__})") from None
        # A renamed repo redirects to its new name without metadata; a large (LFS) file redirects
        # to a CDN, and that first answer carries the metadata, so we stop there.
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
        raise UserError(f"access to {repo_id} was refused (HTTP {r.status_code}, gated or "
                        "private): accept its terms on the Hub and set HF_TOKEN to a token that "
                        "may read it")
    if r.status_code >= 500:
        raise _Unreachable(f"the Hub answered HTTP {r.status_code} for {url}")
    if r.status_code >= 400:
        raise UserError(f"the Hub answered HTTP {r.status_code} {r.reason} for {url}")
    etag = r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or ""
    etag = etag.removeprefix("W/").strip('"')
    size = r.headers.get("X-Linked-Size")
    if size is None and not r.is_redirect:
        size = r.headers.get("Content-Length")
    commit = r.headers.get("X-Repo-Commit")
    if not (commit and etag and size):
        raise UserError(f"{url} did not answer like the Hugging Face Hub (no commit, ETag or "
                        "size): check HF_ENDPOINT")
    return commit, etag, int(size)


def _link(blob, pointer):
    """snapshots/<commit>/<file> -> ../../blobs/<etag>, a relative symlink as huggingface_hub
    makes; a copy if the file system has no symlinks."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.unlink(missing_ok=True)
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:
        shutil.copyfile(blob, pointer)


def snapshot_download(repo_id, *, revision="main", required=("config.json", "model.safetensors"),
                      optional=("tokenizer.json", "vocab.txt")):
    """Fetch a Hub repo's files into the huggingface_hub cache and return the snapshot folder.

    A required file missing on the Hub is an error, an optional one is skipped. The snapshot
    appears only once every file is verified, so a failed call leaves no half-made snapshot."""
    folder = cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if var := _offline_var():
        if snap := _cached(folder, revision, required):
            return snap
        raise UserError(f"{repo_id}@{revision} is not in the cache at {folder} and {var}=1 is set: "
                        "unset it to download")
    try:
        return _download_snapshot(folder, repo_id, revision, required, optional)
    except OSError as e:  # the cache's disk is full or read-only
        raise write_error(e.filename or folder, e, "or set HF_HUB_CACHE to another folder") \
            from None
    except _Unreachable as e:
        if snap := _cached(folder, revision, required):
            return snap
        raise UserError(f"{e}, and {repo_id}@{revision} is not in the cache at {folder}") from None


def _download_snapshot(folder, repo_id, revision, required, optional):
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    headers = {"User-Agent": "tinydistil",
               "Accept-Encoding": "identity"}  # identity: sizes are raw bytes
    if token := _token():
        headers["Authorization"] = f"Bearer {token}"
    commit, found, missing = None, {}, []
    for name in (*required, *optional):
        # Once we know the commit, the rest is resolved at it: a push in between cannot mix two
        # revisions.
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
            sha = etag if _SHA256.fullmatch(etag) else None  # LFS: the ETag is the sha256
            _stream(url, blob.with_name(etag + ".incomplete"), headers=headers, size=size,
                    sha256=sha, desc=f"{repo_id}/{name}", where=f" ({repo_id}@{revision})")
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


class NoCheckpointFolder(UserError):
    """A local path given as a checkpoint is not a folder; callers may catch it to add a hint."""


def checkpoint_folder(name_or_dir: str, revision: str = "main") -> Path:
    """A checkpoint's folder: a value that names a local path (common.looks_like_path) is that
    folder and nothing else; any other value is a Hub repo id, downloaded or found in the cache."""
    if not looks_like_path(name_or_dir):
        return snapshot_download(name_or_dir, revision=revision)
    folder = Path(name_or_dir).expanduser()
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise NoCheckpointFolder(f"no checkpoint folder {name_or_dir} ({what})")
    return folder


# ----------------------------------------------------------------------------- config.json

LAYOUTS = ("bert", "distilbert")  # the two checkpoint layouts: the columns of the name tables
HF_CONFIG_NAMES = {  # BertConfig field -> its config.json name in (BERT, DistilBERT); None: no such
    "vocab_size": ("vocab_size", "vocab_size"),
    "hidden_size": ("hidden_size", "dim"),
    "n_layer": ("num_hidden_layers", "n_layers"),
    "n_head": ("num_attention_heads", "n_heads"),
    "intermediate_size": ("intermediate_size", "hidden_dim"),
    "max_position_embeddings": ("max_position_embeddings", "max_position_embeddings"),
    "type_vocab_size": ("type_vocab_size", None),
    "layer_norm_eps": ("layer_norm_eps", None),  # DistilBERT hard-codes 1e-12
    "pad_token_id": ("pad_token_id", "pad_token_id"),
    "dropout": ("hidden_dropout_prob", "dropout"),
    "attention_dropout": ("attention_probs_dropout_prob", "attention_dropout"),
    "initializer_range": ("initializer_range", "initializer_range"),
}
REQUIRED_CONFIG = {"vocab_size", "hidden_size", "n_layer", "n_head", "intermediate_size",
                   "max_position_embeddings", "type_vocab_size"}


def config_from_hf(d: dict) -> dict:
    """The BertConfig fields a Hugging Face config.json of model_type bert or distilbert sets (old
    and new spellings); what model.py does not implement is refused with the field named."""
    model_type = d.get("model_type")
    if model_type not in LAYOUTS:
        raise UserError(f"config.json: unsupported model_type {model_type!r}; tinydistil reads "
                        f"'bert' and 'distilbert' checkpoints")
    column, fields = LAYOUTS.index(model_type), {"model_type": model_type}
    for ours, names in HF_CONFIG_NAMES.items():
        if names[column] in d:
            fields[ours] = d[names[column]]
        elif ours in REQUIRED_CONFIG and names[column] is not None:
            raise UserError(f"config.json of model_type {model_type!r} lacks {names[column]!r}")
    fields["pad_token_id"] = fields.get("pad_token_id") or 0  # null in some files
    activation = d.get("hidden_act" if model_type == "bert" else "activation", "gelu")
    if activation != "gelu":
        raise UserError(f"config.json: activation {activation!r} is not supported "
                        f"(exact erf 'gelu' only)")
    if not d.get("tie_word_embeddings", d.get("tie_weights_", True)):
        raise UserError("config.json: untied input/output embeddings are not supported")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"config.json: position_embedding_type {d['position_embedding_type']!r} "
                        f"is not supported (absolute only)")
    if fields["hidden_size"] % fields["n_head"]:
        raise UserError(f"config.json: hidden size {fields['hidden_size']} is not a multiple of "
                        f"{fields['n_head']} heads")
    return fields


def config_to_hf(fields: dict) -> dict:
    """config.json for BertForMaskedLM / DistilBertForMaskedLM (BertModel / DistilBertModel without
    an MLM head), from a BertConfig's fields (dataclasses.asdict)."""
    column = LAYOUTS.index(fields["model_type"])
    d = {names[column]: fields[ours] for ours, names in HF_CONFIG_NAMES.items() if names[column]}
    head = "ForMaskedLM" if fields["mlm_head"] else "Model"
    architecture = ("Bert", "DistilBert")[column] + head
    if fields["model_type"] == "bert":
        d.update(hidden_act="gelu", position_embedding_type="absolute")
    else:  # DistilBERT's own fields, with the values the student really has
        d.update(activation="gelu", sinusoidal_pos_embds=False, qa_dropout=0.1,
                 seq_classif_dropout=0.2, tie_weights_=True)
    return {"architectures": [architecture], "model_type": fields["model_type"], **d,
            "tie_word_embeddings": True, "torch_dtype": "float32"}


# ----------------------------------------------------------------------------- safetensors

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_SIZE = 100_000_000  # the official implementation's limit


def load_safetensors(path) -> dict:
    """Read a .safetensors file: u64 little-endian header size N, N bytes of JSON, then the buffer.
    Enforces the official rules; every violation names the file and the tensor."""
    path = Path(path)
    try:
        data = bytearray(path.read_bytes())  # writable, so torch.frombuffer can share it
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    entries, start = _safetensors_header(path, data)
    buffer_len, tensors, end = len(data) - start, {}, 0
    for name, info in entries:
        dtype, shape, (begin, stop) = info.get("dtype"), info.get("shape"), info["data_offsets"]
        if dtype not in DTYPES:
            raise _invalid(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise _invalid(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if begin != end:
            raise _invalid(path, f"tensor {name!r} starts at byte {begin}, expected {end} (offsets "
                                 f"must tile the buffer with no gap or overlap)")
        count = math.prod(shape)
        needed = count * torch.empty(0, dtype=DTYPES[dtype]).element_size()
        if stop - begin != needed:
            raise _invalid(path, f"tensor {name!r} spans {stop - begin} bytes but shape {shape} x "
                                 f"{dtype} needs {needed}")
        if stop > buffer_len:
            raise _invalid(path, f"tensor {name!r} ends at byte {stop} past the {buffer_len}-byte "
                                 f"buffer: truncated?")
        t = torch.empty(0, dtype=DTYPES[dtype])
        if count:
            t = torch.frombuffer(data, dtype=DTYPES[dtype], count=count, offset=start + begin)
        tensors[name], end = t.view(shape), stop
    if end != buffer_len:
        raise _invalid(path, f"{buffer_len - end} trailing bytes are not covered by any tensor")
    return tensors


def _invalid(path, why) -> UserError:
    return UserError(f"{path} is not a valid safetensors file: {why}")


def _safetensors_header(path, data) -> tuple:
    """(the header's (name, entry) pairs in buffer order, where the buffer starts), after checking
    the header's framing and JSON."""
    if len(data) < 8:
        raise _invalid(path, "shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_SIZE:
        raise _invalid(path, f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
    if 8 + n > len(data):
        raise _invalid(path, f"header length {n} runs past the end of the file ({len(data)} "
                             f"bytes): truncated?")
    raw = bytes(data[8:8 + n])
    if not raw.startswith(b"{"):
        raise _invalid(path, "the header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _invalid(path, f"the header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    try:
        return sorted(header.items(), key=_data_offsets), 8 + n
    except (KeyError, TypeError):
        raise _invalid(path, "a tensor entry has no data_offsets pair") from None


def _data_offsets(item) -> tuple:
    return tuple(item[1]["data_offsets"])


def save_safetensors(tensors: dict, path, metadata=None):
    """Write tensors in the safetensors layout, atomically (temp file, then rename)."""
    dtype_names = {v: k for k, v in DTYPES.items()}
    header, offset, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        blob = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference pads the header to 8-byte alignment with spaces

    def write(f):
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)
    atomic_write(path, write)
