"""conftest.py: the fixtures and helpers test_all.py's classes share, and the local HTTP server
every download test talks to. pytest reads this file before test_all.py and finds its fixtures by
name; the constants and helpers that tests call directly (paths, pretrain_config, cli, run_tiny,
the Hub's names...) are imported by test_all.py with `from conftest import ...`.

    python -m pytest -q test_all.py      # from the repository root, as .ci/run does

In order: the fixture paths; the shared fixtures (one_thread, the offline switches, tokenizers,
a corpus) and helpers; generated task data (TestFinetune, TestDistill, TestReport); the local
server (TestHub, TestData's downloads, the Hub paths of the task and bench classes).

Nothing here downloads: models, tokenizers and datasets are the small real-format files under
fixtures/ or generated below, and every download path runs against one ThreadingHTTPServer on
127.0.0.1 that a test starts (the `server` fixture). transformers is never imported.

Fixtures that change the environment are requested by name or by a class mark, so each applies to
exactly the tests that carry it: tasks_offline on the task classes, bench_offline on TestBench.
The one autouse fixture, one_thread, is suite-wide on purpose: torch runs on 1 thread in the test
process. The models run there are at most 32 wide (bench.main sets its own thread count for
BERT-base), so a second thread gains nothing, and beside another job on 2 cores it makes torch wait
for a core (measured when this was decided: the in-process pretraining test took 4 to 64 s at 2
threads under load, 3 s at 1; idle, the same). Subprocesses (the CLI, SIGKILL, SIGTERM and DDP
tests) keep their own thread settings.
"""
import hashlib
import http.server
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest
import torch

import data
from data import load_tokenizer
from hub import load_safetensors
from tasks.finetune import EvalConfig, run
from tinydistil import PretrainConfig

ROOT = Path(__file__).parent
MODELS = ROOT / "fixtures" / "models"  # tiny real-format checkpoints and the shared tokenizer
DATA_FIX = ROOT / "fixtures" / "data"  # tokenizer files and a tiny WikiText-2 split
TASK_FIX = ROOT / "fixtures" / "tasks"  # a few real rows of each task dataset; see its README.md
TOKENIZER = MODELS / "tokenizer"  # a 582-token subset of the bert-base-uncased vocabulary
TINY_BERT = str(MODELS / "tiny-bert")  # 2 layers, 32 wide, with MLM head and pooler
TINY_DISTILBERT = str(MODELS / "tiny-distilbert")
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- shared fixtures

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """torch on 1 thread for every test in this process; see the module docstring for why."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tasks_offline(monkeypatch):
    """The task classes: offline unless a test serves files itself, so a stray download (of a
    dataset or, as hub.py honours it too, a checkpoint) fails loudly; no $TINYDISTIL_DATA."""
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    monkeypatch.delenv("TINYDISTIL_DATA", raising=False)


@pytest.fixture
def bench_offline(monkeypatch, tmp_path):
    """TestBench: no network and an empty Hub cache and data directory, whatever the machine has;
    bench.main sets the thread count, so the test's own count is put back afterwards."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TINYDISTIL_DATA", str(tmp_path / "data"))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data_tok():
    """fixtures/data's 156-token WordPiece tokenizer, saved as tokenizer.json with padding and
    truncation on (as published checkpoints ship it): TestData's corpora use its words."""
    return load_tokenizer(DATA_FIX / "tok_json")


@pytest.fixture
def task_tok():
    """The tokenizer of the tiny checkpoints (fixtures/models/tokenizer): so few words that a SQuAD
    context breaks into many pieces and several windows. A fresh one per test: tests change it."""
    return data.load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 lines of words from the tiny checkpoints' vocabulary: enough for a few dozen batches."""
    words = [w for w in (TOKENIZER / "vocab.txt").read_text().split()
             if w.isalpha() and len(w) > 2]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))
                              for _ in range(300)) + "\n")
    return path


def pretrain_config(tmp_path, corpus, **kw):
    """A PretrainConfig for a run of seconds: the tiny teacher, a 2-layer student, the corpus."""
    base = dict(teacher=TINY_BERT, out=str(tmp_path / "out"), data=str(corpus),
                data_dir=str(tmp_path / "data"), n_layer=2, batch_size=8, seq_len=32, max_steps=6,
                log_every=2, save_every=3, seed=0, device="cpu")
    return PretrainConfig(**{**base, **kw})


def cli(*args, env=None, timeout=120):
    """tinydistil.py run as a user runs it: a subprocess, its output captured."""
    return subprocess.run([sys.executable, str(ROOT / "tinydistil.py"), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def final_weights(out):
    """The tensors of the model saved at the top of a run's output folder."""
    return load_safetensors(Path(out) / "model.safetensors")


def copy_checkpoint(tmp_path, name="tiny-bert"):
    """A copy of a fixture checkpoint that a test may damage."""
    return Path(shutil.copytree(MODELS / name, tmp_path / name))


def closed_port():
    """A port on 127.0.0.1 that nothing listens on: a host that cannot be reached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _must_not_run(*args, **kwargs):
    pytest.fail("data or a model was loaded before the settings were checked")


def _glue_results():
    """Metrics of all nine GLUE tasks, as eval writes them: TestGlue's score, TestReport's rows."""
    return {"cola": {"mcc": 0.5}, "sst2": {"accuracy": 0.9}, "mrpc": {"accuracy": 0.8, "f1": 0.9},
            "stsb": {"pearson": 0.88, "spearman": 0.86}, "qqp": {"accuracy": 0.9, "f1": 0.86},
            "mnli": {"accuracy_m": 0.82, "accuracy_mm": 0.84}, "qnli": {"accuracy": 0.89},
            "rte": {"accuracy": 0.6}, "wnli": {"accuracy": 0.56}}


# -- generated task data (TestFinetune, TestDistill): files in the real layouts with a rule the
# tiny models learn in seconds

WORDS = ("the of and in to was he is as for on with that it his by at from her she you had an "
         "were but be this are not my they one which or have him me first all also their has up "
         "who out been when").split()
RESULT_KEYS = {"task", "model", "teacher", "metrics", "runs", "seconds", "config"}


def sentence(r, good, vocabulary=WORDS):
    """A few random words; "good" somewhere in it exactly when good: a rule the tiny models can
    learn."""
    words = [r.choice(vocabulary) for _ in range(r.randint(4, 9))]
    if good:
        words.insert(r.randrange(len(words) + 1), "good")
    return " ".join(words)


def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, row)) + "\n" for row in rows), encoding="utf-8")


def make_data(root):
    """SST-2, RTE, STS-B and MNLI tsv files (header names as in GLUE) and SQuAD json under root. In
    the pair tasks only the second sentence decides the label, so they test that pairs reach the
    model."""
    r = random.Random(0)
    for split, n in (("train", 256), ("dev", 64)):
        write_tsv(root / "glue/SST-2" / f"{split}.tsv",
                  [("sentence", "label")] + [(sentence(r, i % 2), i % 2) for i in range(n)])
        write_tsv(root / "glue/RTE" / f"{split}.tsv",
                  [("index", "sentence1", "sentence2", "label")] +
                  [(i, sentence(r, False), sentence(r, i % 2),
                    ("not_entailment", "entailment")[i % 2]) for i in range(n)])
        write_tsv(root / "glue/STS-B" / f"{split}.tsv",
                  [("index", "genre", "filename", "year", "old_index", "source1", "source2",
                    "sentence1", "sentence2", "score")] +
                  [(i, "main-captions", "MSRvid", "2012test", i, "none", "none",
                    sentence(r, False), sentence(r, i % 2),
                    f"{1 + 3 * (i % 2) + r.random() / 2:.3f}")
                   for i in range(n)])
    nli = ("entailment", "neutral", "contradiction")
    for split in ("train", "dev_matched", "dev_mismatched"):
        write_tsv(root / "glue/MNLI" / f"{split}.tsv",
                  [("index", "sentence1", "sentence2", "gold_label")] +
                  [(i, sentence(r, 0), sentence(r, 0), nli[i % 3]) for i in range(24)])
    context = "the cat sat on the mat . it was a good day for the cat , she said ."
    qas = [("where did the cat sit ?", "the mat"), ("what was it ?", "a good day"),
           ("who said it ?", "she")]
    questions = [{"id": f"q{i}", "question": q,
                  "answers": [{"text": a, "answer_start": context.index(a)}] * 2}
                 for i, (q, a) in enumerate(qas)]
    squad = {"version": "1.1", "data": [
        {"title": "cat", "paragraphs": [{"context": context, "qas": questions}]}]}
    for split in ("train", "dev"):
        (root / "squad").mkdir(exist_ok=True)
        (root / "squad" / f"{split}-v1.1.json").write_text(json.dumps(squad))
    return root


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def results_lines(path) -> list:
    """The lines of a results.jsonl, as eval appends them."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_tiny(finetune_data, tmp_path, task, model="tiny-distilbert", **kw):
    cfg = EvalConfig(task=task, model=str(MODELS / model), data_dir=str(finetune_data),
                     batch_size=16, results=str(tmp_path / "results.jsonl"),
                     **{"device": "cpu", **kw})
    return run(cfg)


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """SST-2, CoLA and STS-B tsv files ("good" decides the label) and SQuAD train/dev json (the 60
    real fixture questions, split by question) under one data folder."""
    root, r = tmp_path_factory.mktemp("data"), random.Random(0)
    words = WORDS[:20]
    for split, n in (("train", 160), ("dev", 48)):
        write_tsv(root / "glue/SST-2" / f"{split}.tsv",
                  [("sentence", "label")] + [(sentence(r, i % 2, words), i % 2) for i in range(n)])
        write_tsv(root / "glue/CoLA" / f"{split}.tsv",
                  [("src", i % 2, "", sentence(r, i % 2, words)) for i in range(n)])
        write_tsv(root / "glue/STS-B" / f"{split}.tsv",
                  [("index", "genre", "filename", "year", "old_index", "source1", "source2",
                    "sentence1", "sentence2", "score")] +
                  [(i, "g", "f", "y", i, "s", "s", sentence(r, False, words),
                    sentence(r, i % 2, words), f"{1 + 3 * (i % 2) + r.random() / 2:.3f}")
                   for i in range(n)])
    dev = json.loads((TASK_FIX / "squad" / "dev-v1.1.json").read_text())
    for split, remainder in (("train", (1, 2)), ("dev", (0,))):
        part = json.loads(json.dumps(dev))
        for article in part["data"]:
            for p in article["paragraphs"]:
                p["qas"] = [qa for k, qa in enumerate(p["qas"]) if k % 3 in remainder]
        (root / "squad").mkdir(exist_ok=True)
        (root / "squad" / f"{split}-v1.1.json").write_text(json.dumps(part))
    return root


def tiny_cfg(task_data, tmp_path, task="sst2", **kw):
    kw = {"epochs": 6, "lr": 3e-3, "batch_size": 16, "teacher_dtype": "float32", "device": "cpu",
          **kw}
    return EvalConfig(task=task, model=TINY_DISTILBERT, data_dir=str(task_data),
                      results=str(tmp_path / "results.jsonl"), **kw)


@pytest.fixture(scope="module")
def teachers(task_data, tmp_path_factory):
    """{task: folder} of tiny models fine-tuned on sst2, stsb and squad, saved with --out."""
    out = tmp_path_factory.mktemp("teachers")
    recipes = {"sst2": {"epochs": 6}, "stsb": {"epochs": 2}, "squad": {"epochs": 1, "lr": 1e-3}}
    for task, kw in recipes.items():
        run(tiny_cfg(task_data, out, task, out=str(out / task), **kw))
    return {task: str(out / task) for task in recipes}


# ----------------------------------------------------------------------------- the local server

# One ThreadingHTTPServer on 127.0.0.1 (port 0) per test that asks for `server`, one handler class.
# It logs every request and answers by path:
#   a file the test put in server.files ({"/name": bytes}) or under server.folder: the whole file,
#     or its tail from a Range request; a WikiText archive only to a browser User-Agent (403 to
#     any other, like the real host);
#   /<org>/<name>/resolve/<revision>/<file>: the Hugging Face Hub's resolve protocol
#     (X-Repo-Commit, ETag, a 302 to the CDN path with X-Linked-Etag and X-Linked-Size for the LFS
#     file, 404 with X-Error-Code, a 307 for a renamed repo, 403 for a gated one without a token);
#   /cdn/<sha256>: the Hub's CDN, Range requests included, with the fault a test injects: a corrupt
#     blob, a connection cut mid-body, a short body, a CDN that ignores Range.
# The fixtures fake_hub and wikitext_host point the code at it and lift the offline switches.

REPO, GATED, RENAMED, HUB_TOKEN = "org/tiny-bert", "org/gated", "org/old-name", "hf_secret"
COMMIT = hashlib.sha1(b"the only commit").hexdigest()
HUB_MODEL = random.Random(0).randbytes(200_000)  # stands in for model.safetensors: the transport
HUB_FILES = {"config.json": b'{"model_type": "bert", "hidden_size": 8}\n',
             "model.safetensors": HUB_MODEL,
             "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n"}  # no tokenizer.json: the
# optional file to skip


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def git_sha1(data):  # the Hub's ETag for a small (non-LFS) file
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LocalServer:
    """What the server serves, set by each test, and what it was asked."""

    def __init__(self, port):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = []  # (method, path, request headers) of every request
        self.files = {}  # "/name": bytes, served as plain files
        self.folder: Optional[Path] = None  # files under it are served as /relative/path
        self.blobs = {sha256(HUB_MODEL): HUB_MODEL}  # what the CDN serves, by sha256
        self.fault = None  # "corrupt" | "cut" | "short" | "no-range", applied by the CDN
        self.cdn = ""  # the CDN Location's prefix: "" is a relative redirect, else an absolute URL
        self.cache: Optional[Path] = None  # the Hub cache fake_hub points HF_HUB_CACHE at

    @property
    def paths(self):
        return [path for _, path, _ in self.log]

    @property
    def agents(self):
        return [headers.get("User-Agent", "") for _, _, headers in self.log]

    def plain_file(self, path) -> Optional[bytes]:
        if path in self.files:
            return self.files[path]
        if self.folder is not None and (self.folder / path.lstrip("/")).is_file():
            return (self.folder / path.lstrip("/")).read_bytes()
        return None


class Handler(http.server.BaseHTTPRequestHandler):
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
        server = self.server.state
        server.log.append((self.command, self.path, dict(self.headers)))
        file = server.plain_file(self.path)
        parts = self.path.split("/")
        if file is not None:
            return self.plain(file, body)
        if parts[1] == "cdn":
            return self.cdn(parts[2], body)
        if len(parts) < 6 or parts[3] != "resolve":
            return self.send(404, {}, b"Not found", body)
        self.hub(repo="/".join(parts[1:3]), rev=parts[4], name="/".join(parts[5:]), body=body)

    def plain(self, data, body):
        # the WikiText host refuses Python's default User-Agent
        browser = self.headers.get("User-Agent", "").startswith("Mozilla/5.0")
        if self.path.startswith("/wikitext-") and not browser:
            return self.send(403, {}, b"Forbidden", body)
        self.send_range(data, {}, body)

    def hub(self, repo, rev, name, body):
        if repo == RENAMED:  # the Hub redirects a renamed repo's URLs to the new name, no metadata
            return self.send(307, {"Location": self.path.replace(RENAMED, REPO)},
                             b"Temporary Redirect", body)
        if repo not in (REPO, GATED):
            return self.send(404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", body)
        if repo == GATED and self.headers.get("Authorization") != f"Bearer {HUB_TOKEN}":
            return self.send(403, {"X-Error-Code": "GatedRepo"},
                             b"Access to this model is restricted", body)
        if rev not in ("main", COMMIT):
            return self.send(404, {"X-Error-Code": "RevisionNotFound"}, b"Invalid rev id", body)
        if name not in HUB_FILES:
            return self.send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT},
                             b"Entry not found", body)
        data = HUB_FILES[name]
        if name == "model.safetensors":
            # The redirect's own Content-Length is its short body, not the file: a client must use
            # X-Linked-Size.
            loc = f"{self.server.state.cdn}/cdn/{sha256(data)}"
            meta = {"Location": loc, "X-Repo-Commit": COMMIT, "ETag": f'"{sha256(data)}"',
                    "X-Linked-Etag": f'"{sha256(data)}"', "X-Linked-Size": str(len(data))}
            return self.send(302, meta, f"Found. Redirecting to {loc}".encode(), body)
        self.send_range(data, {"X-Repo-Commit": COMMIT, "ETag": f'"{git_sha1(data)}"'}, body)

    def cdn(self, sha, body):
        server = self.server.state
        if sha not in server.blobs:
            return self.send(404, {}, b"NoSuchKey", body)
        data = server.blobs[sha]
        if server.fault == "corrupt":
            data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
        etag = {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}  # S3-style
        self.send_range(data, etag, body, server.fault)

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
def server(monkeypatch):
    """The local HTTP server: a LocalServer to configure and read the log of."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = state = LocalServer(httpd.server_port)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def go_online(monkeypatch):
    """A test that serves what the code downloads is online, whatever the machine or class set."""
    for var in ("HF_HUB_OFFLINE", "TINYDISTIL_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fake_hub(server, monkeypatch, tmp_path):
    """The server as the Hugging Face Hub (HF_ENDPOINT), with an empty cache under tmp_path."""
    server.cache = tmp_path / "hub"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(server.cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    go_online(monkeypatch)
    return server


@pytest.fixture
def wikitext_host(server, monkeypatch):
    """The server as the WikiText host (corpus.WIKITEXT_URL); tests put the archives in .files."""
    monkeypatch.setattr("corpus.WIKITEXT_URL", f"{server.url}/")
    go_online(monkeypatch)
    return server
