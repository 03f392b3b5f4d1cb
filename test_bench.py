"""Tests of bench.py (paper section 4.2, Table 3): offline, CPU, on the tiny fixture checkpoints.

    python -m pytest -q test_bench.py

Speed itself is never asserted (timings are machine-dependent); what is: the table and JSON are well
formed, the precision modes and the fused q/k/v rewrite compute what the float32 model computes, weights
that cannot be had fall back to random weights (and say so), and the SST-2 accuracy column is right.
"""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench
from model import BERT
from tasks.finetune import TaskModel

MODELS = Path(__file__).parent / "fixtures" / "models"
TINY = f"{MODELS / 'tiny-distilbert'},{MODELS / 'tiny-bert'}"
KEYS = {"model": str, "device": str, "dtype": str, "params_m": float, "seconds": float,
        "ms_per_example": float, "random_weights": bool}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network and an empty Hub cache and data directory, whatever the machine has."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TINYDISTIL_DATA", str(tmp_path / "data"))
    yield
    torch.set_num_threads(bench.ALL_THREADS)


def run_json(tmp_path, *args):
    out = tmp_path / "rows.json"
    bench.main([*args, "--json", str(out)])
    return json.loads(out.read_text())


def test_tiny_models_give_table_chart_and_json(tmp_path, capsys):
    rows = run_json(tmp_path, "--models", TINY, "--limit", "5", "--throughput")
    text = capsys.readouterr().out
    assert [(r["model"].rsplit("/", 1)[-1], r["dtype"]) for r in rows] == [
        (m, d) for m in ("tiny-distilbert", "tiny-bert") for d in ("float32", "bfloat16", "int8", "int8+cls")]
    for r in rows:
        assert set(r) == set(KEYS) and all(isinstance(r[k], t) for k, t in KEYS.items())
        assert r["device"] == "cpu" and r["seconds"] > 0 and not r["random_weights"]
        assert r["ms_per_example"] == pytest.approx(1000 * r["seconds"] / 5, rel=1e-3)
    tiny = BERT.from_pretrained(str(MODELS / "tiny-distilbert"))
    expected = sum(p.numel() for n, p in tiny.named_parameters() if not n.startswith("vocab_")) / 1e6
    assert rows[0]["params_m"] == pytest.approx(expected, abs=1e-3)  # the MLM head is not counted
    assert "STAND-IN" in text and "5 pairs" in text  # offline, no STS-B: the shipped pairs, said so
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| Model | # param. (M) | Inf. time (s) | ms / example | speed-up vs BERT-base |"
    assert len(table) == 2 + 3 + 8 and all(line.count("|") == 6 for line in table)
    assert "| BERT-base (paper) | 110 | 668 |" in text and "| DistilBERT (paper) | 66 | 410 |" in text
    assert sum("█" in line and line.endswith("ms") for line in text.splitlines()) == 8
    assert "batch 32" in text  # the throughput lines


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
def test_fast_modes_stay_close_to_float32(name):
    model = BERT.from_pretrained(str(MODELS / name))
    x = torch.randint(5, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1, 30:] = 0  # padding, so the masked attention path is exercised too
    keep = mask.bool()
    with torch.inference_mode():
        ref = model(x, mask, logits=False)
        last = ref.hidden_states[-1]
        for mode in ("float32", "bfloat16", "int8"):
            out = bench.prepare(model, mode, "cpu")(x, mask, logits=False)
            got = out.hidden_states[-1].float()
            if mode == "float32":  # fused q/k/v is the same computation
                assert (got - last)[keep].abs().max() < 1e-5
            else:  # a cosine of 0.99 per token: the rounding of 8-bit / bf16 weights, no more
                assert F.cosine_similarity(got[keep], last[keep], dim=-1).min() > 0.99, mode
            if out.pooler_output is not None:
                assert F.cosine_similarity(out.pooler_output.float(), ref.pooler_output).min() > 0.99, mode
        cls = bench.prepare(model, "float32+cls", "cpu")(x, mask, logits=False)
        assert cls.hidden_states[-1].shape == (2, 1, model.config.hidden_size)  # only [CLS] is computed
        assert (cls.hidden_states[-1][:, 0] - last[:, 0]).abs().max() < 1e-5
        assert all(torch.equal(a, b) for a, b in zip(cls.hidden_states[:-1], ref.hidden_states[:-1]))
        if ref.pooler_output is not None:
            assert (cls.pooler_output - ref.pooler_output).abs().max() < 1e-5


def test_int8_rewrites_every_linear_and_leaves_the_source_model_alone():
    model, random_weights, _ = bench.load_model(str(MODELS / "tiny-distilbert"))  # without the MLM head
    assert not random_weights
    before = copy.deepcopy(model.state_dict())
    q = bench.prepare(model, "int8+cls", "cpu")
    kinds = [type(m).__name__ for m in q.modules()]
    assert kinds.count("FusedQKVAttention") == model.config.n_layer and kinds.count("CLSOnlyBlock") == 1
    assert "Linear" not in kinds and kinds.count("Int8Linear") == 4 * model.config.n_layer + 1  # + the [CLS] query
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


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
    from tasks import glue
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
def test_bad_input_is_one_error_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--limit", "1", *args])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and message in err and "Traceback" not in err
