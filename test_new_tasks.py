"""test_new_tasks.py: new tests of tasks/ and losses.py's fine-tuning terms, for test_all.py.

    python -m pytest -q test_new_tasks.py

Offline and CPU only: the tiny checkpoints under fixtures/models, task files generated in the real
layouts (a rule the tiny models learn in seconds) and the SQuAD rows of fixtures/tasks. Covers
distillation during fine-tuning (paper section 4.1, "DistilBERT (D)"), the median-of-seeds
protocol, SQuAD's max-context decoding, the report's (D) rows, spread and marker, and one-line
errors for bad `eval` settings before anything is loaded.
"""
import json
import math
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tinydistil
from common import UserError
from hub import load_safetensors
from losses import L_ce, L_ce_reference, L_kd_mse, L_kd_span
from model import BERT
from tasks import distill, finetune, report, squad
from tasks.finetune import EvalConfig, TaskModel, run

ROOT = Path(__file__).parent
MODELS = ROOT / "fixtures" / "models"
TINY = str(MODELS / "tiny-distilbert")
TASK_FIX = ROOT / "fixtures" / "tasks"
WORDS = "the of and in to was he is as for on with that it his by at from her she".split()


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch):
    """No download can happen unnoticed; torch on 1 thread (the models are 32 wide)."""
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TINYDISTIL_DATA", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sentence(r, good):
    words = [r.choice(WORDS) for _ in range(r.randint(4, 9))]
    if good:
        words.insert(r.randrange(len(words) + 1), "good")
    return " ".join(words)


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, row)) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """SST-2, CoLA and STS-B tsv files ("good" decides the label) and SQuAD train/dev json (the 60
    real fixture questions, split by question) under one data folder."""
    root, r = tmp_path_factory.mktemp("data"), random.Random(0)
    for split, n in (("train", 160), ("dev", 48)):
        _write(root / "glue/SST-2" / f"{split}.tsv",
               [("sentence", "label")] + [(_sentence(r, i % 2), i % 2) for i in range(n)])
        _write(root / "glue/CoLA" / f"{split}.tsv",
               [("src", i % 2, "", _sentence(r, i % 2)) for i in range(n)])
        _write(root / "glue/STS-B" / f"{split}.tsv",
               [("index", "genre", "filename", "year", "old_index", "source1", "source2",
                 "sentence1", "sentence2", "score")] +
               [(i, "g", "f", "y", i, "s", "s", _sentence(r, False), _sentence(r, i % 2),
                 f"{1 + 3 * (i % 2) + r.random() / 2:.3f}") for i in range(n)])
    dev = json.loads((TASK_FIX / "squad" / "dev-v1.1.json").read_text())
    for split, keep in (("train", lambda k: k % 3 != 0), ("dev", lambda k: k % 3 == 0)):
        part = json.loads(json.dumps(dev))
        for article in part["data"]:
            for p in article["paragraphs"]:
                p["qas"] = [qa for k, qa in enumerate(p["qas"]) if keep(k)]
        (root / "squad").mkdir(exist_ok=True)
        (root / "squad" / f"{split}-v1.1.json").write_text(json.dumps(part))
    return root


def tiny_cfg(task_data, tmp_path, task="sst2", **kw):
    kw = {"epochs": 6, "lr": 3e-3, "batch_size": 16, "teacher_dtype": "float32", **kw}
    return EvalConfig(task=task, model=TINY, data_dir=str(task_data),
                      results=str(tmp_path / "results.jsonl"), **kw)


@pytest.fixture(scope="module")
def teachers(task_data, tmp_path_factory):
    """{task: folder} of tiny models fine-tuned on sst2, stsb and squad, saved with --out."""
    out = tmp_path_factory.mktemp("teachers")
    recipes = {"sst2": {"epochs": 6}, "stsb": {"epochs": 2}, "squad": {"epochs": 1, "lr": 1e-3}}
    for task, kw in recipes.items():
        run(tiny_cfg(task_data, out, task, out=str(out / task), **kw))
    return {task: str(out / task) for task in recipes}


def _weights(folder):
    return load_safetensors(Path(folder) / "model.safetensors")


# ----------------------------------------------------------------------------- losses

class TestDistillationLosses:
    def test_reference_kl_by_hand(self):
        # T = 2 halves the logits: p = softmax(log 3 / 2, 0) = (sqrt3, 1) / (sqrt3 + 1); q uniform
        s, t = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
        r = math.sqrt(3.0)
        p = (r / (r + 1), 1 / (r + 1))
        kl = p[0] * math.log(p[0] / 0.5) + p[1] * math.log(p[1] / 0.5)
        assert L_ce_reference(s, t, 2.0).item() == pytest.approx(4 * kl, abs=1e-6)
        assert L_ce_reference(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)

    def test_fast_L_ce_equals_the_plain_formula_in_value_and_gradient(self):
        torch.manual_seed(0)
        s, t = 3 * torch.randn(150, 37), 3 * torch.randn(150, 37)  # 150 rows: 3 chunks of 64
        for T in (1.0, 2.0, 3.5):
            fast, plain = s.clone().requires_grad_(), s.clone().requires_grad_()
            L_ce(fast, t, T).backward()
            L_ce_reference(plain, t, T).backward()
            assert L_ce(s, t, T).item() == pytest.approx(L_ce_reference(s, t, T).item(), rel=1e-5)
            assert (fast.grad - plain.grad).abs().max() < 1e-6

    def test_span_term_by_hand_and_padding_left_out(self):
        # one window of 2 real tokens and 1 pad; start logits s, teacher t; end: s and t swapped
        s = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [7.0, -7.0]]])  # (1, 3, 2)
        t = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0], [-3.0, 9.0]]])
        mask = torch.tensor([[1, 1, 0]])
        # start: p = (3/4, 1/4), q = (1/2, 1/2); end: p = (1/2, 1/2), q = (3/4, 1/4); T = 1
        kl_start = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
        kl_end = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
        value = L_kd_span(s, t, mask, temperature=1.0)
        assert value.item() == pytest.approx((kl_start + kl_end) / 2, abs=1e-6)
        s2, t2 = s.clone(), t.clone()
        s2[0, 2], t2[0, 2] = torch.tensor([100.0, 50.0]), torch.tensor([-40.0, 3.0])
        assert L_kd_span(s2, t2, mask, temperature=1.0).item() == pytest.approx(value.item())
        s2.requires_grad_()
        L_kd_span(s2, t2, mask, 2.0).backward()
        assert not s2.grad[0, 2].any() and s2.grad[0, :2].abs().sum() > 0

    def test_mse_term_by_hand(self):
        assert L_kd_mse(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.0])).item() == 5.0


# ----------------------------------------------------------------------------- (D)

@pytest.mark.slow  # the first test here trains the three tiny teachers (several seconds)
class TestDistillationDuringFineTuning:
    def test_alpha_zero_is_exactly_the_plain_run(self, task_data, teachers, tmp_path):
        plain = run(tiny_cfg(task_data, tmp_path, epochs=2, out=str(tmp_path / "plain")))
        kd0 = run(tiny_cfg(task_data, tmp_path, epochs=2, out=str(tmp_path / "kd0"),
                           teacher=teachers["sst2"], alpha_kd=0.0))
        kd = run(tiny_cfg(task_data, tmp_path, epochs=2, out=str(tmp_path / "kd"),
                          teacher=teachers["sst2"]))
        assert plain["teacher"] is None and kd0["metrics"] == plain["metrics"]
        a, b, c = (_weights(tmp_path / name) for name in ("plain", "kd0", "kd"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)  # alpha 0.5: the teacher changes it
        assert kd["teacher"]["model"] == teachers["sst2"] and kd["teacher"]["alpha_kd"] == 0.5
        assert kd["teacher"]["temperature"] == 2.0 and kd["teacher"]["dtype"] == "float32"
        assert kd["config"]["teacher"] == teachers["sst2"]

    def test_the_teacher_alone_teaches_the_rule(self, task_data, teachers, tmp_path):
        # alpha 1: the labels are never used, only the teacher's soft targets
        line = run(tiny_cfg(task_data, tmp_path, teacher=teachers["sst2"], alpha_kd=1.0,
                            teacher_dtype="auto"))
        assert line["metrics"]["accuracy"] >= 0.9
        assert line["teacher"]["dtype"] in ("float32", "bfloat16")

    @pytest.mark.parametrize("task", ["stsb", "squad"])
    def test_regression_and_spans_with_bfloat16(self, task, task_data, teachers, tmp_path):
        line = run(tiny_cfg(task_data, tmp_path, task, epochs=1, teacher=teachers[task],
                            dtype="bfloat16", teacher_dtype="bfloat16"))
        assert line["teacher"]["dtype"] == "bfloat16" and line["teacher"]["logits_bytes"] > 0
        assert all(math.isfinite(v) for v in line["metrics"].values())

    def test_cached_teacher_logits_equal_on_the_fly_ones(self, task_data, teachers, tmp_path):
        for task in ("sst2", "squad"):
            teacher = TaskModel.from_pretrained(teachers[task])
            cfg = replace(tiny_cfg(task_data, tmp_path, task), max_seq_len=64, batch_size=8,
                          device="cpu")
            tok = finetune.tokenizer_for(teacher.encoder)
            items = finetune._load(cfg)[0]
            if task == "squad":
                items = squad.features(items, tok, cfg.max_seq_len)
            cached, info = finetune.teacher_logits(teacher, items, tok, cfg)
            assert cached.dtype == np.float16 and info["logits_bytes"] == cached.nbytes
            order = random.Random(1).sample(range(len(items)), len(items))
            for i in range(0, len(order), 5):  # other batches, so other padding
                batch = order[i:i + 5]
                x, _ = finetune._collate([items[j] for j in batch], tok, cfg, False)
                with torch.no_grad():
                    live = teacher(**x).numpy()
                for row, j in enumerate(batch):
                    n = int(x["attention_mask"][row].sum()) if task == "squad" else live.shape[1]
                    np.testing.assert_allclose(cached[j][:n], live[row][:n], rtol=2e-3, atol=2e-3)

    def test_wrong_teachers_are_refused_before_loading(self, task_data, teachers, tmp_path,
                                                       monkeypatch):
        monkeypatch.setattr(finetune, "_load", _must_not_run)
        other_vocab = tmp_path / "other-vocab"
        shutil.copytree(teachers["sst2"], other_vocab)
        tokenizer = json.loads((other_vocab / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        vocab["goodish"] = vocab.pop("good")
        (other_vocab / "tokenizer.json").write_text(json.dumps(tokenizer))
        no_task = tmp_path / "no-task"  # as a checkpoint from elsewhere: only its head tells
        shutil.copytree(teachers["sst2"], no_task)
        config = json.loads((no_task / "config.json").read_text())
        del config["finetuning_task"]
        (no_task / "config.json").write_text(json.dumps(config))
        cases = [("sst2", TINY, "not a fine-tuned task model"),
                 ("cola", teachers["sst2"], "fine-tuned on sst2, not cola"),
                 ("stsb", str(no_task), "labels ['0', '1']; stsb needs a regression score"),
                 ("squad", str(no_task), "squad needs question answering"),
                 ("sst2", teachers["squad"], "fine-tuned on squad, not sst2"),
                 ("sst2", str(other_vocab), "another vocabulary"),
                 ("sst2", str(tmp_path / "none"), "no such checkpoint folder")]
        for task, teacher, message in cases:
            with pytest.raises(UserError, match=message.replace("[", r"\[")):
                run(tiny_cfg(task_data, tmp_path, task, teacher=teacher))
        assert not (tmp_path / "results.jsonl").exists()
        config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}  # saved without label names
        (no_task / "config.json").write_text(json.dumps(config))
        assert distill.check_teacher(str(no_task), "sst2", TINY) == no_task
        with pytest.raises(UserError, match="mnli needs labels"):  # 2 unnamed labels, not 3
            distill.check_teacher(str(no_task), "mnli", TINY)

    def test_glue_needs_a_teacher_for_every_task_before_training(self, task_data, teachers,
                                                                  tmp_path):
        folder = tmp_path / "teachers"
        shutil.copytree(teachers["sst2"], folder / "sst2")
        with pytest.raises(UserError, match="cola"):
            run(tiny_cfg(TASK_FIX, tmp_path, "glue", teacher=str(folder)))
        assert not (tmp_path / "results.jsonl").exists()


def _must_not_run(*args, **kwargs):
    pytest.fail("data or a model was loaded before the settings were checked")


# ----------------------------------------------------------------------------- seeds

class TestSeeds:
    def test_median_of_seeds_and_each_run_reproduces_alone(self, task_data, tmp_path, capsys):
        cfg = tiny_cfg(task_data, tmp_path, epochs=1, max_train_examples=64, seeds=3)
        line = run(cfg)
        assert [r["seed"] for r in line["runs"]] == [42, 43, 44]
        runs = [r["metrics"]["accuracy"] for r in line["runs"]]
        assert line["metrics"] == {"accuracy": float(np.median(runs))}
        out = capsys.readouterr().out
        assert "sst2 seed 43: accuracy" in out and "sst2 median of 3 seeds: accuracy" in out
        alone = run(replace(cfg, seed=43, seeds=1))  # same subset, so the same run
        assert alone["metrics"] == line["runs"][1]["metrics"]
        saved = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
        assert saved == line and saved["config"]["seeds"] == 3

    def test_training_subset_does_not_depend_on_the_seed(self, task_data, tmp_path):
        cfg = tiny_cfg(task_data, tmp_path, max_train_examples=50, max_eval_examples=20)
        train_a, evals_a = finetune._load(replace(cfg, seed=1))
        train_b, evals_b = finetune._load(replace(cfg, seed=2))
        assert len(train_a) == 50 and train_a == train_b and evals_a == evals_b


# ----------------------------------------------------------------------------- SQuAD decoding

class TestMaxContext:
    def test_bert_example(self):
        # BERT's run_squad.py: "the man went to the store and bought a gallon of milk", windows
        # A = tokens 0-4, B = 3-7, C = 6-10: "bought" (7) has max context in C, "store" (5) in B
        a, b, c = squad._max_context([(0, 5), (3, 5), (6, 5)])
        assert c[7 - 6] and not b[7 - 3]
        assert b[5 - 3] and not a[4 - 0] and b[4 - 3]
        assert a[3] and not b[0]  # "to": min(3, 1) in A beats min(0, 4) in B
        assert [sum(w) for w in (a, b, c)] == [4, 3, 4]  # every token has exactly one window

    def test_a_span_is_read_only_from_its_max_context_window(self):
        tok = finetune.data.load_tokenizer(MODELS / "tokenizer")
        examples = squad.load("dev", TASK_FIX)[:1]
        feats = squad.features(examples, tok, max_len=48, stride=8)
        first, second = feats[0], feats[1]
        edge = max(k for k, o in enumerate(first["offsets"]) if o is not None)  # right edge
        assert not first["max_context"][edge]
        context = [k for k, o in enumerate(second["offsets"]) if o is not None]
        inner = next(k for k in context[len(context) // 2:]  # another token, max context here
                     if second["max_context"][k]
                     and second["offsets"][k] != first["offsets"][edge])
        starts = [np.full(len(f["input_ids"]), -5.0) for f in feats]
        ends = [np.full(len(f["input_ids"]), -5.0) for f in feats]
        starts[0][edge] = ends[0][edge] = 10.0  # the best span, but cut off by its window
        starts[1][inner] = ends[1][inner] = 5.0
        text = examples[0]["context"]
        expected = text[second["offsets"][inner][0]:second["offsets"][inner][1]]
        assert squad.postprocess(examples, feats, starts, ends) == {examples[0]["id"]: expected}


# ----------------------------------------------------------------------------- bad input

BAD = [("--lr", "-1", "--lr -1.0: must be positive"), ("--lr", "0", "--lr 0.0: must be positive"),
       ("--max-train-examples", "-5", "--max-train-examples -5"),
       ("--epochs", "-2", "--epochs -2"),
       ("--batch-size", "0", "--batch-size 0"), ("--seeds", "0", "--seeds 0"),
       ("--alpha-kd", "2", "--alpha-kd 2.0"), ("--kd-temperature", "0", "--kd-temperature 0.0"),
       ("--warmup", "1.5", "--warmup 1.5"), ("--dtype", "float16", "--dtype"),
       ("--teacher-dtype", "int8", "--teacher-dtype"), ("--max-seq-len", "4", "--max-seq-len 4"),
       ("--model", "./nope", "--model ./nope: no such checkpoint folder"),
       ("--teacher", "./nope", "--teacher ./nope: no such checkpoint folder"),
       ("--device", "tpu", "--device 'tpu'")]


class TestBadInput:
    @pytest.mark.parametrize("flag, value, message", BAD)
    def test_one_line_before_anything_is_loaded(self, flag, value, message, task_data, tmp_path,
                                                monkeypatch, capsys):
        monkeypatch.setattr(finetune, "_load", _must_not_run)
        monkeypatch.setattr(BERT, "from_pretrained", _must_not_run)
        args = ["eval", "sst2", "--model", TINY, "--data-dir", str(task_data),
                "--results", str(tmp_path / "r.jsonl"), flag, value]
        with pytest.raises(SystemExit) as e:
            tinydistil.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1
        assert message in err
        assert not (tmp_path / "r.jsonl").exists()

    def test_default_student_missing_says_run_pretrain(self, tmp_path, monkeypatch, capsys):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit):
            tinydistil.main(["eval", "sst2"])
        err = capsys.readouterr().err
        assert "no student at out/student" in err and "tinydistil.py pretrain" in err
        assert "--model" in err and err.count("\n") == 1

    def test_missing_train_split_names_the_file(self, tmp_path):
        mnli = tmp_path / "glue" / "MNLI"
        mnli.mkdir(parents=True)
        for split in ("dev_matched", "dev_mismatched"):
            shutil.copy(TASK_FIX / "glue" / "MNLI" / f"{split}.tsv", mnli)
        with pytest.raises(UserError, match=str(mnli / "train.tsv") + " is missing"):
            run(EvalConfig(task="mnli", model=TINY, data_dir=str(tmp_path),
                           results=str(tmp_path / "r.jsonl")))


# ----------------------------------------------------------------------------- report

def _line(model, task, metrics, teacher=None, runs=None, **config):
    return {"task": task, "model": model, "teacher": teacher, "metrics": metrics,
            "runs": runs or [{"seed": 42, "metrics": metrics}], "seconds": 1.0, "config": config}


class TestReport:
    def test_distilled_rows_spread_and_off_protocol_marker(self, tmp_path):
        kd = {"model": "t", "alpha_kd": 0.5, "temperature": 2.0}
        runs = [{"seed": s, "metrics": {"accuracy": a}} for s, a in ((42, 0.8), (43, 0.83),
                                                                     (44, 0.81))]
        lines = [_line("m", "sst2", {"accuracy": 0.81}, runs=runs, epochs=1,
                       max_train_examples=8000),
                 _line("m", "sst2", {"accuracy": 0.84}, teacher=kd, epochs=3),
                 _line("m", "squad", {"exact_match": 0.5, "f1": 0.6}, epochs=2),
                 _line("m", "squad", {"exact_match": 0.55, "f1": 0.65}, teacher=kd, epochs=1),
                 _line("other", "squad", {"exact_match": 0.4, "f1": 0.5}, epochs=2)]
        path = tmp_path / "r.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        md = report.render(path)
        table1, table2 = md.split("## Table 2")
        assert "| m (ours) | - | - | - | - | - | - | - | 81.0 (80.0-83.0)† | - | - |" in table1
        assert "| m (D) (ours) | - | - | - | - | - | - | - | 84.0 | - | - |" in table1
        rows = [row for row in table2.splitlines() if "(ours)" in row]
        assert rows == ["| m (ours) | - | 50.0 | 60.0 |", "| m (D) (ours) | - | 55.0† | 65.0† |",
                        "| other (ours) | - | 40.0 | 50.0 |"]
        assert "| DistilBERT (D) (paper) | - | 79.1 | 86.9 |" in table2
        assert "median of several seeds" in md and "† trained on a subset" in md
        retention = report.render(path, teacher="m")
        assert "| m (D) / m, % (ours) | - | 110.0 | 108.3 |" in retention
