"""Tests of `tinydistil.py pretrain` and the CLI: student initialisation, the loop, checkpoints,
exact resumption after SIGKILL, DDP on 2 gloo processes, bad input."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hub import UserError
from model import BERT, load_safetensors
from tinydistil import PretrainConfig, init_student, layer_map, pretrain

ROOT = Path(__file__).parent
MODELS = ROOT / "fixtures" / "models"
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


def config(tmp_path, corpus, **kw):
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
                 "vocab_projector.bias", "transformer.layer.0.ffn.lin2.weight"):
        assert torch.equal(s[name], t[name]), name
    assert student.vocab_projector.weight is student.embeddings.word_embeddings.weight  # still tied


def test_pretrain_logs_saves_and_learns(tmp_path, corpus):
    cfg = config(tmp_path, corpus, max_steps=40, log_every=10, save_every=20, lr=2e-3)
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
    pretrain(config(tmp_path, corpus, max_steps=0))
    saved = BERT.from_pretrained(str(tmp_path / "out"))
    expected, _ = init_student(BERT.from_pretrained(TEACHER), 2)
    for k, v in expected.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k


def test_zero_weight_skips_a_term_and_encoder_teacher_needs_alpha_ce_0(tmp_path, corpus):
    encoder = str(MODELS / "tiny-bert-encoder")
    with pytest.raises(UserError, match="no MLM head.*--alpha-ce 0"):
        pretrain(config(tmp_path, corpus, teacher=encoder))
    pretrain(config(tmp_path, corpus, teacher=encoder, alpha_ce=0.0, alpha_mlm=0.0, max_steps=2))
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss_ce"] == 0 and log[-1]["loss_mlm"] == 0 and log[-1]["loss_cos"] > 0


def test_out_dir_guards(tmp_path, corpus):
    with pytest.raises(UserError, match="no complete checkpoint"):
        pretrain(config(tmp_path, corpus, resume=True))
    pretrain(config(tmp_path, corpus))
    with pytest.raises(UserError, match="already holds a run.*--resume"):
        pretrain(config(tmp_path, corpus))
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-6" / "train_state.pt", weights_only=False)
    assert state["step"] == 6
    with pytest.raises(UserError, match="--batch-size 8 not 4"):
        pretrain(config(tmp_path, corpus, resume=True, batch_size=4))


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
