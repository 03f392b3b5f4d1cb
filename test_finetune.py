"""Tests for tasks/finetune.py: tiny end-to-end fine-tuning runs on generated task files in the real
layouts, the reference head layout of TaskModel checkpoints, and the errors. Offline, CPU, seconds.

    python -m pytest -q test_finetune.py
"""
import json
import random
from pathlib import Path

import pytest
import torch

from hub import UserError
from model import BERT, BertConfig, load_safetensors
import tinydistil
from tasks import finetune, metrics, report
from tasks.finetune import EvalConfig, TaskModel, run

MODELS = Path(__file__).parent / "fixtures" / "models"
TASK_FILES = Path(__file__).parent / "fixtures" / "tasks"  # a few real rows of each dataset (test_tasks.py)
WORDS = ("the of and in to was he is as for on with that it his by at from her she you had an were but be "
         "this are not my they one which or have him me first all also their has up who out been when").split()
KEYS = {"task", "model", "metrics", "seconds", "config"}


def sentence(r, good):
    """A few random words; "good" somewhere in it exactly when good: a rule the tiny models can learn."""
    words = [r.choice(WORDS) for _ in range(r.randint(4, 9))]
    if good:
        words.insert(r.randrange(len(words) + 1), "good")
    return " ".join(words)


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, row)) + "\n" for row in rows), encoding="utf-8")


def make_data(root):
    """SST-2, RTE, STS-B and MNLI tsv files (header names as in GLUE) and SQuAD json under root. In the
    pair tasks only the second sentence decides the label, so they test that pairs reach the model."""
    r = random.Random(0)
    for split, n in (("train", 256), ("dev", 64)):
        write(root / "glue/SST-2" / f"{split}.tsv",
              [("sentence", "label")] + [(sentence(r, i % 2), i % 2) for i in range(n)])
        write(root / "glue/RTE" / f"{split}.tsv", [("index", "sentence1", "sentence2", "label")] +
              [(i, sentence(r, False), sentence(r, i % 2), ("not_entailment", "entailment")[i % 2])
               for i in range(n)])
        write(root / "glue/STS-B" / f"{split}.tsv",
              [("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                "sentence2", "score")] +
              [(i, "main-captions", "MSRvid", "2012test", i, "none", "none", sentence(r, False),
                sentence(r, i % 2), f"{1 + 3 * (i % 2) + r.random() / 2:.3f}") for i in range(n)])
    nli = ("entailment", "neutral", "contradiction")
    for split in ("train", "dev_matched", "dev_mismatched"):
        write(root / "glue/MNLI" / f"{split}.tsv", [("index", "sentence1", "sentence2", "gold_label")] +
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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """32-wide models gain nothing from threads, and on a busy machine a second one only waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def run_tiny(data_dir, tmp_path, task, model="tiny-distilbert", **kw):
    cfg = EvalConfig(task=task, model=str(MODELS / model), data_dir=str(data_dir), batch_size=16,
                     results=str(tmp_path / "results.jsonl"), **kw)
    return run(cfg)


@pytest.mark.parametrize("model", ["tiny-distilbert", "tiny-bert-legacy"])
def test_pairs_reach_the_model(model, data_dir, tmp_path):
    assert run_tiny(data_dir, tmp_path, "rte", model, epochs=8, lr=3e-3)["metrics"]["accuracy"] >= 0.95


@pytest.mark.parametrize("model", ["tiny-distilbert", "tiny-bert-legacy"])
def test_fine_tuning_learns_a_simple_rule(model, data_dir, tmp_path, capsys):
    before = run_tiny(data_dir, tmp_path, "sst2", model, epochs=0)
    after = run_tiny(data_dir, tmp_path, "sst2", model, epochs=8, lr=3e-3)
    assert before["metrics"]["accuracy"] < 0.75
    assert after["metrics"]["accuracy"] >= 0.95
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert lines == [before, after]
    assert set(after) == KEYS and after["task"] == "sst2" and after["model"] == str(MODELS / model)
    # Defaults are resolved in the recorded config; 128 tokens is capped at the tiny model's 64 positions.
    assert after["config"]["max_seq_len"] == 64 and after["config"]["epochs"] == 8
    assert before["config"]["lr"] == finetune.DEFAULTS["sst2"][0] and after["config"]["device"] == "cpu"
    assert after["seconds"] >= 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == after


def test_stsb_regression_and_saved_checkpoint(data_dir, tmp_path):
    line = run_tiny(data_dir, tmp_path, "stsb", epochs=8, lr=3e-3, out=str(tmp_path / "m"))
    # Scores are 1 or 4 by the rule, plus noise no model can predict: Spearman stays well below 1.
    assert line["metrics"]["pearson"] >= 0.9 and 0.5 <= line["metrics"]["spearman"] <= 1
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["DistilBertForSequenceClassification"]
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    model = TaskModel.from_pretrained(str(tmp_path / "m"))
    assert model.labels is None and model(torch.tensor([[2, 50, 3]])).shape == (1, 1)


def test_mnli_reports_matched_and_mismatched(data_dir, tmp_path):
    line = run_tiny(data_dir, tmp_path, "mnli", epochs=1, max_eval_examples=10, dtype="bfloat16")
    assert set(line["metrics"]) == {"accuracy_m", "accuracy_mm"}
    assert 0 <= metrics.task_score("mnli", line["metrics"]) <= 1


@pytest.mark.parametrize("model", ["tiny-distilbert", "tiny-bert-legacy"])
def test_squad_runs_and_scores(model, data_dir, tmp_path):
    line = run_tiny(data_dir, tmp_path, "squad", model, epochs=2, lr=1e-3, out=str(tmp_path / "qa"))
    assert set(line["metrics"]) == {"exact_match", "f1"}
    assert all(0 <= v <= 1 for v in line["metrics"].values())
    assert line["config"]["max_seq_len"] == 64
    prefix = "bert." if model == "tiny-bert-legacy" else "distilbert."
    keys = set(load_safetensors(tmp_path / "qa" / "model.safetensors"))
    assert {"qa_outputs.weight", "qa_outputs.bias"} <= keys and all(
        k.startswith(prefix) or k.startswith("qa_outputs.") for k in keys)
    assert not any("pooler" in k for k in keys)  # BertForQuestionAnswering has none


def test_glue_runs_all_nine_tasks_on_real_rows(tmp_path):
    lines = run(EvalConfig(task="glue", model=str(MODELS / "tiny-distilbert"), data_dir=str(TASK_FILES),
                           epochs=1, results=str(tmp_path / "results.jsonl")))
    assert list(lines) == list(metrics.GLUE_TASKS)
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [w["task"] for w in written] == list(metrics.GLUE_TASKS) and all(set(w) == KEYS for w in written)
    results = report.latest(tmp_path / "results.jsonl")[str(MODELS / "tiny-distilbert")]
    assert set(results["cola"]) == {"mcc"} and set(results["qqp"]) == {"accuracy", "f1"}
    assert -1 <= metrics.glue_score(results) <= 1
    assert "| " + str(MODELS / "tiny-distilbert") + " (ours) |" in report.render(tmp_path / "results.jsonl")


def test_cli_eval(data_dir, tmp_path, capsys):
    tinydistil.main(["eval", "sst2", "--model", str(MODELS / "tiny-bert-legacy"), "--data-dir", str(data_dir),
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


def test_errors(data_dir, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown task 'sst3'.*sst2.*squad"):
        run_tiny(data_dir, tmp_path, "sst3")
    with pytest.raises(UserError, match="--device 'cuda:7'"):
        run_tiny(data_dir, tmp_path, "sst2", device="cuda:7")
    with pytest.raises(UserError, match="must be positive"):
        run_tiny(data_dir, tmp_path, "sst2", max_eval_examples=0)
    with pytest.raises(UserError, match="--max-seq-len 512"):
        run_tiny(data_dir, tmp_path, "sst2", max_seq_len=512)
    with pytest.raises(UserError, match="not a fine-tuned task model"):
        TaskModel.from_pretrained(str(MODELS / "tiny-distilbert"))
    with pytest.raises(UserError, match="no tokenizer"):
        tiny = BertConfig("distilbert", 600, 32, 1, 4, 48, 64, 0, pooler=False)
        finetune.tokenizer_for(TaskModel(BERT(tiny), ("0", "1")))
    # glue checks all nine datasets before training: offline, the first missing one stops the run.
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    with pytest.raises(UserError, match="CoLA.zip"):
        run_tiny(tmp_path / "empty", tmp_path, "glue")
    assert not (tmp_path / "results.jsonl").exists()
