"""test_new_data.py: data.py's corpora at scale (issue 10) and its offline hints (issue 13).

    python -m pytest -q test_new_data.py

Streaming preparation equal to build_sequences, uint32 token files, a cache that cannot lie
(truncated files, exceptions and SIGKILL mid-way), .jsonl and folder corpora, bad input, the
WikiText-103 download against a real HTTP server on 127.0.0.1, the offline hints. Paper: section 3,
the distillation data. The lead merges these classes into test_all.py.
"""
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from common import UserError
from data import (Sequences, build_sequences, corpus_texts, load_corpus, load_tokenizer,
                  special_ids, token_probs)

ROOT = Path(__file__).parent
DATA_FIX = ROOT / "fixtures" / "data"
# Words of the fixture vocabulary: texts made of them tokenise without [UNK].
WORDS = ("the tiny railway is a narrow gauge line built in days from to it runs for miles along "
         "valley and carries about passengers year was closed but reopened by volunteers who "
         "restored old station engine shed").split()


def fixture_tok():
    return load_tokenizer(DATA_FIX / "tok_json")


def made_up_texts(n, seed=0):
    """n texts of 1 to 300 fixture words: short ones (dropped), and long ones cut into chunks."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 300)))) for _ in range(n)]


def todays_ids(tok, texts, seq_len=128):
    """The flat ids of the sequences as before streaming: every text at once, build_sequences."""
    lists = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    return np.concatenate(build_sequences(lists, special_ids(tok), seq_len)[0])


def prepared(root):
    """The finished prepared folders under root/cache (not temporary or old ones)."""
    return sorted(p for p in (root / "cache").glob("*") if p.is_dir() and not temporary(p))


def temporary(path):
    return path.name.endswith((".tmp", ".old"))


def leftovers(root):
    """What preparations left beside the finished folders: temporary and old folders."""
    return sorted(p.name for p in (root / "cache").glob("*") if temporary(p))


class TestStreamingPreparation:
    def test_equals_build_sequences_over_many_chunks(self, tmp_path, monkeypatch):
        tok = fixture_tok()
        texts = made_up_texts(300)
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n\n".join(texts) + "\n")
        monkeypatch.setattr(data, "CHUNK_CHARS", 2000)  # dozens of chunks, not one
        seqs = load_corpus(str(corpus), tok, tmp_path / "d", data_fraction=1.0, seq_len=64)
        # "today's" sequences: every text at once through build_sequences
        lists = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        today, stats = build_sequences(lists, special_ids(tok), seq_len=64)
        assert seqs.stats == stats and stats["dropped_short"] > 0 and stats["chunks"] > 300
        assert len(seqs) == len(today)
        assert all(seqs[i].tolist() == today[i] for i in range(len(today)))
        assert np.array_equal(seqs.ids, np.concatenate(today))
        assert isinstance(seqs.ids, np.memmap) and not seqs.ids.flags.writeable
        assert seqs.ids.dtype == np.uint16

    def test_fraction_keeps_the_first_texts(self, tmp_path):
        tok = fixture_tok()
        texts = made_up_texts(50, seed=1)
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n".join(texts) + "\n")
        seqs = load_corpus(str(corpus), tok, tmp_path, data_fraction=0.3, seq_len=128)
        lists = [e.ids for e in tok.encode_batch(texts[:15], add_special_tokens=False)]
        today, stats = build_sequences(lists, special_ids(tok), seq_len=128)
        assert seqs.stats == stats and stats["texts"] == 15
        assert np.array_equal(seqs.ids, np.concatenate(today))

    def test_a_second_load_only_maps_the_files(self, tmp_path, monkeypatch):
        tok = fixture_tok()
        (tmp_path / "c.txt").write_text("\n".join(made_up_texts(20)) + "\n")
        first = load_corpus(str(tmp_path / "c.txt"), tok, tmp_path, data_fraction=1.0)
        monkeypatch.setattr(data, "prepare_corpus", pytest.fail)  # what DDP ranks 1.. do
        again = load_corpus(str(tmp_path / "c.txt"), tok, tmp_path, data_fraction=1.0)
        assert isinstance(again.ids, np.memmap) and np.array_equal(again.ids, first.ids)
        assert np.array_equal(again.lengths, first.lengths) and again.stats == first.stats

    def test_a_changed_corpus_file_is_prepared_again(self, tmp_path):
        tok = fixture_tok()
        corpus = tmp_path / "c.txt"
        corpus.write_text("\n".join(made_up_texts(20)) + "\n")
        load_corpus(str(corpus), tok, tmp_path, data_fraction=1.0)
        corpus.write_text("\n".join(made_up_texts(21, seed=5)) + "\n")
        assert load_corpus(str(corpus), tok, tmp_path, data_fraction=1.0).stats["texts"] == 21
        assert len(prepared(tmp_path)) == 2

    def test_token_probs_counted_in_chunks(self, monkeypatch):
        ids = np.random.default_rng(0).integers(0, 50, size=10_000).astype(np.uint16)
        seqs = Sequences(ids, np.array([0, 4_000, 10_000]))
        whole = token_probs(seqs, 50, [0, 1])
        monkeypatch.setattr(data, "COUNT_CHUNK", 333)
        assert torch.equal(token_probs(seqs, 50, [0, 1]), whole)
        counts = np.bincount(ids, minlength=50)
        assert whole[7].item() == pytest.approx(counts[7] ** -0.7)
        with pytest.raises(UserError, match="token id 49 but the model's vocabulary has 40"):
            token_probs(seqs, 40, [0])


class TestTokenDtype:
    def test_dtype_from_the_vocabulary_size(self):
        assert data.token_dtype(30522) == np.uint16
        assert data.token_dtype(65536) == np.uint16  # ids 0..65535 all fit
        assert data.token_dtype(65537) == np.uint32
        assert data.token_dtype(250_002) == np.uint32

    def test_a_vocabulary_over_65536_ids_is_stored_as_uint32(self, tmp_path):
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        words = [f"w{i}" for i in range(70_000)]
        folder = tmp_path / "big-vocab"
        folder.mkdir()
        (folder / "vocab.txt").write_text("\n".join(specials + words) + "\n")
        tok = load_tokenizer(folder)
        assert tok.get_vocab_size() == 70_005
        high = " ".join(f"w{i}" for i in range(69_970, 70_000))  # ids 69,975 .. 70,004
        low = " ".join(f"w{i}" for i in range(30))
        (tmp_path / "c.txt").write_text(f"{high}\n{low}\n")
        seqs = load_corpus(str(tmp_path / "c.txt"), tok, tmp_path, data_fraction=1.0)
        assert seqs.ids.dtype == np.uint32
        assert seqs[0].tolist() == [2, *range(69_975, 70_005), 3]  # not wrapped past 65,535
        assert seqs[1].tolist() == [2, *range(5, 35), 3]
        probs = token_probs(seqs, 70_005, special_ids(tok).values())
        assert probs.shape == (70_005,) and probs[70_004].item() == 1.0
        meta = json.loads((prepared(tmp_path)[0] / "meta.json").read_text())
        assert meta["dtype"] == "uint32" and meta["tokens"] == 64


class TestCacheCannotLie:
    def corpus(self, tmp_path):
        (tmp_path / "c.txt").write_text("\n".join(made_up_texts(40)) + "\n")
        return str(tmp_path / "c.txt")

    @pytest.mark.parametrize("damage", ["truncate tokens", "truncate offsets", "grow tokens",
                                        "garbage meta", "no meta"])
    def test_a_damaged_file_is_rebuilt_not_trusted(self, tmp_path, damage, capsys):
        tok, corpus = fixture_tok(), self.corpus(tmp_path)
        good = np.array(load_corpus(corpus, tok, tmp_path, data_fraction=1.0).ids)
        folder = prepared(tmp_path)[0]
        name = {"truncate tokens": "tokens.bin", "truncate offsets": "offsets.bin",
                "grow tokens": "tokens.bin"}.get(damage, "meta.json")
        content = (folder / name).read_bytes()
        (folder / name).unlink()  # a new file: the arrays above still map the old one
        if damage.startswith("truncate"):
            (folder / name).write_bytes(content[:len(content) // 2])
        elif damage == "grow tokens":
            (folder / name).write_bytes(content + b"\0\0")
        elif damage == "garbage meta":
            (folder / name).write_bytes(b'{"version": 2, "tok')
        again = load_corpus(corpus, tok, tmp_path, data_fraction=1.0)
        assert np.array_equal(again.ids, good)
        assert prepared(tmp_path) == [folder] and leftovers(tmp_path) == []
        if damage != "no meta":
            assert "preparing it again" in capsys.readouterr().err

    def test_an_exception_mid_way_leaves_nothing(self, tmp_path, monkeypatch):
        tok, corpus = fixture_tok(), self.corpus(tmp_path)
        monkeypatch.setattr(data, "CHUNK_CHARS", 500)
        real, calls = data._encode_chunk, []

        def fail_on_third(*args):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt  # Ctrl-C half-way
            return real(*args)

        monkeypatch.setattr(data, "_encode_chunk", fail_on_third)
        with pytest.raises(KeyboardInterrupt):
            load_corpus(corpus, tok, tmp_path, data_fraction=1.0)
        assert prepared(tmp_path) == [] and leftovers(tmp_path) == []
        monkeypatch.undo()
        assert len(load_corpus(corpus, tok, tmp_path, data_fraction=1.0)) > 0

    @pytest.mark.slow
    @pytest.mark.parametrize("where", ["mid-way", "before the rename"])
    def test_sigkill_leaves_nothing_that_looks_finished(self, tmp_path, where):
        corpus = self.corpus(tmp_path)
        # A child prepares the corpus and is killed by SIGKILL while writing (after its second
        # chunk) or with every file written, meta.json included, just before the folder's rename.
        hook = {"mid-way": "data._encode_chunk = stop_after(data._encode_chunk, 2)",
                "before the rename": "data._publish = stop_after(data._publish, 0)"}[where]
        script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import data
def stop_after(fn, n):
    calls = []
    def wrapped(*args):
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        calls.append(1)
        return fn(*args)
    return wrapped
data.CHUNK_CHARS = 500
{hook}
tok = data.load_tokenizer({str(DATA_FIX / "tok_json")!r})
data.load_corpus({corpus!r}, tok, {str(tmp_path)!r}, data_fraction=1.0)
"""
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        tmp = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]
        assert prepared(tmp_path) == [] and len(tmp) == 1
        assert (tmp[0] / "tokens.bin").is_file()
        assert ((tmp[0] / "meta.json").is_file()) == (where == "before the rename")
        seqs = load_corpus(corpus, fixture_tok(), tmp_path, data_fraction=1.0)
        assert np.array_equal(seqs.ids, todays_ids(fixture_tok(), corpus_texts(corpus, tmp_path)))
        assert leftovers(tmp_path) == []  # the dead process's folder was swept

    def test_a_live_process_keeps_its_temporary_folder(self, tmp_path):
        tok, corpus = fixture_tok(), self.corpus(tmp_path)
        load_corpus(corpus, tok, tmp_path, data_fraction=1.0)
        folder = prepared(tmp_path)[0]
        live = folder.with_name(f"{folder.name}.{os.getpid()}.abcd1234.tmp")
        dead = folder.with_name(f"{folder.name}.{2 ** 22 + 12345}.abcd1234.tmp")  # above pid_max
        for p in (live, dead):
            p.mkdir()
        (folder / "meta.json").unlink()  # so the next load prepares and sweeps
        load_corpus(corpus, tok, tmp_path, data_fraction=1.0)
        assert live.is_dir() and not dead.exists()


class TestCorpusInputs:
    def test_folder_of_txt_and_jsonl_recursive_sorted(self, tmp_path):
        src = tmp_path / "corpus"
        (src / "b" / "deep").mkdir(parents=True)
        (src / "a.txt").write_text("line one of a\n\n  line two of a  \n")
        (src / "b" / "deep" / "z.txt").write_text("deep text\n")
        records = [{"text": "first record\nwith two lines", "id": 1}, {"text": "   "},
                   {"text": "second record", "title": "x"}]
        (src / "b" / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
        (src / "notes.md").write_text("not a corpus file\n")
        assert corpus_texts(str(src), tmp_path) == [
            "line one of a", "line two of a", "first record\nwith two lines", "second record",
            "deep text"]

    def test_jsonl_file_through_load_corpus(self, tmp_path):
        tok = fixture_tok()
        texts = made_up_texts(30, seed=3)
        lines = [json.dumps({"text": t, "meta": {"n": i}}) for i, t in enumerate(texts)]
        (tmp_path / "wiki.jsonl").write_text("\n".join(lines) + "\n")
        seqs = load_corpus(str(tmp_path / "wiki.jsonl"), tok, tmp_path, data_fraction=1.0)
        assert np.array_equal(seqs.ids, todays_ids(tok, texts))

    def test_unicode_line_breaks_split_text_lines_as_before(self, tmp_path):
        (tmp_path / "c.txt").write_text("one\u2028two\r\nthree\rfour\x85five\n", encoding="utf-8")
        (tmp_path / "c.jsonl").write_text(json.dumps({"text": "keep\u2028me"}, ensure_ascii=False)
                                          + "\n", encoding="utf-8")
        assert corpus_texts(str(tmp_path / "c.txt"), tmp_path) == \
            (tmp_path / "c.txt").read_text(encoding="utf-8").splitlines()
        assert corpus_texts(str(tmp_path / "c.jsonl"), tmp_path) == ["keep\u2028me"]


class TestBadInput:
    def fails(self, tmp_path, data_arg, match):
        root = tmp_path / "root"
        with pytest.raises(UserError, match=match) as err:
            load_corpus(data_arg, fixture_tok(), root, data_fraction=1.0)
        assert "\n" not in str(err.value)
        assert [p for p in root.rglob("*") if p.name != "cache"] == []  # nothing half-written
        return str(err.value)

    def test_empty_and_blank_files_are_named(self, tmp_path):
        (tmp_path / "empty.txt").write_bytes(b"")
        (tmp_path / "blank.txt").write_text("  \n\n\t\n")
        (tmp_path / "blank.jsonl").write_text('{"text": " "}\n\n')
        for name in ("empty.txt", "blank.txt", "blank.jsonl"):
            self.fails(tmp_path, str(tmp_path / name),
                       f"the corpus file {tmp_path / name} holds no text")
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "x.txt").write_text("\n")
        (tmp_path / "folder" / "y.txt").write_text("")
        self.fails(tmp_path, str(tmp_path / "folder"), r"\(2 files\) holds no text")

    def test_empty_wikitext_split_is_named(self, tmp_path):
        root = tmp_path / "root"
        (root / "wikitext-2").mkdir(parents=True)
        (root / "wikitext-2" / "wiki.train.tokens").write_text(" \n = Title = \n")
        with pytest.raises(UserError, match="wikitext-2/wiki.train.tokens holds no text"):
            load_corpus("wikitext-2", fixture_tok(), root)
        assert not (root / "cache").exists()

    def test_not_utf8_says_which_file_and_where(self, tmp_path):
        good = tmp_path / "a.txt"
        good.write_text("the tiny railway\n" * 3)
        bad = tmp_path / "b.txt"
        bad.write_bytes(b"the line\nthe old station\nthe \xff engine\n")
        message = self.fails(tmp_path, str(tmp_path), "cannot read the corpus file")
        assert str(bad) in message and "line 3 (byte offset 29" in message and "UTF-8" in message

    def test_jsonl_line_without_text_names_file_and_line(self, tmp_path):
        path = tmp_path / "c.jsonl"
        path.write_text('{"text": "the tiny railway"}\n\n{"title": "no text"}\n')
        self.fails(tmp_path, str(path), f'{path}:3: no "text" string')
        path.write_text('{"text": "ok"}\n{"text": 5}\n')
        self.fails(tmp_path, str(path), f'{path}:2: no "text" string')
        path.write_text('{"text": "ok"}\n{"text": "cut\n')
        self.fails(tmp_path, str(path), f"{path}:2: not a JSON object")
        path.write_text('["a list"]\n')
        self.fails(tmp_path, str(path), f'{path}:1: no "text" string')

    def test_missing_path_and_empty_folder(self, tmp_path):
        self.fails(tmp_path, str(tmp_path / "nope.txt"), "nor an existing text file or folder")
        (tmp_path / "empty").mkdir()
        self.fails(tmp_path, str(tmp_path / "empty"), "no .txt files")

    def test_an_unwritable_data_dir_is_one_line(self, tmp_path):
        (tmp_path / "c.txt").write_text("\n".join(made_up_texts(20)) + "\n")
        (tmp_path / "root").mkdir()
        (tmp_path / "root" / "cache").write_text("a file where the cache folder goes")
        with pytest.raises(UserError, match="cannot write the prepared corpus in .*--data-dir"):
            load_corpus(str(tmp_path / "c.txt"), fixture_tok(), tmp_path / "root")
        assert [p.name for p in (tmp_path / "root").iterdir()] == ["cache"]

    def test_nothing_left_after_filtering_leaves_no_folder(self, tmp_path):
        (tmp_path / "few.txt").write_text("too short\nalso short\n")
        self.fails(tmp_path, str(tmp_path / "few.txt"), "no sequence of 12")


# ----------------------------------------------------------------------------- download

class WikitextHandler(http.server.BaseHTTPRequestHandler):
    archives, paths = {}, []

    def do_GET(self):
        type(self).paths.append(self.path)
        body = self.archives.get(self.path)
        if body is None or not self.headers.get("User-Agent", "").startswith("Mozilla/5.0"):
            self.send_error(404 if body is None else 403)  # like the real host
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def wikitext_server(monkeypatch):
    WikitextHandler.archives, WikitextHandler.paths = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WikitextHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(data, "WIKITEXT_URL", f"http://127.0.0.1:{httpd.server_address[1]}/")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TINYDISTIL_OFFLINE", raising=False)
    yield WikitextHandler
    httpd.shutdown()
    httpd.server_close()


def wikitext_zip(folder, suffix, fixture):
    """An archive in the layout of the real wikitext-*-v1.zip: folder/wiki.{split}.suffix."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{folder}/", "")
        for split in ("train", "valid", "test"):
            z.writestr(f"{folder}/wiki.{split}.{suffix}", (DATA_FIX / fixture).read_bytes())
    return buf.getvalue()


class TestWikitext103:
    @pytest.mark.parametrize("name, suffix, fixture", [
        ("wikitext-103-raw", "raw", "wiki.train.raw"),
        ("wikitext-103", "tokens", "wiki.train.tokens")])
    def test_download_extract_prepare(self, wikitext_server, tmp_path, name, suffix, fixture):
        archive = f"{name}-v1.zip"
        wikitext_server.archives[f"/{archive}"] = wikitext_zip(name, suffix, fixture)
        root = tmp_path / "data"
        seqs = load_corpus(name, fixture_tok(), root, data_fraction=1.0, seq_len=32)
        assert wikitext_server.paths == [f"/{archive}"]
        for split in ("train", "valid", "test"):
            extracted = root / name / f"wiki.{split}.{suffix}"
            assert extracted.read_bytes() == (DATA_FIX / fixture).read_bytes()
        # cleaned as WikiText-2 is: the same sequences as the same file under the WikiText-2 name
        two = name.replace("103", "2")
        (tmp_path / "w2" / two).mkdir(parents=True)
        (tmp_path / "w2" / two / fixture).write_bytes((DATA_FIX / fixture).read_bytes())
        same = load_corpus(two, fixture_tok(), tmp_path / "w2", data_fraction=1.0, seq_len=32)
        assert seqs.stats["texts"] == 5 and np.array_equal(seqs.ids, same.ids)
        assert not [p for p in root.rglob("*") if p.suffix in (".tmp", ".incomplete")]
        again = load_corpus(name, fixture_tok(), root, data_fraction=1.0, seq_len=32)
        assert np.array_equal(again.ids, seqs.ids) and len(wikitext_server.paths) == 1

    def test_archive_names_and_folders(self):
        assert data.WIKITEXT["wikitext-103-raw"][:2] == ("wikitext-103-raw-v1.zip",
                                                         "wikitext-103-raw")
        assert data.WIKITEXT["wikitext-103"][:2] == ("wikitext-103-v1.zip", "wikitext-103")


class TestOfflineHints:
    def put(self, root, folder, name, fixture):
        (root / folder).mkdir(parents=True)
        (root / folder / name).write_bytes((DATA_FIX / fixture).read_bytes())

    def test_offline_raw_points_to_the_tokenised_version_on_disk(self, tmp_path, monkeypatch):
        monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
        self.put(tmp_path, "wikitext-2", "wiki.train.tokens", "wiki.train.tokens")
        with pytest.raises(UserError, match="use --data wikitext-2$") as err:
            load_corpus("wikitext-2-raw", fixture_tok(), tmp_path)
        assert "wikitext-2 (the tokenised version) is already in" in str(err.value)
        assert "TINYDISTIL_OFFLINE=1" in str(err.value)
        seqs = load_corpus("wikitext-2", fixture_tok(), tmp_path, data_fraction=1.0)
        assert seqs.stats["texts"] == 5

    def test_offline_tokenised_points_to_the_raw_version(self, tmp_path, monkeypatch):
        monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
        self.put(tmp_path, "wikitext-103-raw", "wiki.train.raw", "wiki.train.raw")
        hint = r"wikitext-103-raw \(the raw version\) is already in .*use --data wikitext-103-raw$"
        with pytest.raises(UserError, match=hint):
            load_corpus("wikitext-103", fixture_tok(), tmp_path)

    def test_unreachable_host_gets_the_hint_too(self, tmp_path, monkeypatch):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setattr(data, "WIKITEXT_URL", f"http://127.0.0.1:{port}/")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TINYDISTIL_OFFLINE", raising=False)
        self.put(tmp_path, "wikitext-2", "wiki.train.tokens", "wiki.train.tokens")
        with pytest.raises(UserError, match="ConnectionError.*use --data wikitext-2$"):
            load_corpus("wikitext-2-raw", fixture_tok(), tmp_path)

    def test_no_hint_when_neither_is_there(self, tmp_path, monkeypatch):
        monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")
        with pytest.raises(UserError) as err:
            load_corpus("wikitext-2-raw", fixture_tok(), tmp_path)
        assert "use --data" not in str(err.value)
