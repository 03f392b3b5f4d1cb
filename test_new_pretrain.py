"""Scratch tests for tinydistil.py pretrain (recipes, out-dir safety, SIGTERM, the loss rows); merged
into test_all.py at the end."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tinydistil
from common import UserError
from hub import load_safetensors
from model import BERT
from tinydistil import PretrainConfig, init_student, pretrain

ROOT = Path(__file__).parent
MODELS = ROOT / "fixtures" / "models"
TEACHER = str(MODELS / "tiny-bert")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 lines of words from the fixture tokenizer's vocabulary: enough for a few dozen batches."""
    words = [w for w in (MODELS / "tokenizer" / "vocab.txt").read_text().split()
             if w.isalpha() and len(w) > 2]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))
                              for _ in range(300)) + "\n")
    return path


def pretrain_config(tmp_path, corpus, **kw):
    base = dict(teacher=TEACHER, out=str(tmp_path / "out"), data=str(corpus),
                data_dir=str(tmp_path / "data"), n_layer=2, batch_size=8, seq_len=32, max_steps=6,
                log_every=2, save_every=3, seed=0)
    return PretrainConfig(**{**base, **kw})


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "tinydistil.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def tree(folder: Path) -> dict:
    """{relative path: bytes} of every file below folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class TestRecipes:
    def test_small_is_the_default_and_explicit_flags_win(self):
        cfg = tinydistil.resolve_recipe(PretrainConfig(), 1, CPU)
        assert (cfg.batch_size, cfg.grad_accum, cfg.seq_len, cfg.lr, cfg.epochs) == (16, 1, 128, 5e-4, 3)
        cfg = tinydistil.resolve_recipe(PretrainConfig(recipe="paper", lr=1e-4), 1, CPU)
        assert (cfg.seq_len, cfg.lr, cfg.teacher_dtype, cfg.data_fraction) == (512, 1e-4, "float32", 1.0)

    def test_paper_recipe_keeps_2000_sequences_per_step_over_processes(self):
        for world, accum in ((1, 400), (2, 200), (8, 50)):
            cfg = tinydistil.resolve_recipe(PretrainConfig(recipe="paper"), world, CPU)
            assert cfg.grad_accum == accum and cfg.batch_size * cfg.grad_accum * world == 2000
        line = tinydistil.describe_recipe(tinydistil.resolve_recipe(PretrainConfig(), 1, CPU), 1)
        assert line.startswith("recipe small: 16 sequences per step") and "--recipe paper" in line

    def test_teacher_dtype_auto_follows_the_hardware(self):
        cfg = tinydistil.resolve_recipe(PretrainConfig(), 1, CPU)
        native = tinydistil.has_bfloat16_matmul(CPU)
        assert cfg.teacher_dtype == ("bfloat16" if native else "float32")
        assert "teacher" in tinydistil.describe_recipe(cfg, 1)

    def test_unknown_recipe(self):
        with pytest.raises(UserError, match="--recipe huge"):
            tinydistil.resolve_recipe(PretrainConfig(recipe="huge"), 1, CPU)


class TestStudentInit:
    def test_positions_frozen_by_default_as_the_reference(self, tmp_path, corpus):
        teacher = BERT.from_pretrained(TEACHER)
        student, _ = init_student(teacher, 2, train_positions=False)
        assert not student.embeddings.position_embeddings.weight.requires_grad
        pretrain(pretrain_config(tmp_path, corpus, max_steps=4, lr=1e-2))
        saved = BERT.from_pretrained(str(tmp_path / "out"))
        assert torch.equal(saved.embeddings.position_embeddings.weight,
                           teacher.embeddings.position_embeddings.weight)
        assert not torch.equal(saved.embeddings.word_embeddings.weight,
                               teacher.embeddings.word_embeddings.weight)

    def test_train_positions_flag(self, tmp_path, corpus):
        pretrain(pretrain_config(tmp_path, corpus, max_steps=4, lr=1e-2, train_positions=True))
        saved = BERT.from_pretrained(str(tmp_path / "out"))
        teacher = BERT.from_pretrained(TEACHER)
        assert not torch.equal(saved.embeddings.position_embeddings.weight,
                               teacher.embeddings.position_embeddings.weight)

    def test_random_init_is_the_reference_init_with_sinusoidal_positions(self):
        teacher = BERT.from_pretrained(TEACHER)
        torch.manual_seed(0)
        student, _ = init_student(teacher, 2, how="random")
        pos = student.embeddings.position_embeddings.weight
        assert torch.allclose(pos[3, 0], torch.tensor(3.0).sin()) and torch.allclose(pos[3, 1],
                                                                                      torch.tensor(3.0).cos())
        w = student.layers[0].ffn.lin1.weight
        assert abs(w.std().item() - 0.02) < 0.004 and abs(w.mean().item()) < 0.004
        assert not torch.equal(w, teacher.layers[0].ffn.lin1.weight)


class TestDistillationLoss:
    """The row selection (logits only where a loss reads them) against the plain full computation."""

    @pytest.mark.parametrize("weights", [(5.0, 2.0, 1.0), (0.0, 2.0, 1.0), (5.0, 0.0, 1.0),
                                         (0.0, 0.0, 1.0), (5.0, 2.0, 0.0)])
    def test_equals_the_plain_formula(self, weights):
        from data import mask_batch
        teacher = BERT.from_pretrained(TEACHER)
        torch.manual_seed(0)
        student, _ = init_student(teacher, 2)
        student.eval()  # no dropout: both sides see the same forward
        ids = torch.randint(5, teacher.config.vocab_size, (3, 12))
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        probs = torch.ones(teacher.config.vocab_size)
        masked, labels = mask_batch(ids, mask, probs, 4, teacher.config.vocab_size,
                                    torch.Generator().manual_seed(0), 0.3)
        cfg = PretrainConfig(alpha_ce=weights[0], alpha_mlm=weights[1], alpha_cos=weights[2])
        loss, terms = tinydistil.distillation_loss(
            teacher, tinydistil.StudentForDistillation(student), masked, mask, labels, cfg,
            (torch.float32, torch.float32))
        real = mask.bool()
        t, s = teacher(masked, mask), student(masked, mask)
        t_logits, s_logits = t.logits[real], s.logits[real]  # (N, V)
        T = cfg.temperature
        ce = F.kl_div(F.log_softmax(s_logits / T, -1), F.softmax(t_logits / T, -1),
                      reduction="batchmean") * T * T
        mlm = F.cross_entropy(s.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        cos = (1 - F.cosine_similarity(s.hidden_states[-1][real], t.hidden_states[-1][real])).mean()
        expected = weights[0] * ce + weights[1] * mlm + weights[2] * cos
        assert abs(loss.item() - expected.item()) < 1e-4
        assert set(terms) == {k for k, w in zip(("ce", "mlm", "cos"), weights) if w > 0}


class TestOutDir:
    def test_a_users_files_are_never_touched(self, tmp_path, corpus):
        users = tmp_path / "mine"
        users.mkdir()
        (users / "notes.txt").write_text("my notes")
        (users / "config.json").write_text('{"mine": true}')
        before = tree(users)
        for flags in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(UserError, match="not a tinydistil run.*new or empty folder"):
                pretrain(pretrain_config(tmp_path, corpus, out=str(users), **flags))
        assert tree(users) == before

    def test_a_checkpoint_folder_is_not_an_output_folder(self, tmp_path, corpus):
        import shutil
        model_copy = tmp_path / "tiny-bert"
        shutil.copytree(TEACHER, model_copy)
        before = tree(model_copy)
        with pytest.raises(UserError, match="not a tinydistil run"):
            pretrain(pretrain_config(tmp_path, corpus, out=str(model_copy)))
        assert tree(model_copy) == before

    def test_out_is_a_file_or_unwritable(self, tmp_path, corpus):
        (tmp_path / "file").write_text("x")
        r = cli("pretrain", "--teacher", TEACHER, "--out", str(tmp_path / "file"))
        assert r.returncode == 1 and "is a file" in r.stderr and "Traceback" not in r.stderr
        t0 = time.perf_counter()
        r = cli("pretrain", "--teacher", "/no/such/teacher", "--out", "/proc/tinydistil-out")
        assert r.returncode == 1 and "cannot write to --out /proc/tinydistil-out" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and time.perf_counter() - t0 < 60

    def test_overwrite_replaces_only_our_own_run(self, tmp_path, corpus, capsys):
        pretrain(pretrain_config(tmp_path, corpus, max_steps=2))
        (tmp_path / "out" / "notes.txt").write_text("kept")
        with pytest.raises(UserError, match="already holds a tinydistil run.*--resume.*--overwrite"):
            pretrain(pretrain_config(tmp_path, corpus, max_steps=2))
        pretrain(pretrain_config(tmp_path, corpus, max_steps=4, overwrite=True))
        assert "--overwrite: replacing" in capsys.readouterr().out
        assert (tmp_path / "out" / "notes.txt").read_text() == "kept"
        assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == "step-4"

    def test_a_missing_corpus_fails_before_the_teacher_loads(self, tmp_path):
        r = cli("pretrain", "--teacher", "nobody/absent-model", "--data", str(tmp_path / "none.txt"),
                "--out", str(tmp_path / "o"), env={"HF_HUB_OFFLINE": "1"})
        assert r.returncode == 1 and "--data" in r.stderr and "none.txt" in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()

    def test_failure_before_the_first_checkpoint_leaves_no_folder(self, tmp_path, corpus):
        with pytest.raises(UserError):
            pretrain(pretrain_config(tmp_path, corpus, teacher=str(tmp_path / "nope")))
        assert not (tmp_path / "out").exists()


class TestBadSettings:
    @pytest.mark.parametrize("args,message", [
        (["--lr", "-1"], "--lr -1.0: the learning rate must be positive"),
        (["--lr", "0"], "--lr 0.0: the learning rate must be positive"),
        (["--max-steps", "-1"], "--max-steps -1: give 0 or more"),
        (["--epochs", "0"], "--epochs 0: give at least 1"),
        (["--epochs", "-2"], "--epochs -2: give at least 1"),
        (["--batch-size", "0"], "at least 1"),
        (["--recipe", "big"], "--recipe big"),
        (["--student-init", "copy"], "--student-init takes teacher or random"),
        (["--resume", "--overwrite"], "give one of them"),
    ])
    def test_one_line_before_anything_loads(self, tmp_path, args, message):
        r = cli("pretrain", "--teacher", str(tmp_path / "absent"), "--out", str(tmp_path / "o"), *args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip() == f"error: {r.stderr.strip()[7:]}" and message in r.stderr
        assert not (tmp_path / "o").exists()

    def test_fill_mask_top_k_zero(self):
        r = cli("fill-mask", "a [MASK] .", "--model", TEACHER, "--top-k", "0")
        assert r.returncode == 1 and "--top-k 0" in r.stderr


class TestLongRuns:
    def test_log_units_mfu_and_the_final_line(self, tmp_path, corpus, capsys):
        pretrain(pretrain_config(tmp_path, corpus, max_steps=4, log_every=2))
        out = capsys.readouterr().out
        assert "ms/step" in out and "tokens/s" in out and "ETA" in out
        assert f"saved the student to {tmp_path / 'out'}" in out
        log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
        assert all(r["mfu"] is None or 0 < r["mfu"] <= 1 for r in log)

    def test_logged_losses_are_means_over_the_interval(self, tmp_path, corpus):
        every = [json.loads(line) for line in self._log(tmp_path / "a", corpus, log_every=1)]
        pairs = [json.loads(line) for line in self._log(tmp_path / "b", corpus, log_every=2)]
        for two, (x, y) in zip(pairs, zip(every[0::2], every[1::2])):
            for key in ("loss", "loss_mlm", "loss_cos"):
                assert abs(two[key] - (x[key] + y[key]) / 2) < 1e-5, key

    @staticmethod
    def _log(tmp_path, corpus, log_every):
        pretrain(pretrain_config(tmp_path, corpus, max_steps=4, log_every=log_every))
        return (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()

    def test_default_save_interval_checkpoints_a_run_five_times(self, tmp_path, corpus, capsys):
        pretrain(pretrain_config(tmp_path, corpus, max_steps=10, save_every=None, log_every=1))
        state = torch.load(tmp_path / "out" / "checkpoints" / "step-10" / "train_state.pt",
                           weights_only=False)
        assert state["config"]["save_every"] is None and state["step"] == 10

    @pytest.mark.slow
    def test_sigterm_saves_then_resume_continues_bit_for_bit(self, tmp_path, corpus):
        args = ["pretrain", "--teacher", TEACHER, "--data", str(corpus), "--data-dir",
                str(tmp_path / "data"), "--n-layer", "2", "--batch-size", "16", "--seq-len", "64",
                "--max-steps", "24", "--save-every", "100", "--log-every", "1", "--seed", "1"]
        full = cli(*args, "--out", str(tmp_path / "full"))
        assert full.returncode == 0, full.stderr
        out = tmp_path / "stopped"
        proc = subprocess.Popen([sys.executable, str(ROOT / "tinydistil.py"), *args, "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        log = out / "train_log.jsonl"
        while proc.poll() is None and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:
            pytest.skip("the run finished before SIGTERM arrived")
        assert proc.returncode == 128 + signal.SIGTERM, stderr
        assert "stopped by SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
        stopped_at = int((out / "checkpoints" / "latest").read_text().removeprefix("step-"))
        assert 3 <= stopped_at < 24
        resumed = cli(*args, "--out", str(out), "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert f"at step {stopped_at}" in resumed.stdout
        a = load_safetensors(tmp_path / "full" / "model.safetensors")
        b = load_safetensors(out / "model.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


class TestPretrainStepBench:
    @pytest.mark.slow
    def test_bench_times_tinydistils_own_step(self, capsys):
        import bench
        bench.main(["--pretrain-step", "--batch-size", "1", "--seq-len", "16", "--steps", "1"])
        out = capsys.readouterr().out
        assert "distillation step: BERT-base teacher" in out and "tokens/s" in out and "MFU" in out

    def test_bad_pretrain_step_options(self, capsys):
        import bench
        with pytest.raises(SystemExit):
            bench.main(["--pretrain-step", "--dtypes", "int8"])
        assert "--pretrain-step takes --dtypes float32 or bfloat16" in capsys.readouterr().err
