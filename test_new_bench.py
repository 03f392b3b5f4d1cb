"""test_new_bench.py: new tests of bench.py (paper section 4.2, Table 3), for test_all.py.

    python -m pytest -q test_new_bench.py

Offline and CPU only: the tiny checkpoints under fixtures/models, the stand-in pairs of
fixtures/bench. Speed itself is never asserted; what is: the --help text, what the speed-up column
is relative to, and one-line errors for bad options before anything is loaded or written.
"""
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import bench
from common import field_comments

ROOT = Path(__file__).parent
MODELS = ROOT / "fixtures" / "models"
TINY_DISTILBERT, TINY_BERT = str(MODELS / "tiny-distilbert"), str(MODELS / "tiny-bert")


@pytest.fixture
def bench_offline(monkeypatch, tmp_path):
    """No network, an empty Hub cache and data directory; bench sets the thread count, so the
    test's own count is put back afterwards."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TINYDISTIL_DATA", str(tmp_path / "data"))
    yield
    torch.set_num_threads(threads)


def run_bench(tmp_path, capsys, *args):
    """(rows from --json, the table's lines) of one bench.main run."""
    out = tmp_path / "rows.json"
    bench.main([*args, "--json", str(out)])
    text = capsys.readouterr().out
    return json.loads(out.read_text()), [line for line in text.splitlines() if line.startswith("|")]


def cells(line: str) -> list:
    """The cells of one markdown table row."""
    return [c.strip() for c in line.strip("|").split("|")]


class TestBenchHelp:
    def test_help_lists_every_option_with_its_description_and_default(self, capsys, monkeypatch):
        monkeypatch.setenv("COLUMNS", "1000")  # argparse then writes each option on one line
        with pytest.raises(SystemExit) as e:
            bench.main(["--help"])
        assert e.value.code == 0
        options = {}  # "--flag": its help, which a long flag starts on the next line
        help_lines = capsys.readouterr().out.split("options:")[1].strip().splitlines()
        for line in help_lines:
            if re.match(r" {0,2}-", line):  # an option: its help below is indented 24
                flag = line.split()[0].rstrip(",")
            options[flag] = " ".join([options.get(flag, ""), line.strip()])
        comments = field_comments(bench.BenchConfig)
        for f in fields(bench.BenchConfig):
            text = " ".join(options["--" + f.name.replace("_", "-")].split())
            assert comments[f.name] and text.endswith(f"{comments[f.name]} (default: {f.default})")
        assert options["--device"].endswith("(default: auto)")
        assert "--no-throughput" in options["--throughput"]


@pytest.mark.usefixtures("bench_offline")
class TestBenchSpeedupColumn:
    def test_without_bert_base_it_is_relative_to_the_first_model(self, tmp_path, capsys):
        rows, table = run_bench(tmp_path, capsys, "--models", f"{TINY_DISTILBERT},{TINY_BERT}",
                                "--limit", "3", "--dtypes", "float32,int8")
        assert cells(table[0])[-1] == "speed-up vs models/tiny-distilbert"
        paper = [cells(line) for line in table[2:5]]
        assert [c[0] for c in paper] == ["ELMo (paper)", "BERT-base (paper)", "DistilBERT (paper)"]
        assert all(c[-1] == "-" for c in paper)  # the paper's are over its BERT-base: not shown
        ours = {(r["model"], r["dtype"]): r["seconds"] for r in rows}
        first = ours[TINY_DISTILBERT, "float32"]
        for line in table[5:]:
            name, speedup = cells(line)[0], cells(line)[-1]
            model, _, dtype = name.split(" ")
            assert speedup == f"{first / ours[model, dtype]:.2f}x", name
        assert cells(table[5])[-1] == "1.00x"

    def test_header_names_the_full_model_the_speed_ups_are_over(self, tmp_path, capsys):
        bench.main(["--models", f"{TINY_BERT},{TINY_DISTILBERT}", "--limit", "2",
                    "--dtypes", "float32"])
        text = capsys.readouterr().out
        assert f"speed-up vs {TINY_BERT} float32" in text
        table = [line for line in text.splitlines() if line.startswith("|")]
        assert cells(table[0])[-1] == "speed-up vs models/tiny-bert"
        assert cells(table[5])[-1] == "1.00x"

    @pytest.mark.slow  # builds a random BERT-base (110M parameters)
    def test_with_bert_base_it_is_relative_to_bert_base_wherever_it_is(self, tmp_path, capsys):
        # BERT-base second: the base is the model of BERT-base's shape, not the first one. Offline,
        # the preset is built with random weights; one pair keeps its pass short.
        models = f"{TINY_DISTILBERT},bert-base-uncased"
        rows, table = run_bench(tmp_path, capsys, "--models", models, "--limit", "1",
                                "--dtypes", "float32")
        assert cells(table[0])[-1] == "speed-up vs BERT-base"
        assert [cells(line)[-1] for line in table[2:5]] == ["0.75x", "1.00x", "1.63x"]  # 668 / s
        seconds = {r["model"]: r["seconds"] for r in rows}
        tiny_row, base_row = (cells(line) for line in table[5:])
        assert base_row[0].startswith("bert-base-uncased cpu float32") and base_row[-1] == "1.00x"
        assert tiny_row[-1] == f"{seconds['bert-base-uncased'] / seconds[TINY_DISTILBERT]:.2f}x"

    def test_the_column_names_the_first_model_by_the_end_of_its_path(self):
        tiny = bench.BERT(bench.BertConfig(hidden_size=8, n_layer=1, n_head=2, intermediate_size=8,
                                           vocab_size=10, max_position_embeddings=8))
        for name, label in [("/data/runs/7/student", "7/student"), ("org/model", "org/model"),
                            ("distilbert-base-uncased", "distilbert-base-uncased")]:
            first = bench.Candidate(name, tiny, False, None, [])
            assert bench.speedup_base([first, first]) == (name, label)

    def test_bert_base_is_recognised_by_its_shape(self):
        base = bench.BertConfig.preset("bert-base-uncased")
        assert bench.is_bert_base(base)
        assert bench.is_bert_base(bench.BertConfig(vocab_size=28996))  # bert-base-cased
        assert not bench.is_bert_base(bench.BertConfig.preset("distilbert-base-uncased"))
        assert not bench.is_bert_base(bench.BertConfig(n_layer=6))


@pytest.mark.usefixtures("bench_offline")
class TestBenchBadOptions:
    @pytest.mark.parametrize("args, message", [
        (["--device", "tpu"], "--device 'tpu'"),
        (["--device", "cpu", "--dtypes", "float16"], "none of them runs on cpu"),
        (["--threads", "0"], "--threads 0"),
        (["--limit", "-2"], "--limit -2"),
        (["--tokenizer", "no/such/folder"], "--tokenizer no/such/folder"),
        (["--task", "sst2", "--models", TINY_BERT], "SST-2"),  # no SST-2 dev: stops before timing
        (["--models", f"{TINY_BERT},./no/such/folder"], "no checkpoint folder ./no/such/folder"),
    ])
    def test_one_line_before_anything_is_loaded(self, args, message, tmp_path, capsys):
        out = tmp_path / "rows.json"
        with pytest.raises(SystemExit) as e:
            bench.main([*args, "--json", str(out)])
        captured = capsys.readouterr()
        err = captured.err
        assert e.value.code == 1 and re.fullmatch(r"error: [^\n]+\n", err) and message in err, err
        assert captured.out == "" and not out.exists()  # stopped before the pairs and models

    def test_json_into_a_missing_folder_is_refused_first(self, tmp_path, capsys):
        with pytest.raises(SystemExit):
            bench.main(["--models", TINY_BERT, "--json", str(tmp_path / "nope" / "rows.json")])
        captured = capsys.readouterr()
        assert "--json" in captured.err and captured.out == ""  # nothing was loaded
