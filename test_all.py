"""test_all.py: the tests of tinydistil, all in this one file. Offline, CPU only, about a minute on 2 cores.

    python -m pytest -q test_all.py                 # the whole suite; .ci/run runs it on a clean checkout
    python -m pytest -q test_all.py -k squad        # the tests whose names match

Nothing is downloaded and nothing outside the repository is read: models, tokenizers and datasets are the
small real-format files under fixtures/ (fixtures/tasks/README.md lists the task files), and every download
path runs against a real HTTP server on 127.0.0.1 that the test starts. transformers is never imported.

Sections, in this order, each opened by a `# ------- name` banner (`# -- name` marks a subsection):
    model                model.py: parity with the reference implementation on the committed tiny checkpoints,
                         config parsing, the safetensors reader and writer, checkpoint names and export. Paper:
                         the teacher and student architectures ("DistilBERT: a distilled version of BERT").
    hub                  hub.py: snapshot_download and fetch_url against a server that answers like the Hugging
                         Face Hub (resolve protocol, redirects, Range resumes, injected faults). Infrastructure.
    data and losses      data.py (data dir, tokenizer, WikiText-2 corpus, sequences, length-grouped batches, MLM
                         masking, corpus download) and losses.py (L_ce, L_mlm, L_cos worked by hand). Paper: the
                         training loss and the distillation data (dynamic masking, batches grouped by length).
    pretraining and CLI  tinydistil.py: student initialisation from the teacher, the pretraining loop, checkpoints,
                         exact resumption after SIGKILL, DDP on 2 gloo processes, one-line CLI errors, fill-mask.
                         Paper: student initialisation and distillation.
    tasks                tasks/metrics.py, glue.py, imdb.py, squad.py, report.py: metrics, loaders of the real file
                         layouts, dataset downloads, SQuAD windows and decoding, the report. Paper: section 4 and
                         4.1, Tables 1 and 2.
    fine-tuning          tasks/finetune.py: tiny end-to-end runs on generated task files, TaskModel checkpoints in
                         the reference head layout, errors, `tinydistil.py eval`. Paper: section 4 and 4.1.
    bench                bench.py: the table and JSON, precision modes against float32, the random-weight fallback,
                         the SST-2 accuracy column; speed itself is never asserted. Paper: section 4.2, Table 3.

Fixtures that change the environment are requested by name, so each applies to exactly the tests that carry
it: tasks_offline (TINYDISTIL_OFFLINE=1) on the tasks tests, bench_offline (offline, an empty Hub cache and data
dir) on the bench tests. The one autouse fixture, one_thread, is suite-wide on purpose: torch runs on 1 thread
in this process. The models run here are at most 32 wide (bench.main sets its own thread count for BERT-base),
so a second thread gains nothing, and beside another job on 2 cores it makes torch wait for a core: the
in-process pretraining test took 4 to 64 s at 2 threads under load, 3 s at 1; idle, the suite takes the same
time either way. Subprocesses (the CLI, SIGKILL and DDP tests) keep their own thread settings.
"""

import copy
import functools
import hashlib
import http.server
import json
import math
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import data
import tinydistil
from data import (Batches, Sequences, build_sequences, collate, corpus_texts, data_dir, encode_batch,
                  load_corpus, load_tokenizer, mask_batch, special_ids, token_probs)
from common import UserError
from hub import fetch_url, load_safetensors, save_safetensors, snapshot_download
from losses import L_ce, L_cos, L_mlm, total_loss
from model import BERT, BertConfig
from tasks import finetune, glue, imdb, metrics, report, squad
from tasks.finetune import EvalConfig, TaskModel, run
from tasks.glue import glue_score, task_score
from tasks.metrics import (accuracy, f1, matthews_corrcoef, normalize_answer, pearson, spearman,
                           squad_em, squad_f1)
from tinydistil import PretrainConfig, init_student, layer_map, pretrain

ROOT = Path(__file__).parent
MODELS = ROOT / "fixtures" / "models"  # tiny real-format checkpoints and the shared tokenizer
DATA_FIX = ROOT / "fixtures" / "data"  # tokenizer files and a tiny WikiText-2 split
TASK_FIX = ROOT / "fixtures" / "tasks"  # a few real rows of each task dataset; see its README.md


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """torch on 1 thread for every test in this process; see the module docstring for why."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- model

# Parity with the reference implementation is checked against its outputs saved beside each committed
# checkpoint (fixtures/models/*/reference_outputs.safetensors, made once by scripts/make_fixtures.py).

CHECKPOINTS = ["tiny-bert", "tiny-bert-legacy", "tiny-bert-encoder", "tiny-distilbert"]


def run_reference_batch(model, ref):
    types = ref["token_type_ids"] if model.config.type_vocab_size else None
    with torch.no_grad():
        return model(ref["input_ids"], ref["attention_mask"], types)


def max_diffs(out, ref):
    """Max |ours - reference| over every non-pad position, per output."""
    keep = ref["attention_mask"].bool()
    diffs = {}
    for i, h in enumerate(out.hidden_states):
        diffs[f"hidden_states.{i}"] = (h - ref[f"hidden_states.{i}"])[keep].abs().max().item()
    if "logits" in ref:
        diffs["logits"] = (out.logits - ref["logits"])[keep].abs().max().item()
    if "pooler_output" in ref:
        diffs["pooler_output"] = (out.pooler_output - ref["pooler_output"]).abs().max().item()
    return diffs


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_parity_with_reference(name):
    model = BERT.from_pretrained(str(MODELS / name))
    ref = load_safetensors(MODELS / name / "reference_outputs.safetensors")
    assert not ref["attention_mask"].all(), "the fixture batch must contain padding"
    out = run_reference_batch(model, ref)
    assert len(out.hidden_states) == model.config.n_layer + 1
    assert (out.logits is None) == ("logits" not in ref)
    assert (out.pooler_output is None) == ("pooler_output" not in ref)
    diffs = max_diffs(out, ref)
    print(name, "max difference", max(diffs.values()), diffs)
    assert max(diffs.values()) < 1e-4


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_save_pretrained_round_trip(name, tmp_path):
    model = BERT.from_pretrained(str(MODELS / name))
    model.save_pretrained(tmp_path / "out")
    again = BERT.from_pretrained(str(tmp_path / "out"))
    ref = load_safetensors(MODELS / name / "reference_outputs.safetensors")
    assert max(max_diffs(run_reference_batch(again, ref), ref).values()) < 1e-4
    assert (tmp_path / "out" / "tokenizer.json").is_file() or (tmp_path / "out" / "vocab.txt").is_file()
    # The export uses the reference library's own names, so it loads there unchanged.
    if name != "tiny-bert-legacy":
        theirs = set(load_safetensors(MODELS / name / "model.safetensors"))
        ours = set(load_safetensors(tmp_path / "out" / "model.safetensors"))
        assert ours == theirs - {"embeddings.position_ids"}
        assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == \
            json.loads((MODELS / name / "config.json").read_text())["model_type"]


def test_presets_build_without_download():
    # The paper's Table 3 counts the encoders (BertModel, DistilBertModel): 110M and 66M.
    bert = BERT(replace(BertConfig.preset("bert-base-uncased"), mlm_head=False))
    distil = BERT(replace(BertConfig.preset("distilbert-base-uncased"), mlm_head=False))
    assert round(bert.num_params() / 1e6) == 109  # 109.48M: the paper rounds up to 110
    assert round(distil.num_params() / 1e6) == 66
    with pytest.raises(UserError, match="no preset"):
        BertConfig.preset("gpt2")


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "roberta", "unsupported model_type 'roberta'"),
    ("hidden_act", "relu", "activation 'relu'"),
])
def test_config_rejects_unsupported(field, value, match):
    d = json.loads((MODELS / "tiny-bert" / "config.json").read_text())
    d[field] = value
    with pytest.raises(UserError, match=match):
        BertConfig.from_hf(d)


def test_config_old_and_new_spellings():
    d = json.loads((MODELS / "tiny-distilbert" / "config.json").read_text())
    for k in ("tie_word_embeddings", "tie_weights_", "dtype", "torch_dtype"):
        d.pop(k, None)
    base = BertConfig.from_hf(d)
    assert BertConfig.from_hf({**d, "tie_weights_": True, "torch_dtype": "float32"}) == base
    assert BertConfig.from_hf({**d, "tie_word_embeddings": True, "dtype": "float32"}) == base
    with pytest.raises(UserError, match="untied"):
        BertConfig.from_hf({**d, "tie_weights_": False})


def copy_checkpoint(tmp_path, name="tiny-bert"):
    dst = tmp_path / name
    shutil.copytree(MODELS / name, dst)
    return dst


def write_raw(path, header: dict, buffer: bytes, header_len=None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + buffer)


@pytest.mark.parametrize("case,match", [
    ("empty", "shorter than its 8-byte header"),
    ("huge_header", "exceeds the 100000000-byte limit"),
    ("header_past_end", "runs past the end"),
    ("not_brace", "does not start with '{'"),
    ("bad_json", "not valid JSON"),
    ("gap", "tensor 'b' starts at byte 12, expected 8"),
    ("size_mismatch", "tensor 'a' spans 8 bytes but shape"),
    ("truncated", "tensor 'b' ends at byte 16 past the 12-byte buffer"),
    ("trailing", "4 trailing bytes"),
    ("bad_dtype", "unsupported dtype 'F128'"),
])
def test_safetensors_reader_rules(tmp_path, case, match):
    p = tmp_path / "m.safetensors"
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    buf = bytes(16)
    if case == "empty":
        p.write_bytes(b"\x01\x00")
    elif case == "huge_header":
        write_raw(p, ok, buf, header_len=200_000_000)
    elif case == "header_past_end":
        write_raw(p, ok, b"", header_len=10_000)
    elif case == "not_brace":
        p.write_bytes(struct.pack("<Q", 4) + b"[1,2")
    elif case == "bad_json":
        p.write_bytes(struct.pack("<Q", 5) + b"{oops")
    elif case == "gap":
        write_raw(p, {**ok, "b": {**ok["b"], "data_offsets": [12, 20]}}, bytes(20))
    elif case == "size_mismatch":
        write_raw(p, {**ok, "a": {**ok["a"], "shape": [3]}}, buf)
    elif case == "truncated":
        write_raw(p, ok, buf[:12])
    elif case == "trailing":
        write_raw(p, ok, buf + bytes(4))
    elif case == "bad_dtype":
        write_raw(p, {**ok, "a": {**ok["a"], "dtype": "F128"}}, buf)
    with pytest.raises(UserError, match=match) as e:
        load_safetensors(p)
    assert str(p) in str(e.value)


def test_safetensors_round_trip(tmp_path):
    tensors = {"f": torch.randn(3, 4), "h": torch.randn(5).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(6).view(2, 3), "e": torch.zeros(0, 3), "u": torch.tensor([1, 2], dtype=torch.uint8)}
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0  # data starts 8-byte aligned
    back = load_safetensors(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    folder = copy_checkpoint(tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        BERT.from_pretrained(str(folder))


def rewrite(folder, edit):
    tensors = dict(load_safetensors(folder / "model.safetensors"))
    edit(tensors)
    save_safetensors(tensors, folder / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    folder = copy_checkpoint(tmp_path)
    rewrite(folder, lambda t: t.pop("bert.encoder.layer.1.attention.self.key.bias"))
    with pytest.raises(UserError, match=r"'bert.encoder.layer.1.attention.self.key.bias' .* is missing"):
        BERT.from_pretrained(str(folder))


def test_unexpected_tensor_is_named(tmp_path):
    folder = copy_checkpoint(tmp_path)
    rewrite(folder, lambda t: t.update({"classifier.weight": torch.zeros(2, 32)}))
    with pytest.raises(UserError, match="'classifier.weight' is not used"):
        BERT.from_pretrained(str(folder))


def test_config_that_disagrees_with_weights(tmp_path):
    folder = copy_checkpoint(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"'bert.encoder.layer.0.intermediate.dense.weight' has shape \[48, 32\]"):
        BERT.from_pretrained(str(folder))


def test_missing_files(tmp_path):
    folder = copy_checkpoint(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors is missing"):
        BERT.from_pretrained(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError):
        BERT.from_pretrained(str(folder))


def test_logits_only_where_asked():
    model = BERT.from_pretrained(str(MODELS / "tiny-distilbert"))
    ref = load_safetensors(MODELS / "tiny-distilbert" / "reference_outputs.safetensors")
    out = model(ref["input_ids"], ref["attention_mask"], return_logits=False)
    assert out.logits is None
    keep = ref["attention_mask"].bool()
    rows = model.mlm_logits(out.hidden_states[-1][keep])  # the pretraining loop's path
    assert (rows - ref["logits"][keep]).abs().max() < 1e-4


def test_return_unused_hands_back_task_heads(tmp_path):
    folder = copy_checkpoint(tmp_path)
    rewrite(folder, lambda t: t.update({"classifier.weight": torch.ones(2, 32)}))
    model, unused = BERT.from_pretrained(str(folder), return_unused=True)
    assert set(unused) == {"classifier.weight"} and unused["classifier.weight"].sum() == 64


# ----------------------------------------------------------------------------- hub

# The fake Hub speaks the resolve protocol (X-Repo-Commit, ETag, a 302 to a CDN path with X-Linked-Etag and
# X-Linked-Size for the LFS file, 404 with X-Error-Code, Range requests) and can inject faults: a corrupt blob,
# a connection cut mid-body, a short body, a CDN that ignores Range.

REPO, GATED, RENAMED, HUB_TOKEN = "org/tiny-bert", "org/gated", "org/old-name", "hf_secret"
COMMIT = hashlib.sha1(b"the only commit").hexdigest()
HUB_MODEL = random.Random(0).randbytes(200_000)  # stands in for model.safetensors: this tests the transport only
HUB_FILES = {"config.json": b'{"model_type": "bert", "hidden_size": 8}\n', "model.safetensors": HUB_MODEL,
             "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n"}  # no tokenizer.json: the optional file to skip


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def git_sha1(data):  # the Hub's ETag for a small (non-LFS) file
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.blobs = {sha256(HUB_MODEL): HUB_MODEL}  # what the CDN serves, by sha256
        self.log = []  # (method, path, request headers) of every request
        self.fault = None  # "corrupt" | "cut" | "short" | "no-range", applied by the CDN
        self.cdn = ""  # prefix of the CDN Location: "" is a relative redirect, else an absolute URL


class HubHandler(http.server.BaseHTTPRequestHandler):
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
        fake_hub = self.server.fake_hub
        fake_hub.log.append((self.command, self.path, dict(self.headers)))
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
        if repo == GATED and self.headers.get("Authorization") != f"Bearer {HUB_TOKEN}":
            return self.send(403, {"X-Error-Code": "GatedRepo"}, b"Access to this model is restricted", body)
        if rev not in ("main", COMMIT):
            return self.send(404, {"X-Error-Code": "RevisionNotFound"}, b"Invalid rev id", body)
        if name not in HUB_FILES:
            return self.send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"Entry not found", body)
        data = HUB_FILES[name]
        if name == "model.safetensors":
            # The redirect's own Content-Length is its short body, not the file: a client must use X-Linked-Size.
            loc = f"{fake_hub.cdn}/cdn/{sha256(data)}"
            meta = {"Location": loc, "X-Repo-Commit": COMMIT, "ETag": f'"{sha256(data)}"',
                    "X-Linked-Etag": f'"{sha256(data)}"', "X-Linked-Size": str(len(data))}
            return self.send(302, meta, f"Found. Redirecting to {loc}".encode(), body)
        self.send_range(data, {"X-Repo-Commit": COMMIT, "ETag": f'"{git_sha1(data)}"'}, body)

    def cdn(self, sha, body):
        fake_hub = self.server.fake_hub
        if sha not in fake_hub.blobs:
            return self.send(404, {}, b"NoSuchKey", body)
        data = fake_hub.blobs[sha]
        if fake_hub.fault == "corrupt":
            data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
        self.send_range(data, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}, body, fake_hub.fault)  # S3-style ETag

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
def fake_hub(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.fake_hub = fake = FakeHub()
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


def repo_dir(fake_hub, repo=REPO):
    return fake_hub.cache / ("models--" + repo.replace("/", "--"))


def gets(fake_hub, prefix="/cdn/"):
    return [headers for method, path, headers in fake_hub.log if method == "GET" and path.startswith(prefix)]


def assert_nothing_left(fake_hub):
    folder = repo_dir(fake_hub)
    assert not (folder / "blobs" / sha256(HUB_MODEL)).exists()
    assert not (folder / "snapshots").exists()
    assert not (folder / "refs" / "main").exists()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_writes_the_huggingface_hub_layout(fake_hub):
    snap = snapshot_download(REPO)
    folder = repo_dir(fake_hub)
    assert snap == folder / "snapshots" / COMMIT
    assert (folder / "refs" / "main").read_text() == COMMIT
    etags = {name: sha256(data) if name == "model.safetensors" else git_sha1(data) for name, data in HUB_FILES.items()}
    assert sorted(p.name for p in (folder / "blobs").iterdir()) == sorted(etags.values())
    assert sorted(p.name for p in snap.iterdir()) == sorted(HUB_FILES)
    for name, data in HUB_FILES.items():
        assert (snap / name).is_symlink()
        assert str((snap / name).readlink()) == f"../../blobs/{etags[name]}"
        assert (snap / name).read_bytes() == data
    assert (folder / ".no_exist" / COMMIT / "tokenizer.json").is_file()  # optional file skipped, as hf marks it
    heads = [(path, headers) for method, path, headers in fake_hub.log if method == "HEAD"]
    assert all(h["Accept-Encoding"] == "identity" for _, h in heads)
    assert heads[0][0] == f"/{REPO}/resolve/main/config.json"
    assert all(f"/resolve/{COMMIT}/" in path for path, _ in heads[1:])  # pinned once the commit is known
    assert len(gets(fake_hub)) == 1 and "Range" not in gets(fake_hub)[0]


def test_cached_snapshot_is_reused_and_offline_makes_no_request(fake_hub, monkeypatch):
    snap = snapshot_download(REPO)
    fake_hub.log.clear()
    assert snapshot_download(REPO) == snap
    assert [m for m, _, _ in fake_hub.log] == ["HEAD"] * 4  # online: metadata only, no download
    fake_hub.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert snapshot_download(REPO) == snap
    assert snapshot_download(REPO, revision=COMMIT) == snap
    assert fake_hub.log == []


def test_offline_with_empty_cache_is_a_user_error(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"not in the cache at .*HF_HUB_OFFLINE=1 is set"):
        snapshot_download(REPO)
    assert fake_hub.log == []


def test_unreachable_hub_falls_back_to_the_cache(fake_hub, monkeypatch):
    snap = snapshot_download(REPO)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert snapshot_download(REPO) == snap
    with pytest.raises(UserError, match="cannot reach the Hub.*not in the cache"):
        snapshot_download("org/other")


def test_corrupt_blob_leaves_nothing(fake_hub):
    fake_hub.fault = "corrupt"
    with pytest.raises(UserError, match="corrupt"):
        snapshot_download(REPO)
    assert_nothing_left(fake_hub)
    assert not list((repo_dir(fake_hub) / "blobs").glob("*.incomplete"))


def test_short_body_leaves_nothing(fake_hub):
    fake_hub.fault = "short"
    with pytest.raises(UserError, match="expected 200000"):
        snapshot_download(REPO)
    assert_nothing_left(fake_hub)
    assert not list((repo_dir(fake_hub) / "blobs").glob("*.incomplete"))


def test_cut_download_is_resumed_with_a_range_request(fake_hub):
    fake_hub.fault = "cut"
    with pytest.raises(UserError, match="run again to resume"):
        snapshot_download(REPO)
    assert_nothing_left(fake_hub)
    partial = repo_dir(fake_hub) / "blobs" / (sha256(HUB_MODEL) + ".incomplete")
    kept = partial.read_bytes()
    assert 0 < len(kept) <= 100_000 and HUB_MODEL.startswith(kept)  # what arrived before the cut, whole chunks
    fake_hub.fault, fake_hub.log = None, []
    snap = snapshot_download(REPO)
    assert [h.get("Range") for h in gets(fake_hub)] == [f"bytes={len(kept)}-"]
    assert (snap / "model.safetensors").read_bytes() == HUB_MODEL
    assert not partial.exists()


def test_server_ignoring_range_restarts_the_file(fake_hub):
    partial = repo_dir(fake_hub) / "blobs" / (sha256(HUB_MODEL) + ".incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 100)  # wrong bytes: appending the 200 body to them would fail the sha256
    fake_hub.fault = "no-range"
    snap = snapshot_download(REPO)
    assert [h.get("Range") for h in gets(fake_hub)] == ["bytes=100-"]
    assert (snap / "model.safetensors").read_bytes() == HUB_MODEL


def test_unknown_repo(fake_hub):
    with pytest.raises(UserError, match="repository org/nope not found on the Hub"):
        snapshot_download("org/nope")


def test_renamed_repo_redirect_is_followed(fake_hub):
    snap = snapshot_download(RENAMED)
    assert snap == repo_dir(fake_hub, RENAMED) / "snapshots" / COMMIT  # cached under the name asked for, as hf does
    assert (snap / "model.safetensors").read_bytes() == HUB_MODEL


def test_unknown_revision(fake_hub):
    with pytest.raises(UserError, match="revision 'v9' not found"):
        snapshot_download(REPO, revision="v9")


def test_missing_required_file(fake_hub):
    with pytest.raises(UserError, match="no pytorch_model.bin"):
        snapshot_download(REPO, required=("config.json", "pytorch_model.bin"))
    assert not (repo_dir(fake_hub) / "snapshots").exists()


def test_gated_repo_needs_hf_token_which_stays_on_the_hub(fake_hub, monkeypatch):
    with pytest.raises(UserError, match="HF_TOKEN"):
        snapshot_download(GATED)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    fake_hub.cdn = f"http://localhost:{fake_hub.port}"  # another host, like the real CDN
    snap = snapshot_download(GATED)
    assert (snap / "model.safetensors").read_bytes() == HUB_MODEL
    assert "Authorization" not in gets(fake_hub)[0]


def test_fetch_url(fake_hub, tmp_path):
    url, dest = f"{fake_hub.url}/cdn/{sha256(HUB_MODEL)}", tmp_path / "data" / "sub" / "model.bin"
    assert fetch_url(url, dest, sha256=sha256(HUB_MODEL), size=len(HUB_MODEL)) == dest
    assert dest.read_bytes() == HUB_MODEL
    assert not dest.with_name("model.bin.incomplete").exists()
    fake_hub.log.clear()
    assert fetch_url(url, dest) == dest
    assert fake_hub.log == []


def test_fetch_url_sha_mismatch(fake_hub, tmp_path):
    dest = tmp_path / "model.bin"
    with pytest.raises(UserError, match="corrupt"):
        fetch_url(f"{fake_hub.url}/cdn/{sha256(HUB_MODEL)}", dest, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TINYDISTIL_OFFLINE"])
def test_fetch_url_offline(fake_hub, tmp_path, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    url, dest = f"{fake_hub.url}/cdn/{sha256(HUB_MODEL)}", tmp_path / "model.bin"
    with pytest.raises(UserError) as err:
        fetch_url(url, dest)
    assert url in str(err.value) and str(dest) in str(err.value) and var in str(err.value)
    assert fake_hub.log == []


def test_fetch_url_resumes(fake_hub, tmp_path):
    dest = tmp_path / "model.bin"
    dest.with_name("model.bin.incomplete").write_bytes(HUB_MODEL[:1000])
    fetch_url(f"{fake_hub.url}/cdn/{sha256(HUB_MODEL)}", dest, sha256=sha256(HUB_MODEL))
    assert [h.get("Range") for h in gets(fake_hub)] == ["bytes=1000-"]
    assert dest.read_bytes() == HUB_MODEL


def test_fetch_url_errors_name_url_and_path(fake_hub, tmp_path):
    dest = tmp_path / "x.zip"
    cases = [(f"{fake_hub.url}/cdn/{'0' * 64}", "HTTP 404"),
             (f"http://127.0.0.1:{closed_port()}/x.zip", "ConnectionError")]
    for url, why in cases:
        with pytest.raises(UserError, match=why) as err:
            fetch_url(url, dest)
        assert url in str(err.value) and str(dest) in str(err.value)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- data and losses

# fixtures/data/: a 156-token WordPiece vocab.txt, the same tokenizer saved as tokenizer.json with padding
# Fixed 128 and truncation 128 (as published checkpoints ship it), and a tiny WikiText-2 train split in the real
# `.tokens` and `.raw` formats. The download tests serve a zip in the wikitext-2-raw-v1.zip layout.

@pytest.fixture
def data_tok():
    return load_tokenizer(DATA_FIX / "tok_json")


@pytest.fixture
def wiki_root(tmp_path):
    """A data dir already holding both WikiText-2 layouts, so nothing is downloaded."""
    for folder, name in (("wikitext-2", "wiki.train.tokens"), ("wikitext-2-raw", "wiki.train.raw")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes((DATA_FIX / name).read_bytes())
    return tmp_path


# -- data dir, tokenizer

def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TINYDISTIL_DATA", raising=False)
    assert data_dir() == tmp_path / ".cache" / "tinydistil"
    monkeypatch.setenv("TINYDISTIL_DATA", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data_dir("~/x") == tmp_path / "x"


def test_tokenizer_json_has_padding_and_truncation_reset(data_tok):
    raw = __import__("tokenizers").Tokenizer.from_file(str(DATA_FIX / "tok_json" / "tokenizer.json"))
    assert raw.padding is not None and raw.truncation is not None  # the fixture is like the published files
    assert data_tok.padding is None and data_tok.truncation is None
    enc = data_tok.encode("The tiny railway")
    assert enc.tokens == ["[CLS]", "the", "tiny", "railway", "[SEP]"]
    assert len(data_tok.encode("a " * 300).ids) == 302


def test_tokenizer_from_vocab_txt_matches_json(data_tok):
    vt = load_tokenizer(DATA_FIX / "tok_vocab")
    assert vt.padding is None and vt.truncation is None
    for text, pair in [("The Tiny Railway , 1904 zq", None), ("old station", "Green engine shed")]:
        a = data_tok.encode(text, pair) if pair else data_tok.encode(text)
        b = vt.encode(text, pair) if pair else vt.encode(text)
        assert a.ids == b.ids and a.type_ids == b.type_ids
    assert vt.encode("zq").tokens == ["[CLS]", "z", "##q", "[SEP]"]
    assert special_ids(vt) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def test_tokenizer_missing_or_corrupt(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "mod')
    with pytest.raises(UserError, match="cannot read the tokenizer"):
        load_tokenizer(tmp_path)


def test_encode_batch_pads_to_longest_and_truncates_pairs(data_tok):
    out = encode_batch(data_tok, ["the line", "the old station was closed"])
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].shape == (2, 7)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert out["input_ids"][0, 4:].tolist() == [0, 0, 0]
    out = encode_batch(data_tok, ["a b c d e f g h"], pairs=["x y"], max_len=8)
    assert data_tok.id_to_token(int(out["input_ids"][0, 0])) == "[CLS]"
    # longest_first trims the longer text: 8 = CLS + 3 + SEP + 2 + SEP
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    assert [data_tok.id_to_token(int(i)) for i in out["input_ids"][0]] == \
        ["[CLS]", "a", "b", "c", "[SEP]", "x", "y", "[SEP]"]


# -- corpus text

def test_wikitext_tokens_cleanup(wiki_root):
    texts = corpus_texts("wikitext-2", wiki_root)
    assert len(texts) == 5  # blank lines and the two headings are gone
    assert not any(t.startswith("=") for t in texts)
    assert "narrow-gauge line built in 1,000 days" in texts[0]
    assert "3.5 miles along the [UNK] valley" in texts[0] and "2,000 passengers" in texts[0]
    assert "@" not in " ".join(texts) and "<unk>" not in " ".join(texts)
    assert texts[3] == "Short line ."


def test_raw_corpus_and_user_text(wiki_root, tmp_path):
    raw = corpus_texts("wikitext-2-raw", wiki_root)
    assert len(raw) == 5 and "the Elder valley" in raw[0] and "narrow-gauge" in raw[0]
    user = tmp_path / "mine"
    user.mkdir()
    (user / "b.txt").write_text("second file line\n")
    (user / "a.txt").write_text("first @-@ line kept as is\n\n  <unk> too  \n")
    (user / "skip.md").write_text("not a txt file\n")
    assert corpus_texts(str(user), wiki_root) == ["first @-@ line kept as is", "<unk> too", "second file line"]
    assert corpus_texts(str(user / "b.txt"), wiki_root) == ["second file line"]


def test_unreadable_or_missing_corpus(tmp_path):
    with pytest.raises(UserError, match="not wikitext-2-raw or wikitext-2"):
        corpus_texts(str(tmp_path / "nope.txt"), tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="cannot read the corpus file"):
        corpus_texts(str(tmp_path / "bin.txt"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        corpus_texts(str(tmp_path / "empty"), tmp_path)


# -- sequences

IDS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def test_long_texts_chunked_with_cls_sep_readded():
    text = list(range(10, 310))  # 300 tokens -> 302 with CLS/SEP
    seqs, stats = build_sequences([text], IDS, seq_len=128)
    # chunks of seq_len - 2 of [CLS] + text + [SEP], as LmSeqsDataset.divide_chunks:
    # [CLS] + 125 (+ [SEP]), [CLS] + 126 + [SEP], [CLS] + 49 + the original [SEP]
    assert [len(s) for s in seqs] == [127, 128, 51]
    assert all(s[0] == 2 and s[-1] == 3 and len(s) <= 128 for s in seqs)
    assert [t for s in seqs for t in s[1:-1]] == text
    assert stats["chunks"] == 3 and stats["sequences"] == 3 and stats["tokens"] == 306


def test_short_and_unk_heavy_sequences_dropped():
    ok = list(range(10, 20))             # 12 tokens with CLS/SEP: kept
    short = list(range(10, 19))          # 11 tokens: dropped
    unk_half = [1] * 6 + [10] * 4        # 6 [UNK] of 12: dropped
    unk_less = [1] * 5 + [10] * 5        # 5 of 12: kept
    seqs, stats = build_sequences([ok, short, unk_half, unk_less], IDS, seq_len=128)
    assert [s[1:-1] for s in seqs] == [ok, unk_less]
    assert (stats["dropped_short"], stats["dropped_unk"], stats["sequences"]) == (1, 1, 2)


def test_load_corpus_sequences_and_cache_round_trip(wiki_root, data_tok, monkeypatch):
    seqs = load_corpus("wikitext-2", data_tok, wiki_root, data_fraction=1.0, seq_len=32)
    ids = special_ids(data_tok)
    assert seqs.ids.dtype == np.uint16
    # texts of 45, 24, 40, 5 and 15 tokens: 45 -> 31 + 16, 40 -> 31 + 11 (too short), "Short line ." too
    # short, the last one mostly [UNK]
    assert seqs.stats == {"texts": 5, "chunks": 7, "dropped_short": 2, "dropped_unk": 1, "sequences": 4,
                          "tokens": 31 + 16 + 24 + 31}
    assert all(s[0] == ids["cls"] and s[-1] == ids["sep"] and 12 <= len(s) <= 32 for s in map(seqs.__getitem__, range(len(seqs))))
    first = [data_tok.id_to_token(int(i)) for i in seqs[0][:8]]
    assert first == ["[CLS]", "the", "tiny", "railway", "is", "a", "narrow", "-"]
    assert ids["unk"] in seqs.ids  # the cleaned <unk> became the tokenizer's [UNK]
    assert len(list((wiki_root / "cache").glob("*/meta.json"))) == 1

    monkeypatch.setattr(data, "iter_texts", lambda *a, **k: pytest.fail("the cache was not used"))
    again = load_corpus("wikitext-2", data_tok, wiki_root, data_fraction=1.0, seq_len=32)
    assert np.array_equal(again.ids, seqs.ids) and np.array_equal(again.offsets, seqs.offsets)
    assert again.stats == seqs.stats
    monkeypatch.undo()

    part = load_corpus("wikitext-2", data_tok, wiki_root, data_fraction=0.4, seq_len=32)  # first 2 of 5 texts
    assert part.stats["texts"] == 2 and len(list((wiki_root / "cache").glob("*/meta.json"))) == 2
    assert np.array_equal(part.ids, seqs.ids[:len(part.ids)])

    cache = sorted((wiki_root / "cache").glob("*/tokens.bin"), key=lambda p: p.stat().st_mtime_ns)[0]
    cache.unlink()  # seqs maps the old file: damage a new one
    cache.write_bytes(b"garbage")  # a damaged cache is rebuilt
    again = load_corpus("wikitext-2", data_tok, wiki_root, data_fraction=1.0, seq_len=32)
    assert np.array_equal(again.ids, seqs.ids)
    assert not list((wiki_root / "cache").glob("*.tmp"))


def test_empty_corpus_and_bad_fraction(tmp_path, data_tok):
    (tmp_path / "few.txt").write_text("too short\n\nalso short\n")
    with pytest.raises(UserError, match="no sequence"):
        load_corpus(str(tmp_path / "few.txt"), data_tok, tmp_path)
    with pytest.raises(UserError, match="--data-fraction"):
        load_corpus(str(tmp_path / "few.txt"), data_tok, tmp_path, data_fraction=0)


def test_token_probs():
    seqs = Sequences(np.array([2, 5, 5, 5, 6, 3, 2, 5, 3], dtype=np.uint16), np.array([0, 6, 9]))
    p = token_probs(seqs, vocab_size=8, special=IDS.values())
    assert p.dtype == torch.float32 and p.shape == (8,)
    assert p[:5].tolist() == [0.0] * 5  # special tokens are never masked
    assert p[5].item() == pytest.approx(4 ** -0.7) and p[6].item() == 1.0 and p[7].item() == 1.0  # max(count, 1)
    with pytest.raises(UserError, match="do not match"):
        token_probs(seqs, vocab_size=6, special=[])


# -- batches

def lengths_for_test(n=103, seed=1):
    return np.random.default_rng(seed).integers(12, 129, size=n)


def test_batches_cover_every_sequence_once_grouped_by_length():
    lengths = lengths_for_test()
    b = Batches(lengths, batch_size=8, seed=3)
    batches = b.epoch_batches(0)
    assert len(batches) == len(b) == math.ceil(103 / 8)
    assert sorted(i for bt in batches for i in bt) == list(range(103))
    full_from_bucket = [bt for bt in batches if len(set((lengths[bt] + 1) // 4)) == 1]
    assert len(full_from_bucket) >= 1 and all(len(bt) == 8 for bt in full_from_bucket)
    assert b.epoch_batches(0) == batches                     # deterministic from (seed, epoch)
    assert b.epoch_batches(1) != batches                     # reshuffled every epoch
    assert Batches(lengths, 8, seed=4).epoch_batches(0) != batches
    assert b.epoch_batches(0, start=5) == batches[5:]        # resume skips consumed batches


def test_batches_sharded_across_ranks():
    lengths = lengths_for_test()
    full = Batches(lengths, batch_size=4, seed=0).epoch_batches(2)  # 26 batches
    shards = [Batches(lengths, 4, seed=0, rank=r, world_size=3).epoch_batches(2) for r in range(3)]
    assert [len(s) for s in shards] == [8, 8, 8]  # even, so every rank steps together
    assert shards[1] == full[1:24:3]
    seen = [i for s in shards for bt in s for i in bt]
    assert len(seen) == len(set(seen))
    with pytest.raises(UserError, match="fewer batches"):
        Batches(lengths[:5], 4, world_size=3)


def test_stream_resumes_at_data_position():
    b = Batches(lengths_for_test(20), batch_size=8)  # 3 batches per epoch
    it = b.stream()
    run = [next(it) for _ in range(7)]
    assert [(e, i) for e, i, _ in run] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    resumed = b.stream(epoch=1, start=1)
    assert [next(resumed) for _ in range(3)] == run[4:]


def test_collate_pads_to_longest():
    seqs = Sequences(np.array([2, 7, 8, 3, 2, 9, 3], dtype=np.uint16), np.array([0, 4, 7]))
    ids, mask = collate(seqs, [1, 0], pad_id=0)
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.tolist() == [[2, 9, 3, 0], [2, 7, 8, 3]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


# -- masking

def random_batch(B=64, T=128, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, T + 1, (B,), generator=g)
    ids = torch.randint(5, V, (B, T), generator=g)
    ids[:, 0] = IDS["cls"]
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids[torch.arange(B), lengths - 1] = IDS["sep"]
    ids[mask == 0] = IDS["pad"]
    ids[3, 5] = IDS["unk"]
    seqs = Sequences(ids[mask.bool()].numpy().astype(np.uint16), np.concatenate([[0], lengths.cumsum(0).numpy()]))
    return ids, mask, token_probs(seqs, V, IDS.values())


def test_mask_count_and_positions():
    ids, mask, probs = random_batch()
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_batch(ids, mask, probs, IDS["mask"], 1000, g)
    picked = labels != -100
    assert picked.sum().item() == math.ceil(0.15 * mask.sum().item())
    assert torch.equal(labels[picked], ids[picked])
    assert (ids[picked] >= 5).all()  # never [PAD], [UNK], [CLS], [SEP], [MASK]
    assert torch.equal(masked[~picked], ids[~picked])


def test_mask_80_10_10_and_rare_tokens_favoured():
    ids, mask, probs = random_batch(B=256, V=200)
    masked, labels = mask_batch(ids, mask, probs, IDS["mask"], 200, torch.Generator().manual_seed(1))
    picked = labels != -100
    n = picked.sum().item()
    is_mask = (masked[picked] == IDS["mask"]).float().mean().item()
    same = (masked[picked] == ids[picked]).float().mean().item()
    assert abs(is_mask - 0.8) < 0.02
    assert abs(same - (0.1 + 0.1 / 200)) < 0.02  # "kept" plus random draws that hit the same id
    assert n > 2000
    # mlm_smoothing: a token seen once in the batch is far more likely picked than a frequent one
    ids2 = torch.full((4, 100), 7)
    ids2[:, 0], ids2[:, -1], ids2[0, 50] = IDS["cls"], IDS["sep"], 8
    seqs = Sequences(ids2.flatten().numpy().astype(np.uint16), np.arange(0, 401, 100))
    p = token_probs(seqs, 10, IDS.values())
    hits = sum((mask_batch(ids2, torch.ones_like(ids2), p, 4, 10, torch.Generator().manual_seed(s))[1][0, 50] != -100).item()
               for s in range(200))
    assert hits > 150  # weight 1 vs 391 ** -0.7 for each copy of the frequent token


def test_mask_is_reproducible_from_the_generator():
    ids, mask, probs = random_batch(B=8)
    a = mask_batch(ids, mask, probs, 4, 1000, torch.Generator().manual_seed(5))
    b = mask_batch(ids, mask, probs, 4, 1000, torch.Generator().manual_seed(5))
    c = mask_batch(ids, mask, probs, 4, 1000, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    g = torch.Generator().manual_seed(5)
    mask_batch(ids, mask, probs, 4, 1000, g)
    state = g.get_state()
    second = mask_batch(ids, mask, probs, 4, 1000, g)  # a resumed run restores the state and continues
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(mask_batch(ids, mask, probs, 4, 1000, g2)[0], second[0])


# -- download

class WikitextHandler(http.server.BaseHTTPRequestHandler):
    body, agents = b"", []

    def do_GET(self):
        ua = self.headers.get("User-Agent", "")
        type(self).agents.append(ua)
        if self.path != "/wikitext-2-raw-v1.zip" or not ua.startswith("Mozilla/5.0"):
            self.send_error(403 if self.path == "/wikitext-2-raw-v1.zip" else 404)  # like the real host
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def wikitext_server(monkeypatch):
    WikitextHandler.agents = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WikitextHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(data, "WIKITEXT_URL", f"http://127.0.0.1:{httpd.server_address[1]}/")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TINYDISTIL_OFFLINE", raising=False)
    yield WikitextHandler
    httpd.shutdown()
    httpd.server_close()


def wikitext_zip(tmp_path):
    path = tmp_path / "src.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("wikitext-2-raw/", "")
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-2-raw/wiki.{split}.raw", (DATA_FIX / "wiki.train.raw").read_bytes())
    return path.read_bytes()


def test_download_extract_then_offline(wikitext_server, tmp_path, data_tok, monkeypatch):
    wikitext_server.body = wikitext_zip(tmp_path)
    root = tmp_path / "data"
    seqs = load_corpus("wikitext-2-raw", data_tok, root, data_fraction=1.0)
    assert wikitext_server.agents and all(a.startswith("Mozilla/5.0") for a in wikitext_server.agents)
    assert "python" not in wikitext_server.agents[0].lower()
    for split in ("train", "valid", "test"):
        assert (root / "wikitext-2-raw" / f"wiki.{split}.raw").read_bytes() == \
            (DATA_FIX / "wiki.train.raw").read_bytes()
    assert seqs.stats["texts"] == 5 and len(seqs) == 4
    assert not [p for p in root.rglob("*") if p.suffix in (".tmp", ".incomplete")]

    (root / "cache").rename(tmp_path / "old_cache")
    (root / "wikitext-2-raw-v1.zip").unlink()
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")  # the extracted files alone suffice
    n = len(wikitext_server.agents)
    assert np.array_equal(load_corpus("wikitext-2-raw", data_tok, root, data_fraction=1.0).ids, seqs.ids)
    assert len(wikitext_server.agents) == n
    with pytest.raises(UserError):
        load_corpus("wikitext-2", data_tok, root)  # not there and offline: a clear error, no traceback


def test_download_of_a_bad_zip_is_refused_and_removed(wikitext_server, tmp_path, data_tok):
    wikitext_server.body = b"<html>not a zip</html>"
    with pytest.raises(UserError, match="not a valid wikitext-2-raw-v1.zip"):
        load_corpus("wikitext-2-raw", data_tok, tmp_path)
    assert not (tmp_path / "wikitext-2-raw-v1.zip").exists()
    assert not (tmp_path / "wikitext-2-raw" / "wiki.train.raw").exists()


# -- losses

def test_L_ce_by_hand():
    s = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    T = 1.0
    # row 1: p = (3/4, 1/4), q = (1/2, 1/2); row 2: p = (1/2, 1/2), q = (3/4, 1/4)
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert L_ce(s, t, temperature=T).item() == pytest.approx((kl1 + kl2) / 2, abs=1e-6)
    # T = 2 halves the logits: p = softmax(log3 / 2, 0) = (sqrt3, 1) / (sqrt3 + 1), then times T^2
    r = math.sqrt(3.0)
    p = (r / (r + 1), 1 / (r + 1))
    kl1 = p[0] * math.log(p[0] / 0.5) + p[1] * math.log(p[1] / 0.5)
    kl2 = 0.5 * math.log(0.5 / p[0]) + 0.5 * math.log(0.5 / p[1])
    assert L_ce(s, t).item() == pytest.approx(4 * (kl1 + kl2) / 2, abs=1e-6)
    assert L_ce(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_L_ce_float32_under_bfloat16_inputs():
    s = torch.randn(5, 11).bfloat16()
    t = torch.randn(5, 11).bfloat16()
    out = L_ce(s, t)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(L_ce(s.float(), t.float()).item())


def test_L_ce_gradient_matches_autograd_through_kl_div():
    # 150 rows: more than two chunks, the last one partial; bfloat16 student logits as under autocast
    s = (3 * torch.randn(150, 37)).requires_grad_()
    t = 3 * torch.randn(150, 37)
    for dtype in (torch.float32, torch.bfloat16):
        x = s.detach().to(dtype).requires_grad_()
        (2.5 * L_ce(x, t, temperature=2.0)).backward()
        y = s.detach().to(dtype).float().requires_grad_()
        ref = F.kl_div(F.log_softmax(y / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
        (2.5 * ref).backward()
        assert L_ce(x, t).item() == pytest.approx(ref.item(), rel=1e-5)
        assert x.grad.dtype == dtype
        assert (x.grad.float() - y.grad).abs().max() < (1e-6 if dtype == torch.float32 else 1e-4)


def test_L_mlm_by_hand():
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]], [[5.0, -5.0], [0.0, math.log(4.0)]]])
    labels = torch.tensor([[0, -100], [-100, 1]])
    expected = (-math.log(3 / 4) - math.log(4 / 5)) / 2
    assert L_mlm(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_L_cos_by_hand():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    t = torch.tensor([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    # cosines 0, 1, -1 -> losses 1, 0, 2
    assert L_cos(s, t).item() == pytest.approx(1.0, abs=1e-6)
    assert L_cos(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)


def test_total_loss():
    terms = {"ce": torch.tensor(1.0), "mlm": torch.tensor(2.0), "cos": torch.tensor(0.5)}
    assert total_loss(terms, {"ce": 5.0, "mlm": 2.0, "cos": 1.0}).item() == pytest.approx(9.5)


# ----------------------------------------------------------------------------- pretraining and CLI

# pretrain() runs in this process; the SIGKILL, DDP and CLI tests run tinydistil.py as a subprocess.

TEACHER = str(MODELS / "tiny-bert")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 lines of words from the fixture tokenizer's vocabulary: enough for a few dozen batches."""
    words = [w for w in (MODELS / "tokenizer" / "vocab.txt").read_text().split() if w.isalpha() and len(w) > 2]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))
                              for _ in range(300)) + "\n")
    return path


def pretrain_config(tmp_path, corpus, **kw):
    base = dict(teacher=TEACHER, out=str(tmp_path / "out"), data=str(corpus), data_dir=str(tmp_path / "data"),
                n_layer=2, batch_size=8, seq_len=32, max_steps=6, log_every=2, save_every=3, seed=0)
    return PretrainConfig(**{**base, **kw})


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "tinydistil.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_layer_map_matches_the_reference_script():
    assert layer_map(12, 6) == [0, 2, 4, 7, 9, 11]
    assert layer_map(6, 3) == [0, 3, 5]
    assert layer_map(12, 12) == list(range(12))
    assert layer_map(12, 1) == [0]
    with pytest.raises(UserError, match="--n-layer 13"):
        layer_map(12, 13)


def test_init_student_copies_the_teacher():
    teacher = BERT.from_pretrained(str(MODELS / "tiny-bert-legacy"))
    student, layers = init_student(teacher, 1)
    assert layers == [0]
    c = student.config
    assert (c.model_type, c.type_vocab_size, c.pooler, c.mlm_head, c.n_layer) == ("distilbert", 0, False, True, 1)
    assert student.embeddings.token_type_embeddings is None and student.pooler is None
    t, s = teacher.state_dict(), student.state_dict()
    for name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                 "embeddings.LayerNorm.weight", "vocab_transform.weight", "vocab_layer_norm.bias",
                 "vocab_projector.bias", "layers.0.ffn.lin2.weight"):
        assert torch.equal(s[name], t[name]), name
    assert student.vocab_projector.weight is student.embeddings.word_embeddings.weight  # still tied


def test_pretrain_logs_saves_and_learns(tmp_path, corpus):
    cfg = pretrain_config(tmp_path, corpus, max_steps=40, log_every=10, save_every=20, lr=2e-3)
    pretrain(cfg)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30, 40]
    for key in ("step", "loss", "loss_ce", "loss_mlm", "loss_cos", "lr", "grad_norm", "tokens_per_s"):
        assert all(isinstance(r[key], (int, float)) for r in log), key
    assert all(abs(r["loss"] - (5 * r["loss_ce"] + 2 * r["loss_mlm"] + r["loss_cos"])) < 1e-3 for r in log)
    assert log[-1]["loss"] < log[0]["loss"]
    student = BERT.from_pretrained(str(tmp_path / "out"))  # the top of --out is a usable checkpoint
    assert student.config.model_type == "distilbert"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["DistilBertForMaskedLM"]
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == "step-40"
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["latest", "step-40"]


def test_max_steps_zero_saves_the_initialised_student(tmp_path, corpus):
    pretrain(pretrain_config(tmp_path, corpus, max_steps=0))
    saved = BERT.from_pretrained(str(tmp_path / "out"))
    expected, _ = init_student(BERT.from_pretrained(TEACHER), 2)
    for k, v in expected.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k


def test_zero_weight_skips_a_term_and_encoder_teacher_needs_alpha_ce_0(tmp_path, corpus):
    encoder = str(MODELS / "tiny-bert-encoder")
    with pytest.raises(UserError, match="no MLM head.*--alpha-ce 0"):
        pretrain(pretrain_config(tmp_path, corpus, teacher=encoder))
    pretrain(pretrain_config(tmp_path, corpus, teacher=encoder, alpha_ce=0.0, alpha_mlm=0.0, max_steps=2))
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss_ce"] == 0 and log[-1]["loss_mlm"] == 0 and log[-1]["loss_cos"] > 0


def test_out_dir_guards(tmp_path, corpus):
    with pytest.raises(UserError, match="no complete checkpoint"):
        pretrain(pretrain_config(tmp_path, corpus, resume=True))
    pretrain(pretrain_config(tmp_path, corpus))
    with pytest.raises(UserError, match="already holds a tinydistil run.*--resume"):
        pretrain(pretrain_config(tmp_path, corpus))
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-6" / "train_state.pt", weights_only=False)
    assert state["step"] == 6
    with pytest.raises(UserError, match="--batch-size 8 not 4"):
        pretrain(pretrain_config(tmp_path, corpus, resume=True, batch_size=4))
    # the step count sets the lr schedule, so it must match too
    with pytest.raises(UserError, match="--max-steps 6 not 12"):
        pretrain(pretrain_config(tmp_path, corpus, resume=True, max_steps=12))
    assert state["config"]["teacher_dtype"] in ("float32", "bfloat16")  # "auto" resolved and kept


@pytest.mark.parametrize("bad,match", [
    ({"grad_accum": 0}, "at least 1"),
    ({"log_every": 0}, "at least 1"),
    ({"seq_len": 100}, "--seq-len 100: the teacher has only 64 positions"),
])
def test_pretrain_rejects_bad_settings(tmp_path, corpus, bad, match):
    with pytest.raises(UserError, match=match):
        pretrain(pretrain_config(tmp_path, corpus, **bad))
    assert not (tmp_path / "out").exists()


def final_weights(out):
    return load_safetensors(Path(out) / "model.safetensors")


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, corpus):
    args = ["pretrain", "--teacher", TEACHER, "--data", str(corpus), "--data-dir", str(tmp_path / "data"),
            "--n-layer", "2", "--batch-size", "16", "--seq-len", "64", "--max-steps", "20", "--save-every", "10",
            "--log-every", "5", "--seed", "1"]
    full = cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tinydistil.py"), *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "checkpoints" / "latest"
    while proc.poll() is None and not (latest.is_file() and latest.read_text() == "step-10"):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if latest.read_text() != "step-10":
        pytest.skip("the run finished before it could be killed")
    # A later save that died half-way leaves a .tmp folder: it must be ignored.
    (out / "checkpoints" / "step-20.tmp").mkdir(exist_ok=True)
    resumed = cli(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step-10" in resumed.stdout
    a, b = final_weights(tmp_path / "full"), final_weights(out)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print("max difference, resumed vs uninterrupted:", diff)
    assert diff < 1e-6
    log = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-2:] == [15, 20]


def test_ddp_two_gloo_processes(tmp_path, corpus):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "tinydistil.py"), "pretrain", "--teacher", TEACHER, "--data", str(corpus),
                        "--data-dir", str(tmp_path / "data"), "--n-layer", "1", "--batch-size", "4",
                        "--seq-len", "32", "--max-steps", "4", "--log-every", "2", "--save-every", "4",
                        "--out", str(out)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("step     2/4") == 1  # only rank 0 logs
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [2, 4]
    state = torch.load(out / "checkpoints" / "step-4" / "train_state.pt", weights_only=False)
    assert len(state["rng"]["mask"]) == 2  # each rank's masking stream is saved for resumption
    BERT.from_pretrained(str(out))


def test_cli_help_and_one_line_errors(tmp_path):
    r = cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("pretrain", "eval", "report", "fill-mask"))
    r = cli("pretrain", "--help")
    assert "--alpha-ce" in r.stdout and "--resume" in r.stdout and "(default: 5.0)" in r.stdout
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    r = cli("pretrain", "--teacher", "nobody/no-such-model", "--out", str(tmp_path / "o"), env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_fill_mask_prints_top_5():
    r = cli("fill-mask", "the cat sat on the [MASK] .", "--model", TEACHER)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("[MASK] at token ") and len(lines) == 6
    probs = [float(x.split()[0]) for x in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    r = cli("fill-mask", "no mask here", "--model", TEACHER)
    assert r.returncode == 1 and "no [MASK]" in r.stderr


# ----------------------------------------------------------------------------- tasks

# Loaders read the real-format files in fixtures/tasks/ (see its README.md); downloads come from a local server.

TOKENIZER = MODELS / "tokenizer"


@pytest.fixture
def tasks_offline(monkeypatch):
    """Offline unless a test serves files itself, so a stray download fails loudly; no $TINYDISTIL_DATA."""
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    monkeypatch.delenv("TINYDISTIL_DATA", raising=False)


# -- metrics

@pytest.mark.usefixtures("tasks_offline")
def test_accuracy_and_f1_worked_examples():
    preds, labels = [1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]  # tp 2, fp 1, fn 1, tn 2
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    assert accuracy(np.array(preds), np.array(labels)) == pytest.approx(4 / 6)
    assert f1(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0  # no positives at all
    assert f1([1, 1], [0, 0]) == 0.0
    assert f1([0, 0], [1, 1]) == 0.0
    with pytest.raises(ValueError):
        accuracy([1, 0], [1])


@pytest.mark.usefixtures("tasks_offline")
def test_matthews_against_the_formula():
    tp, tn, fp, fn = 6, 3, 2, 1
    labels = [1] * tp + [0] * tn + [0] * fp + [1] * fn
    preds = [1] * tp + [0] * tn + [1] * fp + [0] * fn
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(preds, labels) == pytest.approx(expected)
    assert matthews_corrcoef(np.array(preds), np.array(labels)) == pytest.approx(expected)
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - y for y in labels], labels) == pytest.approx(-1.0)


@pytest.mark.usefixtures("tasks_offline")
def test_matthews_edge_cases():
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictions
    assert matthews_corrcoef([0, 0, 0], [0, 0, 0]) == 0.0  # a single class everywhere
    assert matthews_corrcoef([0, 1, 0], [1, 1, 1]) == 0.0  # single true class


@pytest.mark.usefixtures("tasks_offline")
def test_pearson_worked_example():
    # dx = -2..2, dy = -2,0,1,0,1: sum dx*dy = 6, sum dx^2 = 10, sum dy^2 = 6
    assert pearson([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]) == pytest.approx(6 / math.sqrt(60))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([2, 2, 2], [1, 2, 3]) == 0.0  # constant side: 0, not nan


@pytest.mark.usefixtures("tasks_offline")
def test_spearman_averages_tied_ranks():
    # ranks x = 1, 2.5, 2.5, 4; ranks y = 1, 3, 2, 4: covariance 4.5, variances 4.5 and 5
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(np.array([0.5, 0.5, 0.5]), np.array([1.0, 2.0, 3.0])) == 0.0


@pytest.mark.usefixtures("tasks_offline")
def test_squad_normalisation_and_scores():
    assert normalize_answer("The Cat!") == "cat"
    assert normalize_answer("  An apple,  a THEME park ") == "apple theme park"  # articles only as words
    assert squad_em("The Cat!", ["cat"]) == 1.0
    assert squad_em("cats", ["cat"]) == 0.0
    assert squad_em("Denver Broncos", ["Carolina", "the Denver Broncos."]) == 1.0  # best over ground truths
    assert squad_f1("the big cat", ["a cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # precision 1/2, recall 1
    assert squad_f1("big cat", ["dog", "big cat", "cat"]) == 1.0
    assert squad_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets
    assert squad_em("cat", "cat") == 1.0  # one ground truth as a plain string


@pytest.mark.usefixtures("tasks_offline")
def test_squad_empty_strings_as_the_v11_script():
    assert squad_em("", [""]) == 1.0
    assert squad_f1("", [""]) == 0.0  # v1.1 gives 0 when nothing is shared, even both empty
    assert squad_em("the", ["a"]) == 1.0  # both normalise to ""
    assert squad_f1("", ["cat"]) == 0.0 and squad_em("", ["cat"]) == 0.0
    assert squad_f1("cat", [""]) == 0.0


def _glue_results():
    return {"cola": {"mcc": 0.5}, "sst2": {"accuracy": 0.9}, "mrpc": {"accuracy": 0.8, "f1": 0.9},
            "stsb": {"pearson": 0.88, "spearman": 0.86}, "qqp": {"accuracy": 0.9, "f1": 0.86},
            "mnli": {"accuracy_m": 0.82, "accuracy_mm": 0.84}, "qnli": {"accuracy": 0.89},
            "rte": {"accuracy": 0.6}, "wnli": {"accuracy": 0.56}}


@pytest.mark.usefixtures("tasks_offline")
def test_glue_score_is_the_macro_average_of_task_scores():
    per_task = [0.5, 0.9, 0.85, 0.87, 0.88, 0.83, 0.89, 0.6, 0.56]
    assert glue_score(_glue_results()) == pytest.approx(sum(per_task) / 9)
    assert task_score("mnli", {"accuracy_m": 0.8, "accuracy_mm": 0.9}) == pytest.approx(0.85)
    partial = _glue_results()
    del partial["wnli"]
    with pytest.raises(UserError, match="wnli"):
        glue_score(partial)
    with pytest.raises(UserError, match="f1"):
        task_score("qqp", {"accuracy": 0.9})


# -- GLUE loaders

def _rows(path):
    return [line for line in path.read_text(encoding="utf-8-sig").split("\n") if line]


@pytest.mark.parametrize("task", list(glue.TASKS))
@pytest.mark.usefixtures("tasks_offline")
def test_every_split_of_every_task_loads(task):
    t = glue.TASKS[task]
    for split in ("train",) + t.dev_splits:
        examples = glue.load(task, split, TASK_FIX)
        malformed = 2 if (task, split) == ("qqp", "train") else 0
        assert len(examples) == len(_rows(TASK_FIX / "glue" / t.dir / f"{split}.tsv")) - t.header - malformed
        for ex in examples:
            assert ex.text_a and (ex.text_b is None) == (t.text_b is None)
            assert isinstance(ex.label, float) if t.labels is None else ex.label in range(t.num_labels)


@pytest.mark.usefixtures("tasks_offline")
def test_cola_has_no_header_and_no_final_newline():
    dev = glue.load("cola", "dev", TASK_FIX)
    assert dev[0] == glue.Example("The sailors rode the breeze clear of the rocks.", None, 1)
    assert dev[-1].text_a == "John talked to Bill about himself."  # the last line, without "\n"
    train = glue.load("cola", "train", TASK_FIX)
    assert glue.Example('Susan whispered "Shut up".', None, 1) in train
    assert [ex.label for ex in train][:4] == [1, 1, 1, 1]


@pytest.mark.usefixtures("tasks_offline")
def test_mrpc_header_with_byte_order_mark_and_quotes():
    train = glue.load("mrpc", "train", TASK_FIX)
    assert train[0].text_a.startswith("Amrozi accused his brother , whom he called \" the witness \"")
    assert train[0].label == 1
    assert train[-1].text_b.startswith('" Saddam \'s daughters')  # a field starting with a quote stays whole
    assert [ex.label for ex in glue.load("mrpc", "dev", TASK_FIX)] == [1, 0]


@pytest.mark.usefixtures("tasks_offline")
def test_stsb_scores_are_floats():
    dev = glue.load("stsb", "dev", TASK_FIX)
    assert [ex.label for ex in dev] == [5.0, 4.75, 5.0, 2.4]
    assert dev[0] == glue.Example("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert glue.load("stsb", "train", TASK_FIX)[-1].text_a == 'A dog in a "superman" shirt sleeps on a blanket.'


@pytest.mark.usefixtures("tasks_offline")
def test_mnli_labels_and_both_dev_layouts():
    assert glue.TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    matched = glue.load("mnli", "dev_matched", TASK_FIX)
    assert matched[0] == glue.Example("The new rights are nice enough", "Everyone really likes the newest benefits ", 1)
    assert [ex.label for ex in matched] == [1, 2, 0, 2]
    mismatched = glue.load("mnli", "dev_mismatched", TASK_FIX)
    assert len(mismatched) == 4 and all(ex.text_b for ex in mismatched)
    assert [ex.label for ex in glue.load("mnli", "train", TASK_FIX)] == [1, 0, 2]
    with pytest.raises(UserError, match="dev_matched"):
        glue.load("mnli", "dev", TASK_FIX)


@pytest.mark.usefixtures("tasks_offline")
def test_qqp_skips_malformed_rows_and_nli_labels_map_to_ids():
    train = glue.load("qqp", "train", TASK_FIX)
    assert [ex.label for ex in train] == [0, 1, 0]
    assert all("Kohinoor" not in ex.text_a for ex in train)
    assert glue.load("rte", "dev", TASK_FIX)[0].label == 1  # not_entailment
    assert glue.load("qnli", "dev", TASK_FIX)[0].label == 0  # entailment


@pytest.mark.usefixtures("tasks_offline")
def test_bad_glue_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown GLUE task"):
        glue.load("squad", "train", TASK_FIX)
    rte = tmp_path / "glue" / "RTE"
    rte.mkdir(parents=True)
    (rte / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(UserError, match=r"train.tsv:3 has 3 fields"):
        glue.load("rte", "train", tmp_path)
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(UserError, match="'maybe'"):
        glue.load("rte", "dev", tmp_path)


@pytest.mark.usefixtures("tasks_offline")
def test_compute_metrics_keys_feed_the_glue_score():
    mrpc = glue.compute_metrics("mrpc", [1, 0, 1], [1, 1, 1])
    assert mrpc == {"accuracy": pytest.approx(2 / 3), "f1": pytest.approx(0.8)}
    mnli = {**glue.compute_metrics("mnli", [0, 1], [0, 1], "dev_matched"),
            **glue.compute_metrics("mnli", [0, 1], [0, 0], "dev_mismatched")}
    assert mnli == {"accuracy_m": 1.0, "accuracy_mm": 0.5}
    assert task_score("mnli", mnli) == 0.75
    assert set(glue.compute_metrics("stsb", [0.1, 0.5, 0.3], [1.0, 4.0, 2.0])) == {"pearson", "spearman"}


# -- downloads

@pytest.fixture
def glue_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (base url, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", www
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.usefixtures("tasks_offline")
def test_glue_zip_and_mrpc_are_downloaded_then_used_offline(glue_server, tmp_path, monkeypatch):
    url, www = glue_server
    with zipfile.ZipFile(www / "CoLA.zip", "w") as z:  # the official zip's layout: CoLA/{train,dev}.tsv
        for name in ("train.tsv", "dev.tsv"):
            z.write(TASK_FIX / "glue" / "CoLA" / name, f"CoLA/{name}")
    shutil.copy(TASK_FIX / "mrpc_source" / "msr_paraphrase_train.txt", www)
    shutil.copy(TASK_FIX / "mrpc_source" / "mrpc_dev_ids.tsv", www)
    monkeypatch.setattr(glue, "GLUE_URL", url)
    monkeypatch.setattr(glue, "SENTEVAL_URL", url)
    monkeypatch.delenv("TINYDISTIL_OFFLINE")
    root = tmp_path / "data"
    assert glue.load("cola", "dev", root) == glue.load("cola", "dev", TASK_FIX)
    assert sorted(p.name for p in (root / "glue").iterdir()) == ["CoLA"]  # zip deleted, no temp left
    glue.load("mrpc", "dev", root)
    for split in ("train", "dev"):  # rebuilt exactly as download_glue_data.py does, BOM header included
        built, expected = root / "glue" / "MRPC" / f"{split}.tsv", TASK_FIX / "glue" / "MRPC" / f"{split}.tsv"
        assert built.read_bytes() == expected.read_bytes()
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    assert len(glue.load("cola", "train", root)) == 6 and len(glue.load("mrpc", "train", root)) == 6


@pytest.mark.usefixtures("tasks_offline")
def test_corrupt_zip_is_deleted_with_a_user_error(glue_server, tmp_path, monkeypatch):
    url, www = glue_server
    (www / "RTE.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    monkeypatch.setattr(glue, "GLUE_URL", url)
    monkeypatch.delenv("TINYDISTIL_OFFLINE")
    with pytest.raises(UserError, match="not a readable zip"):
        glue.load("rte", "train", tmp_path)
    assert [p.name for p in (tmp_path / "glue").iterdir()] == []


@pytest.mark.parametrize("load, url", [
    (lambda d: glue.load("sst2", "train", d), "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"),
    (lambda d: glue.load("mrpc", "train", d),
     "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt"),
    (lambda d: imdb.load("test", d), "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"),
    (lambda d: squad.load("dev", d), "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json"),
])
@pytest.mark.usefixtures("tasks_offline")
def test_offline_and_missing_names_the_url_and_the_path(tmp_path, load, url):
    with pytest.raises(UserError) as e:
        load(tmp_path)
    assert url in str(e.value) and str(tmp_path) in str(e.value)


# -- IMDb

@pytest.mark.usefixtures("tasks_offline")
def test_imdb_reads_the_archive_in_a_fixed_order():
    train = imdb.load("train", TASK_FIX)
    assert [ex.label for ex in train] == [0, 0, 0, 1, 1, 1]  # neg then pos
    assert train[0].text_a.startswith("Nine minutes of psychedelic")  # neg/17 before neg/34 before neg/56
    assert train[3].text_a.startswith("I'm a male")  # pos/10 before pos/11: numeric, not member order
    assert any("<br />" in ex.text_a for ex in train) and any(not ex.text_a.isascii() for ex in train)
    assert all("unlabelled" not in ex.text_a for ex in train)  # train/unsup skipped
    test = imdb.load("test", TASK_FIX)
    assert [ex.label for ex in test] == [0, 0, 1, 1] and all(ex.text_b is None for ex in test)


@pytest.mark.usefixtures("tasks_offline")
def test_damaged_imdb_archive_is_a_user_error(tmp_path):
    (tmp_path / "imdb").mkdir()
    whole = (TASK_FIX / "imdb" / "aclImdb_v1.tar.gz").read_bytes()
    (tmp_path / "imdb" / "aclImdb_v1.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="damaged"):
        imdb.load("train", tmp_path)
    with pytest.raises(UserError, match="train or test"):
        imdb.load("unsup", TASK_FIX)


# -- SQuAD

@pytest.fixture(scope="module")
def task_tok():
    return data.load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def examples():
    return squad.load("dev", TASK_FIX)


@pytest.mark.usefixtures("tasks_offline")
def test_squad_load(examples):
    assert len(examples) == 60
    ex = examples[0]
    assert ex["question"] == "Which NFL team represented the AFC at Super Bowl 50?"
    assert [a["text"] for a in ex["answers"]] == ["Denver Broncos"] * 3
    for ex in examples:
        for a in ex["answers"]:
            assert ex["context"][a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]


@pytest.mark.usefixtures("tasks_offline")
def test_squad_windows(examples, task_tok):
    task_tok.enable_truncation(32)  # a tokenizer left truncating (as data.encode_batch does) must not cut contexts
    feats = squad.features(examples, task_tok, max_len=96, stride=16)
    by_example = {}
    for f in feats:
        by_example.setdefault(f["example_index"], []).append(f)
        n = len(f["input_ids"])
        assert n <= 96 and len(f["token_type_ids"]) == len(f["offsets"]) == n
        assert f["input_ids"][0] == task_tok.token_to_id("[CLS]")
        assert f["input_ids"][-1] == task_tok.token_to_id("[SEP]")
        ctx = [k for k, o in enumerate(f["offsets"]) if o is not None]
        assert all(f["token_type_ids"][k] == 1 for k in ctx) and ctx == list(range(ctx[0], n - 1))
    for i, windows in by_example.items():
        context = examples[i]["context"]
        firsts = [w["offsets"][w["token_type_ids"].index(1)][0] for w in windows]
        assert firsts[0] == 0 and firsts == sorted(firsts)
        assert windows[-1]["offsets"][-2][1] == len(context.rstrip())  # the windows reach the end
        whole = task_tok.encode(context, add_special_tokens=False).offsets
        starts = [whole.index(w["offsets"][w["token_type_ids"].index(1)]) for w in windows]
        assert all(b - a == 16 for a, b in zip(starts, starts[1:]))  # doc stride: 16 tokens between starts
    assert max(len(w) for w in by_example.values()) > 5


@pytest.mark.usefixtures("tasks_offline")
def test_squad_round_trip_answer_to_tokens_to_text(examples, task_tok):
    feats = squad.features(examples, task_tok)  # 384 tokens, stride 128
    found = {}
    for f in feats:
        if f["start_position"]:
            s, e = f["start_position"], f["end_position"]
            assert 0 < s <= e < len(f["input_ids"]) - 1 and f["offsets"][s] is not None
            ex = examples[f["example_index"]]
            found[ex["id"]] = ex["context"][f["offsets"][s][0]:f["offsets"][e][1]]
    assert len(found) == len(examples)  # every answer lies inside some window
    exact = [ex["id"] for ex in examples if found[ex["id"]] == ex["answers"][0]["text"]]
    assert len(exact) == 58
    for ex in examples:  # the 2 others are annotated inside a token ("8" in "18"): the token text holds them
        assert ex["answers"][0]["text"] in found[ex["id"]]


def _one_hot_logits(feats):
    starts, ends = [], []
    for f in feats:
        s, e = np.full(len(f["input_ids"]) + 7, -5.0), np.full(len(f["input_ids"]) + 7, -5.0)  # padded rows
        s[f["start_position"]] += 10
        e[f["end_position"]] += 10
        starts.append(s)
        ends.append(e)
    return starts, ends


@pytest.mark.usefixtures("tasks_offline")
def test_squad_postprocess_recovers_labelled_spans(examples, task_tok):
    feats = squad.features(examples, task_tok, max_len=96, stride=16)
    preds = squad.postprocess(examples, feats, *_one_hot_logits(feats), max_answer_len=64)
    assert set(preds) == {ex["id"] for ex in examples}
    scores = squad.evaluate(examples, preds)
    assert scores == {"exact_match": pytest.approx(58 / 60), "f1": pytest.approx(58 / 60)}  # "18" for "8": F1 0 too


@pytest.mark.usefixtures("tasks_offline")
def test_squad_postprocess_rules():
    context = "Denver beat Carolina in Santa Clara"
    ex = [{"id": "q", "question": "who?", "context": context, "answers": [{"text": "Denver", "answer_start": 0}]}]
    words = [(0, 6), (7, 11), (12, 20), (21, 23), (24, 29), (30, 35)]
    feat = {"example_index": 0, "offsets": [None, None, None] + words + [None]}  # [CLS] who ? [SEP] ... [SEP]
    feat["max_context"] = [o is not None for o in feat["offsets"]]  # one window: every context token
    start = np.array([9, 0, 0, 1, 0, 3, 0, 2, 0, 9.0])  # best start is [CLS] / [SEP]: not context
    end = np.array([9, 0, 0, 0, 0, 4, 0, 0, 2, 9.0])
    assert squad.postprocess(ex, [feat], [start], [end]) == {"q": "Carolina"}  # 3+4 beats 1+4, 2+2
    end[3] = 8  # Denver..Denver now the best
    assert squad.postprocess(ex, [feat], [start], [end]) == {"q": "Denver"}
    start[7], end[5] = 20, 0  # start after every good end: only spans with end >= start count
    assert squad.postprocess(ex, [feat], [start], [end]) == {"q": "Santa Clara"}
    assert squad.postprocess(ex, [feat], [start], [end], max_answer_len=1) == {"q": "Santa"}
    assert squad.evaluate(ex, {}) == {"exact_match": 0.0, "f1": 0.0}


# -- report

def _write_results(path, lines):
    path.write_text("".join(json.dumps({"seconds": 1.0, "config": {}, **line}) + "\n" for line in lines))


@pytest.mark.usefixtures("tasks_offline")
def test_report_tables(tmp_path):
    teacher = [{"model": "bert-base-uncased", "task": t, "metrics": m} for t, m in _glue_results().items()]
    teacher += [{"model": "bert-base-uncased", "task": "imdb", "metrics": {"accuracy": 0.9}},
                {"model": "bert-base-uncased", "task": "squad", "metrics": {"exact_match": 0.8, "f1": 0.88}}]
    student = [{"model": "out/student", "task": "sst2", "metrics": {"accuracy": 0.5}},
               {"model": "out/student", "task": "sst2", "metrics": {"accuracy": 0.81}},  # the latest counts
               {"model": "out/student", "task": "squad", "metrics": {"exact_match": 0.6, "f1": 0.66}},
               {"model": "glue-only", "task": "rte", "metrics": {"accuracy": 0.65}}]
    _write_results(tmp_path / "r.jsonl", teacher + student)
    md = report.render(tmp_path / "r.jsonl")
    assert "| DistilBERT (paper) | 77.0 | 51.3 | 82.2 | 87.5 | 89.2 | 88.5 | 59.9 | 91.3 | 86.9 | 56.3 |" in md
    assert "| ELMo (paper) | 68.7 | 44.1 |" in md and "| DistilBERT / BERT-base, % (paper) | 96.9 |" in md
    score = glue_score(_glue_results()) * 100
    ours = "| 50.0 | 83.0 | 85.0 | 89.0 | 88.0 | 60.0 | 90.0 | 87.0 | 56.0 |"
    assert f"| bert-base-uncased (ours) | {score:.1f} {ours}" in md
    assert "| out/student (ours) | - | - | - | - | - | - | - | 81.0 | - | - |" in md
    assert "| out/student / bert-base-uncased, % (ours) | - | - | - | - | - | - | - | 90.0 | - | - |" in md
    assert "| DistilBERT (paper) | 92.82 | 77.7 | 85.8 |" in md and "| DistilBERT (D) (paper) | - | 79.1 | 86.9 |" in md
    assert "| bert-base-uncased (ours) | 90.00 | 80.0 | 88.0 |" in md
    assert "| out/student / bert-base-uncased, % (ours) | - | 75.0 | 75.0 |" in md
    assert "glue-only (ours) | - | - | - | - | - | - | 65.0 |" in md and "glue-only" not in md.split("Table 2")[1]
    other = report.render(tmp_path / "r.jsonl", teacher="out/student")
    assert "| bert-base-uncased / out/student, % (ours) |" in other and "/ bert-base-uncased" not in other


@pytest.mark.usefixtures("tasks_offline")
def test_report_errors(tmp_path):
    with pytest.raises(UserError, match="no results file"):
        report.render(tmp_path / "none.jsonl")
    _write_results(tmp_path / "r.jsonl", [{"model": "m", "task": "rte", "metrics": {"accuracy": 0.6}}])
    with pytest.raises(UserError, match="teacher 'bert'"):
        report.render(tmp_path / "r.jsonl", teacher="bert")
    assert "No teacher in the results" in report.render(tmp_path / "r.jsonl")
    with open(tmp_path / "r.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match=r"r.jsonl:2 is not a results line"):
        report.render(tmp_path / "r.jsonl")


# ----------------------------------------------------------------------------- fine-tuning

# The task files are generated in the real layouts with a rule the tiny models can learn in seconds.

WORDS = ("the of and in to was he is as for on with that it his by at from her she you had an were but be "
         "this are not my they one which or have him me first all also their has up who out been when").split()
RESULT_KEYS = {"task", "model", "teacher", "metrics", "runs", "seconds", "config"}


def sentence(r, good):
    """A few random words; "good" somewhere in it exactly when good: a rule the tiny models can learn."""
    words = [r.choice(WORDS) for _ in range(r.randint(4, 9))]
    if good:
        words.insert(r.randrange(len(words) + 1), "good")
    return " ".join(words)


def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, row)) + "\n" for row in rows), encoding="utf-8")


def make_data(root):
    """SST-2, RTE, STS-B and MNLI tsv files (header names as in GLUE) and SQuAD json under root. In the
    pair tasks only the second sentence decides the label, so they test that pairs reach the model."""
    r = random.Random(0)
    for split, n in (("train", 256), ("dev", 64)):
        write_tsv(root / "glue/SST-2" / f"{split}.tsv",
              [("sentence", "label")] + [(sentence(r, i % 2), i % 2) for i in range(n)])
        write_tsv(root / "glue/RTE" / f"{split}.tsv", [("index", "sentence1", "sentence2", "label")] +
              [(i, sentence(r, False), sentence(r, i % 2), ("not_entailment", "entailment")[i % 2])
               for i in range(n)])
        write_tsv(root / "glue/STS-B" / f"{split}.tsv",
              [("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                "sentence2", "score")] +
              [(i, "main-captions", "MSRvid", "2012test", i, "none", "none", sentence(r, False),
                sentence(r, i % 2), f"{1 + 3 * (i % 2) + r.random() / 2:.3f}") for i in range(n)])
    nli = ("entailment", "neutral", "contradiction")
    for split in ("train", "dev_matched", "dev_mismatched"):
        write_tsv(root / "glue/MNLI" / f"{split}.tsv", [("index", "sentence1", "sentence2", "gold_label")] +
              [(i, sentence(r, 0), sentence(r, 0), nli[i % 3]) for i in range(24)])
    context = "the cat sat on the mat . it was a good day for the cat , she said ."
    qas = [("where did the cat sit ?", "the mat"), ("what was it ?", "a good day"), ("who said it ?", "she")]
    squad = {"version": "1.1", "data": [{"title": "cat", "paragraphs": [{"context": context, "qas": [
        {"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": context.index(a)}] * 2}
        for i, (q, a) in enumerate(qas)]}]}]}
    for split in ("train", "dev"):
        (root / "squad").mkdir(exist_ok=True)
        (root / "squad" / f"{split}-v1.1.json").write_text(json.dumps(squad))
    return root


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def run_tiny(finetune_data, tmp_path, task, model="tiny-distilbert", **kw):
    cfg = EvalConfig(task=task, model=str(MODELS / model), data_dir=str(finetune_data), batch_size=16,
                     results=str(tmp_path / "results.jsonl"), **kw)
    return run(cfg)


@pytest.mark.parametrize("model", ["tiny-distilbert", "tiny-bert-legacy"])
def test_pairs_reach_the_model(model, finetune_data, tmp_path):
    assert run_tiny(finetune_data, tmp_path, "rte", model, epochs=8, lr=3e-3)["metrics"]["accuracy"] >= 0.95


@pytest.mark.parametrize("model", ["tiny-distilbert", "tiny-bert-legacy"])
def test_fine_tuning_learns_a_simple_rule(model, finetune_data, tmp_path, capsys):
    before = run_tiny(finetune_data, tmp_path, "sst2", model, epochs=0)
    after = run_tiny(finetune_data, tmp_path, "sst2", model, epochs=8, lr=3e-3)
    assert before["metrics"]["accuracy"] < 0.75
    assert after["metrics"]["accuracy"] >= 0.95
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert lines == [before, after]
    assert set(after) == RESULT_KEYS and after["task"] == "sst2" and after["model"] == str(MODELS / model)
    # Defaults are resolved in the recorded config; 128 tokens is capped at the tiny model's 64 positions.
    assert after["config"]["max_seq_len"] == 64 and after["config"]["epochs"] == 8
    assert before["config"]["lr"] == finetune.DEFAULTS["sst2"][0] and after["config"]["device"] == "cpu"
    assert after["seconds"] >= 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == after


def test_stsb_regression_and_saved_checkpoint(finetune_data, tmp_path):
    line = run_tiny(finetune_data, tmp_path, "stsb", epochs=8, lr=3e-3, out=str(tmp_path / "m"))
    # Scores are 1 or 4 by the rule, plus noise no model can predict: Spearman stays well below 1.
    assert line["metrics"]["pearson"] >= 0.9 and 0.5 <= line["metrics"]["spearman"] <= 1
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["DistilBertForSequenceClassification"]
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    model = TaskModel.from_pretrained(str(tmp_path / "m"))
    assert model.labels is None and model(torch.tensor([[2, 50, 3]])).shape == (1, 1)


def test_mnli_reports_matched_and_mismatched(finetune_data, tmp_path):
    line = run_tiny(finetune_data, tmp_path, "mnli", epochs=1, max_eval_examples=10, dtype="bfloat16")
    assert set(line["metrics"]) == {"accuracy_m", "accuracy_mm"}
    assert 0 <= glue.task_score("mnli", line["metrics"]) <= 1


@pytest.mark.parametrize("model", ["tiny-distilbert", "tiny-bert-legacy"])
def test_squad_runs_and_scores(model, finetune_data, tmp_path):
    line = run_tiny(finetune_data, tmp_path, "squad", model, epochs=2, lr=1e-3, out=str(tmp_path / "qa"))
    assert set(line["metrics"]) == {"exact_match", "f1"}
    assert all(0 <= v <= 1 for v in line["metrics"].values())
    assert line["config"]["max_seq_len"] == 64
    prefix = "bert." if model == "tiny-bert-legacy" else "distilbert."
    keys = set(load_safetensors(tmp_path / "qa" / "model.safetensors"))
    assert {"qa_outputs.weight", "qa_outputs.bias"} <= keys and all(
        k.startswith(prefix) or k.startswith("qa_outputs.") for k in keys)
    assert not any("pooler" in k for k in keys)  # BertForQuestionAnswering has none


def test_glue_runs_all_nine_tasks_on_real_rows(tmp_path):
    lines = run(EvalConfig(task="glue", model=str(MODELS / "tiny-distilbert"), data_dir=str(TASK_FIX),
                           epochs=1, results=str(tmp_path / "results.jsonl")))
    assert list(lines) == list(glue.TASKS)
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [w["task"] for w in written] == list(glue.TASKS) and all(set(w) == RESULT_KEYS for w in written)
    lines = report.latest(tmp_path / "results.jsonl")[str(MODELS / "tiny-distilbert")]
    results = {task: line["metrics"] for task, line in lines.items()}
    assert set(results["cola"]) == {"mcc"} and set(results["qqp"]) == {"accuracy", "f1"}
    assert -1 <= glue.glue_score(results) <= 1
    assert "| " + str(MODELS / "tiny-distilbert") + " (ours) |" in report.render(tmp_path / "results.jsonl")


def test_cli_eval(finetune_data, tmp_path, capsys):
    tinydistil.main(["eval", "sst2", "--model", str(MODELS / "tiny-bert-legacy"), "--data-dir", str(finetune_data),
                     "--epochs", "1", "--max-train-examples", "32", "--max-eval-examples", "16",
                     "--lr", "1e-4", "--results", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "m")])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["config"]["max_train_examples"] == 32 and line["config"]["lr"] == 1e-4
    assert 0 <= line["metrics"]["accuracy"] <= 1 and (tmp_path / "m" / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        tinydistil.main(["eval", "sst3", "--model", str(MODELS / "tiny-bert-legacy")])
    assert capsys.readouterr().err.startswith("error: unknown task 'sst3'")


# Which head tensors the reference classes have, besides the encoder under its prefix.
HEADS = {("bert", False): {"classifier.weight", "classifier.bias"},
         ("distilbert", False): {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight",
                                 "classifier.bias"},
         ("bert", True): {"qa_outputs.weight", "qa_outputs.bias"},
         ("distilbert", True): {"qa_outputs.weight", "qa_outputs.bias"}}


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-bert-legacy", "tiny-bert-encoder", "tiny-distilbert"])
@pytest.mark.parametrize("labels,qa", [(("a", "b", "c"), False), (None, False), (None, True)])
def test_task_model_round_trip(name, labels, qa, tmp_path):
    torch.manual_seed(0)
    model = TaskModel(BERT.from_pretrained(str(MODELS / name)), labels, qa).eval()
    ids = torch.tensor([[2, 40, 50, 60, 3, 70, 80, 3], [2, 45, 55, 3, 65, 3, 0, 0]])
    mask, types = (ids > 0).long(), torch.tensor([[0] * 5 + [1] * 3, [0] * 4 + [1] * 2 + [0] * 2])
    with torch.no_grad():
        logits = model(ids, mask, types)
    assert logits.shape == ((2, 8, 2) if qa else (2, len(labels) if labels else 1))
    model.save_pretrained(tmp_path / "out")
    again = TaskModel.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        assert torch.allclose(again(ids, mask, types), logits, atol=1e-6)
    assert (again.labels, again.qa) == (list(labels) if labels else None, qa)
    # The reference layout: encoder under its prefix (BERT with a pooler, fresh for tiny-bert, which
    # has none, except for QA), no MLM head, the head's tensors under the reference names.
    kind = model.encoder.config.model_type
    keys = set(load_safetensors(tmp_path / "out" / "model.safetensors"))
    assert {k for k in keys if not k.startswith(kind + ".")} == HEADS[kind, qa]
    assert ("bert.pooler.dense.weight" in keys) == (kind == "bert" and not qa)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    arch = ("Bert" if kind == "bert" else "DistilBert") + ("ForQuestionAnswering" if qa else
                                                            "ForSequenceClassification")
    assert config["architectures"] == [arch]
    if labels:
        assert config["id2label"] == {"0": "a", "1": "b", "2": "c"}
    assert (tmp_path / "out" / "tokenizer.json").is_file() or (tmp_path / "out" / "vocab.txt").is_file()


def test_errors(finetune_data, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown task 'sst3'.*sst2.*squad"):
        run_tiny(finetune_data, tmp_path, "sst3")
    with pytest.raises(UserError, match="--device cuda:7"):
        run_tiny(finetune_data, tmp_path, "sst2", device="cuda:7")
    with pytest.raises(UserError, match="must be positive"):
        run_tiny(finetune_data, tmp_path, "sst2", max_eval_examples=0)
    with pytest.raises(UserError, match="--max-seq-len 512"):
        run_tiny(finetune_data, tmp_path, "sst2", max_seq_len=512)
    with pytest.raises(UserError, match="not a fine-tuned task model"):
        TaskModel.from_pretrained(str(MODELS / "tiny-distilbert"))
    with pytest.raises(UserError, match="no tokenizer"):
        tiny = BertConfig("distilbert", 600, 32, 1, 4, 48, 64, 0, pooler=False)
        finetune.tokenizer_for(BERT(tiny))
    # glue checks all nine datasets before training: offline, the first missing one stops the run.
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    with pytest.raises(UserError, match="CoLA.zip"):
        run_tiny(tmp_path / "empty", tmp_path, "glue")
    assert not (tmp_path / "results.jsonl").exists()


# ----------------------------------------------------------------------------- bench

# Speed itself is never asserted (timings are machine-dependent); what is: the table and JSON are well formed,
# the precision modes and the fused q/k/v rewrite compute what the float32 model computes, weights that cannot
# be had fall back to random weights (and say so), and the SST-2 accuracy column is right.

BENCH_TINY = f"{MODELS / 'tiny-distilbert'},{MODELS / 'tiny-bert'}"
BENCH_ROW_KEYS = {"model": str, "device": str, "dtype": str, "params_m": float, "seconds": float,
                  "ms_per_example": float, "random_weights": bool}


@pytest.fixture
def bench_offline(monkeypatch, tmp_path):
    """No network and an empty Hub cache and data directory, whatever the machine has; bench.main sets the
    thread count, so the test's own count is put back afterwards."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TINYDISTIL_DATA", str(tmp_path / "data"))
    yield
    torch.set_num_threads(threads)


def run_json(tmp_path, *args):
    out = tmp_path / "rows.json"
    bench.main([*args, "--json", str(out)])
    return json.loads(out.read_text())


@pytest.mark.usefixtures("bench_offline")
def test_tiny_models_give_table_chart_and_json(tmp_path, capsys):
    rows = run_json(tmp_path, "--models", BENCH_TINY, "--limit", "5", "--throughput")
    text = capsys.readouterr().out
    assert [(r["model"].rsplit("/", 1)[-1], r["dtype"]) for r in rows] == [
        (m, d) for m in ("tiny-distilbert", "tiny-bert") for d in ("float32", "bfloat16", "int8", "int8+cls")]
    for r in rows:
        assert set(r) == set(BENCH_ROW_KEYS) and all(isinstance(r[k], t) for k, t in BENCH_ROW_KEYS.items())
        assert r["device"] == "cpu" and r["seconds"] > 0 and not r["random_weights"]
        assert r["ms_per_example"] == pytest.approx(1000 * r["seconds"] / 5, rel=1e-3)
    tiny = BERT.from_pretrained(str(MODELS / "tiny-distilbert"))
    expected = sum(p.numel() for n, p in tiny.named_parameters() if not n.startswith("vocab_")) / 1e6
    assert rows[0]["params_m"] == pytest.approx(expected, abs=1e-3)  # the MLM head is not counted
    assert "STAND-IN" in text and "5 pairs" in text  # offline, no STS-B: the shipped pairs, said so
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| Model | # param. (M) | Inf. time (s) | ms / example | speed-up vs models/tiny-distilbert |"
    assert len(table) == 2 + 3 + 8 and all(line.count("|") == 6 for line in table)
    assert "| BERT-base (paper) | 110 | 668 |" in text and "| DistilBERT (paper) | 66 | 410 |" in text
    assert sum("█" in line and line.endswith("ms") for line in text.splitlines()) == 8
    assert "batch 32" in text  # the throughput lines


@pytest.mark.usefixtures("bench_offline")
def test_sts_b_dev_is_read_from_the_data_directory(tmp_path, capsys):
    stsb = tmp_path / "data" / "glue" / "STS-B"
    stsb.mkdir(parents=True)
    (stsb / "dev.tsv").write_text("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                                  "sentence2\tscore\n" + "".join(
                                      f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t"
                                      f"A man is playing a guitar.\tA man plays the guitar number {i}.\t4.5\n"
                                      for i in range(3)))
    rows = run_json(tmp_path, "--models", str(MODELS / "tiny-bert"), "--dtypes", "float32")
    assert len(rows) == 1 and "pairs: 3 from STS-B dev" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["tiny-distilbert", "tiny-bert"])
@pytest.mark.usefixtures("bench_offline")
def test_fast_modes_stay_close_to_float32(name):
    model = BERT.from_pretrained(str(MODELS / name))
    x = torch.randint(5, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1, 30:] = 0  # padding, so the masked attention path is exercised too
    keep = mask.bool()
    with torch.inference_mode():
        ref = model(x, mask, return_logits=False)
        last = ref.hidden_states[-1]
        for mode in ("float32", "bfloat16", "int8"):
            out = bench.prepare(model, mode, "cpu")(x, mask, return_logits=False)
            got = out.hidden_states[-1].float()
            if mode == "float32":  # fused q/k/v is the same computation
                assert (got - last)[keep].abs().max() < 1e-5
            else:  # a cosine of 0.99 per token: the rounding of 8-bit / bf16 weights, no more
                assert F.cosine_similarity(got[keep], last[keep], dim=-1).min() > 0.99, mode
            if out.pooler_output is not None:
                assert F.cosine_similarity(out.pooler_output.float(), ref.pooler_output).min() > 0.99, mode
        cls = bench.prepare(model, "float32+cls", "cpu")(x, mask, return_logits=False)
        assert cls.hidden_states[-1].shape == (2, 1, model.config.hidden_size)  # only [CLS] is computed
        assert (cls.hidden_states[-1][:, 0] - last[:, 0]).abs().max() < 1e-5
        assert all(torch.equal(a, b) for a, b in zip(cls.hidden_states[:-1], ref.hidden_states[:-1]))
        if ref.pooler_output is not None:
            assert (cls.pooler_output - ref.pooler_output).abs().max() < 1e-5


@pytest.mark.usefixtures("bench_offline")
def test_int8_rewrites_every_linear_and_leaves_the_source_model_alone():
    model, random_weights, _ = bench.load_model(str(MODELS / "tiny-distilbert"))  # without the MLM head
    assert not random_weights
    before = copy.deepcopy(model.state_dict())
    q = bench.prepare(model, "int8+cls", "cpu")
    kinds = [type(m).__name__ for m in q.modules()]
    assert kinds.count("FusedQKVAttention") == model.config.n_layer and kinds.count("CLSOnlyBlock") == 1
    assert "Linear" not in kinds and kinds.count("Int8Linear") == 4 * model.config.n_layer + 1  # + the [CLS] query
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.usefixtures("bench_offline")
def test_missing_weights_fall_back_to_random_weights(tmp_path, capsys):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(MODELS / "tiny-distilbert" / "config.json", folder)
    shutil.copy(MODELS / "tiny-distilbert" / "tokenizer.json", folder)
    rows = run_json(tmp_path, "--models", f"{folder},{MODELS / 'tiny-distilbert'}", "--limit", "3",
                    "--dtypes", "float32")
    assert [r["random_weights"] for r in rows] == [True, False]
    assert rows[0]["params_m"] == rows[1]["params_m"]  # the same shapes, from config.json
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "(random weights)" in out


@pytest.mark.usefixtures("bench_offline")
def test_offline_preset_is_built_with_random_weights(tmp_path, capsys):
    rows = run_json(tmp_path, "--models", "bert-base-uncased,distilbert-base-uncased", "--limit", "1",
                    "--dtypes", "float32")
    assert [r["model"] for r in rows] == ["bert-base-uncased", "distilbert-base-uncased"]
    assert all(r["random_weights"] for r in rows)
    # the parameter counts of transformers' BertModel and DistilBertModel (the paper's 110M and 66M)
    assert [r["params_m"] for r in rows] == pytest.approx([109.482240, 66.362880], abs=1e-3)
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "HF_HUB_OFFLINE" in out
    assert "the bert-base-uncased vocab in fixtures/bench" in out  # no tokenizer cached: the shipped vocabulary


@pytest.mark.usefixtures("bench_offline")
def test_sst2_accuracy_of_every_mode(tmp_path, capsys):
    sst2 = tmp_path / "data" / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    sentences = ["a charming and often affecting journey .", "unflinchingly bleak and desperate",
                 "the acting is superb", "a dull , lifeless film", "i loved every minute of it"]
    lines = [f"{s}\t{i % 2}\n" for i, s in enumerate(sentences)]
    (sst2 / "dev.tsv").write_text("sentence\tlabel\n" + "".join(lines))
    task_model = TaskModel(BERT.from_pretrained(str(MODELS / "tiny-distilbert")), labels=("0", "1"))
    torch.manual_seed(0)
    torch.nn.init.normal_(task_model.classifier.weight, std=1.0)  # a head whose answers vary
    task_model.save_pretrained(tmp_path / "sst2-model")
    rows = run_json(tmp_path, "--models", str(tmp_path / "sst2-model"), "--task", "sst2", "--limit", "3")
    tok = bench.data.load_tokenizer(tmp_path / "sst2-model")
    x = bench.data.encode_batch(tok, sentences)
    with torch.inference_mode():
        pred = TaskModel.from_pretrained(str(tmp_path / "sst2-model"))(**x).argmax(-1)
    expected = sum(int(p) == i % 2 for i, p in enumerate(pred)) / len(sentences)
    assert rows[0]["dtype"] == "float32" and rows[0]["sst2_accuracy"] == pytest.approx(expected)
    assert all(0 <= r["sst2_accuracy"] <= 1 for r in rows) and "SST-2 acc." in capsys.readouterr().out
    assert glue.load("sst2", "dev", str(tmp_path / "data"))[0].label == 0


@pytest.mark.parametrize("args, message", [
    (["--dtypes", "float64"], "--dtypes"),
    (["--task", "mnli"], "--task"),
    (["--models", "no/such-model"], "no/such-model"),
    (["--models", str(MODELS / "tiny-bert"), "--tokenizer", str(bench.STAND_IN)], "--tokenizer"),  # 30522 ids
])
@pytest.mark.usefixtures("bench_offline")
def test_bad_input_is_one_error_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--limit", "1", *args])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and message in err and "Traceback" not in err
