"""test_tasks.py: tests of tasks/ (metrics, GLUE/IMDb/SQuAD loaders, SQuAD windows and decoding, report).

    python -m pytest -q test_tasks.py

Offline and fast: loaders read the small real-format files in fixtures/tasks/ (see its README), downloads go
to a local HTTP server on 127.0.0.1. Paper: section 4 and 4.1 (Tables 1 and 2).
"""

import functools
import http.server
import json
import math
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

import data
from hub import UserError
from tasks import glue, imdb, report, squad
from tasks.metrics import (accuracy, f1, glue_score, matthews_corrcoef, normalize_answer, pearson, spearman,
                           squad_em, squad_f1, task_score)

FIX = Path(__file__).parent / "fixtures" / "tasks"
TOKENIZER = Path(__file__).parent / "fixtures" / "models" / "tokenizer"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test is offline unless it serves files itself; a stray download fails loudly."""
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    monkeypatch.delenv("TINYDISTIL_DATA", raising=False)


# ----------------------------------------------------------------------------- metrics

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


def test_matthews_against_the_formula():
    tp, tn, fp, fn = 6, 3, 2, 1
    labels = [1] * tp + [0] * tn + [0] * fp + [1] * fn
    preds = [1] * tp + [0] * tn + [1] * fp + [0] * fn
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(preds, labels) == pytest.approx(expected)
    assert matthews_corrcoef(np.array(preds), np.array(labels)) == pytest.approx(expected)
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - y for y in labels], labels) == pytest.approx(-1.0)


def test_matthews_edge_cases():
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictions
    assert matthews_corrcoef([0, 0, 0], [0, 0, 0]) == 0.0  # a single class everywhere
    assert matthews_corrcoef([0, 1, 0], [1, 1, 1]) == 0.0  # single true class


def test_pearson_worked_example():
    # dx = -2..2, dy = -2,0,1,0,1: sum dx*dy = 6, sum dx^2 = 10, sum dy^2 = 6
    assert pearson([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]) == pytest.approx(6 / math.sqrt(60))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([2, 2, 2], [1, 2, 3]) == 0.0  # constant side: 0, not nan


def test_spearman_averages_tied_ranks():
    # ranks x = 1, 2.5, 2.5, 4; ranks y = 1, 3, 2, 4: covariance 4.5, variances 4.5 and 5
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(np.array([0.5, 0.5, 0.5]), np.array([1.0, 2.0, 3.0])) == 0.0


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


# ----------------------------------------------------------------------------- GLUE loaders

def _rows(path):
    return [line for line in path.read_text(encoding="utf-8-sig").split("\n") if line]


@pytest.mark.parametrize("task", list(glue.TASKS))
def test_every_split_of_every_task_loads(task):
    t = glue.TASKS[task]
    for split in ("train",) + t.dev_splits:
        examples = glue.load(task, split, FIX)
        malformed = 2 if (task, split) == ("qqp", "train") else 0
        assert len(examples) == len(_rows(FIX / "glue" / t.dir / f"{split}.tsv")) - t.header - malformed
        for ex in examples:
            assert ex.text_a and (ex.text_b is None) == (t.text_b is None)
            assert isinstance(ex.label, float) if t.labels is None else ex.label in range(t.num_labels)


def test_cola_has_no_header_and_no_final_newline():
    dev = glue.load("cola", "dev", FIX)
    assert dev[0] == glue.Example("The sailors rode the breeze clear of the rocks.", None, 1)
    assert dev[-1].text_a == "John talked to Bill about himself."  # the last line, without "\n"
    train = glue.load("cola", "train", FIX)
    assert glue.Example('Susan whispered "Shut up".', None, 1) in train
    assert [ex.label for ex in train][:4] == [1, 1, 1, 1]


def test_mrpc_header_with_byte_order_mark_and_quotes():
    train = glue.load("mrpc", "train", FIX)
    assert train[0].text_a.startswith("Amrozi accused his brother , whom he called \" the witness \"")
    assert train[0].label == 1
    assert train[-1].text_b.startswith('" Saddam \'s daughters')  # a field starting with a quote stays whole
    assert [ex.label for ex in glue.load("mrpc", "dev", FIX)] == [1, 0]


def test_stsb_scores_are_floats():
    dev = glue.load("stsb", "dev", FIX)
    assert [ex.label for ex in dev] == [5.0, 4.75, 5.0, 2.4]
    assert dev[0] == glue.Example("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert glue.load("stsb", "train", FIX)[-1].text_a == 'A dog in a "superman" shirt sleeps on a blanket.'


def test_mnli_labels_and_both_dev_layouts():
    assert glue.TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    matched = glue.load("mnli", "dev_matched", FIX)
    assert matched[0] == glue.Example("The new rights are nice enough", "Everyone really likes the newest benefits ", 1)
    assert [ex.label for ex in matched] == [1, 2, 0, 2]
    mismatched = glue.load("mnli", "dev_mismatched", FIX)
    assert len(mismatched) == 4 and all(ex.text_b for ex in mismatched)
    assert [ex.label for ex in glue.load("mnli", "train", FIX)] == [1, 0, 2]
    with pytest.raises(UserError, match="dev_matched"):
        glue.load("mnli", "dev", FIX)


def test_qqp_skips_malformed_rows_and_nli_labels_map_to_ids():
    train = glue.load("qqp", "train", FIX)
    assert [ex.label for ex in train] == [0, 1, 0]
    assert all("Kohinoor" not in ex.text_a for ex in train)
    assert glue.load("rte", "dev", FIX)[0].label == 1  # not_entailment
    assert glue.load("qnli", "dev", FIX)[0].label == 0  # entailment


def test_bad_glue_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown GLUE task"):
        glue.load("squad", "train", FIX)
    rte = tmp_path / "glue" / "RTE"
    rte.mkdir(parents=True)
    (rte / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(UserError, match=r"train.tsv:3 has 3 fields"):
        glue.load("rte", "train", tmp_path)
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(UserError, match="'maybe'"):
        glue.load("rte", "dev", tmp_path)


def test_compute_metrics_keys_feed_the_glue_score():
    mrpc = glue.compute_metrics("mrpc", [1, 0, 1], [1, 1, 1])
    assert mrpc == {"accuracy": pytest.approx(2 / 3), "f1": pytest.approx(0.8)}
    mnli = {**glue.compute_metrics("mnli", [0, 1], [0, 1], "dev_matched"),
            **glue.compute_metrics("mnli", [0, 1], [0, 0], "dev_mismatched")}
    assert mnli == {"accuracy_m": 1.0, "accuracy_mm": 0.5}
    assert task_score("mnli", mnli) == 0.75
    assert set(glue.compute_metrics("stsb", [0.1, 0.5, 0.3], [1.0, 4.0, 2.0])) == {"pearson", "spearman"}


# ----------------------------------------------------------------------------- downloads

@pytest.fixture
def server(tmp_path):
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


def test_glue_zip_and_mrpc_are_downloaded_then_used_offline(server, tmp_path, monkeypatch):
    url, www = server
    with zipfile.ZipFile(www / "CoLA.zip", "w") as z:  # the official zip's layout: CoLA/{train,dev}.tsv
        for name in ("train.tsv", "dev.tsv"):
            z.write(FIX / "glue" / "CoLA" / name, f"CoLA/{name}")
    shutil.copy(FIX / "mrpc_source" / "msr_paraphrase_train.txt", www)
    shutil.copy(FIX / "mrpc_source" / "mrpc_dev_ids.tsv", www)
    monkeypatch.setattr(glue, "GLUE_URL", url)
    monkeypatch.setattr(glue, "SENTEVAL_URL", url)
    monkeypatch.delenv("TINYDISTIL_OFFLINE")
    root = tmp_path / "data"
    assert glue.load("cola", "dev", root) == glue.load("cola", "dev", FIX)
    assert sorted(p.name for p in (root / "glue").iterdir()) == ["CoLA"]  # zip deleted, no temp left
    glue.load("mrpc", "dev", root)
    for split in ("train", "dev"):  # rebuilt exactly as download_glue_data.py does, BOM header included
        built, expected = root / "glue" / "MRPC" / f"{split}.tsv", FIX / "glue" / "MRPC" / f"{split}.tsv"
        assert built.read_bytes() == expected.read_bytes()
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    assert len(glue.load("cola", "train", root)) == 6 and len(glue.load("mrpc", "train", root)) == 6


def test_corrupt_zip_is_deleted_with_a_user_error(server, tmp_path, monkeypatch):
    url, www = server
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
def test_offline_and_missing_names_the_url_and_the_path(tmp_path, load, url):
    with pytest.raises(UserError) as e:
        load(tmp_path)
    assert url in str(e.value) and str(tmp_path) in str(e.value)


# ----------------------------------------------------------------------------- IMDb

def test_imdb_reads_the_archive_in_a_fixed_order():
    train = imdb.load("train", FIX)
    assert [ex.label for ex in train] == [0, 0, 0, 1, 1, 1]  # neg then pos
    assert train[0].text_a.startswith("Nine minutes of psychedelic")  # neg/17 before neg/34 before neg/56
    assert train[3].text_a.startswith("I'm a male")  # pos/10 before pos/11: numeric, not member order
    assert any("<br />" in ex.text_a for ex in train) and any(not ex.text_a.isascii() for ex in train)
    assert all("unlabelled" not in ex.text_a for ex in train)  # train/unsup skipped
    test = imdb.load("test", FIX)
    assert [ex.label for ex in test] == [0, 0, 1, 1] and all(ex.text_b is None for ex in test)


def test_damaged_imdb_archive_is_a_user_error(tmp_path):
    (tmp_path / "imdb").mkdir()
    whole = (FIX / "imdb" / "aclImdb_v1.tar.gz").read_bytes()
    (tmp_path / "imdb" / "aclImdb_v1.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="damaged"):
        imdb.load("train", tmp_path)
    with pytest.raises(UserError, match="train or test"):
        imdb.load("unsup", FIX)


# ----------------------------------------------------------------------------- SQuAD

@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def examples():
    return squad.load("dev", FIX)


def test_squad_load(examples):
    assert len(examples) == 60
    ex = examples[0]
    assert ex["question"] == "Which NFL team represented the AFC at Super Bowl 50?"
    assert [a["text"] for a in ex["answers"]] == ["Denver Broncos"] * 3
    for ex in examples:
        for a in ex["answers"]:
            assert ex["context"][a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]


def test_squad_windows(examples, tok):
    tok.enable_truncation(32)  # a tokenizer left truncating (as data.encode_batch does) must not cut contexts
    feats = squad.features(examples, tok, max_len=96, stride=16)
    by_example = {}
    for f in feats:
        by_example.setdefault(f["example_index"], []).append(f)
        n = len(f["input_ids"])
        assert n <= 96 and len(f["token_type_ids"]) == len(f["offsets"]) == n
        assert f["input_ids"][0] == tok.token_to_id("[CLS]") and f["input_ids"][-1] == tok.token_to_id("[SEP]")
        ctx = [k for k, o in enumerate(f["offsets"]) if o is not None]
        assert all(f["token_type_ids"][k] == 1 for k in ctx) and ctx == list(range(ctx[0], n - 1))
    for i, windows in by_example.items():
        context = examples[i]["context"]
        firsts = [w["offsets"][w["token_type_ids"].index(1)][0] for w in windows]
        assert firsts[0] == 0 and firsts == sorted(firsts)
        assert windows[-1]["offsets"][-2][1] == len(context.rstrip())  # the windows reach the end
        whole = tok.encode(context, add_special_tokens=False).offsets
        starts = [whole.index(w["offsets"][w["token_type_ids"].index(1)]) for w in windows]
        assert all(b - a == 16 for a, b in zip(starts, starts[1:]))  # doc stride: 16 tokens between starts
    assert max(len(w) for w in by_example.values()) > 5


def test_squad_round_trip_answer_to_tokens_to_text(examples, tok):
    feats = squad.features(examples, tok)  # 384 tokens, stride 128
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


def test_squad_postprocess_recovers_labelled_spans(examples, tok):
    feats = squad.features(examples, tok, max_len=96, stride=16)
    preds = squad.postprocess(examples, feats, *_one_hot_logits(feats), max_answer_len=64)
    assert set(preds) == {ex["id"] for ex in examples}
    scores = squad.evaluate(examples, preds)
    assert scores == {"exact_match": pytest.approx(58 / 60), "f1": pytest.approx(58 / 60)}  # "18" for "8": F1 0 too


def test_squad_postprocess_rules():
    context = "Denver beat Carolina in Santa Clara"
    ex = [{"id": "q", "question": "who?", "context": context, "answers": [{"text": "Denver", "answer_start": 0}]}]
    words = [(0, 6), (7, 11), (12, 20), (21, 23), (24, 29), (30, 35)]
    feat = {"example_index": 0, "offsets": [None, None, None] + words + [None]}  # [CLS] who ? [SEP] ... [SEP]
    start = np.array([9, 0, 0, 1, 0, 3, 0, 2, 0, 9.0])  # best start is [CLS] / [SEP]: not context
    end = np.array([9, 0, 0, 0, 0, 4, 0, 0, 2, 9.0])
    assert squad.postprocess(ex, [feat], [start], [end]) == {"q": "Carolina"}  # 3+4 beats 1+4, 2+2
    end[3] = 8  # Denver..Denver now the best
    assert squad.postprocess(ex, [feat], [start], [end]) == {"q": "Denver"}
    start[7], end[5] = 20, 0  # start after every good end: only spans with end >= start count
    assert squad.postprocess(ex, [feat], [start], [end]) == {"q": "Santa Clara"}
    assert squad.postprocess(ex, [feat], [start], [end], max_answer_len=1) == {"q": "Santa"}
    assert squad.evaluate(ex, {}) == {"exact_match": 0.0, "f1": 0.0}


# ----------------------------------------------------------------------------- report

def _write_results(path, lines):
    path.write_text("".join(json.dumps({"seconds": 1.0, "config": {}, **line}) + "\n" for line in lines))


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
