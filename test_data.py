"""Tests for data.py (corpus, tokenizer, batches, masking) and losses.py (the three loss terms).

Run: python -m pytest -q test_data.py   (offline, CPU, a few seconds)

Fixtures in fixtures/data/: a 156-token WordPiece vocab.txt, the same tokenizer saved as
tokenizer.json with padding Fixed 128 and truncation 128 (as published checkpoints ship it), and a
tiny WikiText-2 train split in the real `.tokens` and `.raw` formats. The download test serves a zip
in the wikitext-2-raw-v1.zip layout from a real HTTP server on 127.0.0.1.
"""
import http.server
import math
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import (Batches, Sequences, build_sequences, collate, corpus_texts, data_dir, encode_batch,
                  load_corpus, load_tokenizer, mask_batch, special_ids, token_probs)
from hub import UserError
from losses import L_ce, L_cos, L_mlm, total_loss

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture
def tok():
    return load_tokenizer(FIX / "tok_json")


@pytest.fixture
def wiki_root(tmp_path):
    """A data dir already holding both WikiText-2 layouts, so nothing is downloaded."""
    for folder, name in (("wikitext-2", "wiki.train.tokens"), ("wikitext-2-raw", "wiki.train.raw")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes((FIX / name).read_bytes())
    return tmp_path


# ----------------------------------------------------------------------------- data dir, tokenizer

def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TINYDISTIL_DATA", raising=False)
    assert data_dir() == tmp_path / ".cache" / "tinydistil"
    monkeypatch.setenv("TINYDISTIL_DATA", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data_dir("~/x") == tmp_path / "x"


def test_tokenizer_json_has_padding_and_truncation_reset(tok):
    raw = __import__("tokenizers").Tokenizer.from_file(str(FIX / "tok_json" / "tokenizer.json"))
    assert raw.padding is not None and raw.truncation is not None  # the fixture is like the published files
    assert tok.padding is None and tok.truncation is None
    enc = tok.encode("The tiny railway")
    assert enc.tokens == ["[CLS]", "the", "tiny", "railway", "[SEP]"]
    assert len(tok.encode("a " * 300).ids) == 302


def test_tokenizer_from_vocab_txt_matches_json(tok):
    vt = load_tokenizer(FIX / "tok_vocab")
    assert vt.padding is None and vt.truncation is None
    for text, pair in [("The Tiny Railway , 1904 zq", None), ("old station", "Green engine shed")]:
        a = tok.encode(text, pair) if pair else tok.encode(text)
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


def test_encode_batch_pads_to_longest_and_truncates_pairs(tok):
    out = encode_batch(tok, ["the line", "the old station was closed"])
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].shape == (2, 7)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert out["input_ids"][0, 4:].tolist() == [0, 0, 0]
    out = encode_batch(tok, ["a b c d e f g h"], pairs=["x y"], max_len=8)
    assert tok.id_to_token(int(out["input_ids"][0, 0])) == "[CLS]"
    # longest_first trims the longer text: 8 = CLS + 3 + SEP + 2 + SEP
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    assert [tok.id_to_token(int(i)) for i in out["input_ids"][0]] == \
        ["[CLS]", "a", "b", "c", "[SEP]", "x", "y", "[SEP]"]


# ----------------------------------------------------------------------------- corpus text

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


# ----------------------------------------------------------------------------- sequences

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


def test_load_corpus_sequences_and_cache_round_trip(wiki_root, tok, monkeypatch):
    seqs = load_corpus("wikitext-2", tok, wiki_root, data_fraction=1.0, seq_len=32)
    ids = special_ids(tok)
    assert seqs.ids.dtype == np.uint16
    # texts of 45, 24, 40, 5 and 15 tokens: 45 -> 31 + 16, 40 -> 31 + 11 (too short), "Short line ." too
    # short, the last one mostly [UNK]
    assert seqs.stats == {"texts": 5, "chunks": 7, "dropped_short": 2, "dropped_unk": 1, "sequences": 4,
                          "tokens": 31 + 16 + 24 + 31}
    assert all(s[0] == ids["cls"] and s[-1] == ids["sep"] and 12 <= len(s) <= 32 for s in map(seqs.__getitem__, range(len(seqs))))
    first = [tok.id_to_token(int(i)) for i in seqs[0][:8]]
    assert first == ["[CLS]", "the", "tiny", "railway", "is", "a", "narrow", "-"]
    assert ids["unk"] in seqs.ids  # the cleaned <unk> became the tokenizer's [UNK]
    assert len(list((wiki_root / "cache").glob("*.npz"))) == 1

    monkeypatch.setattr(data, "corpus_texts", lambda *a: pytest.fail("the cache was not used"))
    again = load_corpus("wikitext-2", tok, wiki_root, data_fraction=1.0, seq_len=32)
    assert np.array_equal(again.ids, seqs.ids) and np.array_equal(again.offsets, seqs.offsets)
    assert again.stats == seqs.stats
    monkeypatch.undo()

    part = load_corpus("wikitext-2", tok, wiki_root, data_fraction=0.4, seq_len=32)  # first 2 of 5 texts
    assert part.stats["texts"] == 2 and len(list((wiki_root / "cache").glob("*.npz"))) == 2
    assert np.array_equal(part.ids, seqs.ids[:len(part.ids)])

    cache = sorted((wiki_root / "cache").glob("*.npz"), key=lambda p: p.stat().st_mtime_ns)[0]
    cache.write_bytes(b"garbage")  # a damaged cache is rebuilt
    again = load_corpus("wikitext-2", tok, wiki_root, data_fraction=1.0, seq_len=32)
    assert np.array_equal(again.ids, seqs.ids)
    assert not list((wiki_root / "cache").glob("*.tmp"))


def test_empty_corpus_and_bad_fraction(tmp_path, tok):
    (tmp_path / "few.txt").write_text("too short\n\nalso short\n")
    with pytest.raises(UserError, match="no sequence"):
        load_corpus(str(tmp_path / "few.txt"), tok, tmp_path)
    with pytest.raises(UserError, match="--data-fraction"):
        load_corpus(str(tmp_path / "few.txt"), tok, tmp_path, data_fraction=0)


def test_token_probs():
    seqs = Sequences(np.array([2, 5, 5, 5, 6, 3, 2, 5, 3], dtype=np.uint16), np.array([0, 6, 9]))
    p = token_probs(seqs, vocab_size=8, special=IDS.values())
    assert p.dtype == torch.float32 and p.shape == (8,)
    assert p[:5].tolist() == [0.0] * 5  # special tokens are never masked
    assert p[5].item() == pytest.approx(4 ** -0.7) and p[6].item() == 1.0 and p[7].item() == 1.0  # max(count, 1)
    with pytest.raises(UserError, match="do not match"):
        token_probs(seqs, vocab_size=6, special=[])


# ----------------------------------------------------------------------------- batches

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


# ----------------------------------------------------------------------------- masking

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


# ----------------------------------------------------------------------------- download

class _Handler(http.server.BaseHTTPRequestHandler):
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
def server(monkeypatch):
    _Handler.agents = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(data, "WIKITEXT_URL", f"http://127.0.0.1:{httpd.server_address[1]}/")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TINYDISTIL_OFFLINE", raising=False)
    yield _Handler
    httpd.shutdown()
    httpd.server_close()


def wikitext_zip(tmp_path):
    path = tmp_path / "src.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("wikitext-2-raw/", "")
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-2-raw/wiki.{split}.raw", (FIX / "wiki.train.raw").read_bytes())
    return path.read_bytes()


def test_download_extract_then_offline(server, tmp_path, tok, monkeypatch):
    server.body = wikitext_zip(tmp_path)
    root = tmp_path / "data"
    seqs = load_corpus("wikitext-2-raw", tok, root, data_fraction=1.0)
    assert server.agents and all(a.startswith("Mozilla/5.0") for a in server.agents)
    assert "python" not in server.agents[0].lower()
    for split in ("train", "valid", "test"):
        assert (root / "wikitext-2-raw" / f"wiki.{split}.raw").read_bytes() == (FIX / "wiki.train.raw").read_bytes()
    assert seqs.stats["texts"] == 5 and len(seqs) == 4
    assert not [p for p in root.rglob("*") if p.suffix in (".tmp", ".incomplete")]

    (root / "cache").rename(tmp_path / "old_cache")
    (root / "wikitext-2-raw-v1.zip").unlink()
    monkeypatch.setenv("TINYDISTIL_OFFLINE", "1")  # the extracted files alone suffice
    n = len(server.agents)
    assert np.array_equal(load_corpus("wikitext-2-raw", tok, root, data_fraction=1.0).ids, seqs.ids)
    assert len(server.agents) == n
    with pytest.raises(UserError):
        load_corpus("wikitext-2", tok, root)  # not there and offline: a clear error, no traceback


def test_download_of_a_bad_zip_is_refused_and_removed(server, tmp_path, tok):
    server.body = b"<html>not a zip</html>"
    with pytest.raises(UserError, match="not a valid wikitext-2-raw-v1.zip"):
        load_corpus("wikitext-2-raw", tok, tmp_path)
    assert not (tmp_path / "wikitext-2-raw-v1.zip").exists()
    assert not (tmp_path / "wikitext-2-raw" / "wiki.train.raw").exists()


# ----------------------------------------------------------------------------- losses

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
