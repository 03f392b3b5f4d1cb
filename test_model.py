"""Port checks for model.py: parity with the reference implementation on committed fixtures,
the safetensors rules, checkpoint name mapping and export."""
import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hub import UserError
from model import BERT, BertConfig, load_safetensors, save_safetensors

MODELS = Path(__file__).parent / "fixtures" / "models"
CHECKPOINTS = ["tiny-bert", "tiny-bert-legacy", "tiny-bert-encoder", "tiny-distilbert"]


def run_reference_batch(model, ref):
    types = ref["token_type_ids"] if model.config.type_vocab_size else None
    with torch.no_grad():
        return model(ref["input_ids"], ref["attention_mask"], types)


def max_diffs(out, ref):
    """Max |ours - reference| over every non-pad position, per output."""
    keep = ref["attention_mask"].bool()
    diffs = {}
    for i, h in enumerate(out.hidden_states):
        diffs[f"hidden_states.{i}"] = (h - ref[f"hidden_states.{i}"])[keep].abs().max().item()
    if "logits" in ref:
        diffs["logits"] = (out.logits - ref["logits"])[keep].abs().max().item()
    if "pooler_output" in ref:
        diffs["pooler_output"] = (out.pooler_output - ref["pooler_output"]).abs().max().item()
    return diffs


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_parity_with_reference(name):
    model = BERT.from_pretrained(str(MODELS / name))
    ref = load_safetensors(MODELS / name / "reference_outputs.safetensors")
    assert not ref["attention_mask"].all(), "the fixture batch must contain padding"
    out = run_reference_batch(model, ref)
    assert len(out.hidden_states) == model.config.n_layer + 1
    assert (out.logits is None) == ("logits" not in ref)
    assert (out.pooler_output is None) == ("pooler_output" not in ref)
    diffs = max_diffs(out, ref)
    print(name, "max difference", max(diffs.values()), diffs)
    assert max(diffs.values()) < 1e-4


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_save_pretrained_round_trip(name, tmp_path):
    model = BERT.from_pretrained(str(MODELS / name))
    model.save_pretrained(tmp_path / "out")
    again = BERT.from_pretrained(str(tmp_path / "out"))
    ref = load_safetensors(MODELS / name / "reference_outputs.safetensors")
    assert max(max_diffs(run_reference_batch(again, ref), ref).values()) < 1e-4
    assert (tmp_path / "out" / "tokenizer.json").is_file() or (tmp_path / "out" / "vocab.txt").is_file()
    # The export uses the reference library's own names, so it loads there unchanged.
    if name != "tiny-bert-legacy":
        theirs = set(load_safetensors(MODELS / name / "model.safetensors"))
        ours = set(load_safetensors(tmp_path / "out" / "model.safetensors"))
        assert ours == theirs - {"embeddings.position_ids"}
        assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == \
            json.loads((MODELS / name / "config.json").read_text())["model_type"]


def test_presets_build_without_download():
    # The paper's Table 3 counts the encoders (BertModel, DistilBertModel): 110M and 66M.
    bert = BERT(replace(BertConfig.preset("bert-base-uncased"), mlm_head=False))
    distil = BERT(replace(BertConfig.preset("distilbert-base-uncased"), mlm_head=False))
    assert round(bert.num_params() / 1e6) == 109  # 109.48M: the paper rounds up to 110
    assert round(distil.num_params() / 1e6) == 66
    with pytest.raises(UserError, match="no preset"):
        BertConfig.preset("gpt2")


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "roberta", "unsupported model_type 'roberta'"),
    ("hidden_act", "relu", "activation 'relu'"),
])
def test_config_rejects_unsupported(field, value, match):
    d = json.loads((MODELS / "tiny-bert" / "config.json").read_text())
    d[field] = value
    with pytest.raises(UserError, match=match):
        BertConfig.from_hf(d)


def test_config_old_and_new_spellings():
    d = json.loads((MODELS / "tiny-distilbert" / "config.json").read_text())
    for k in ("tie_word_embeddings", "tie_weights_", "dtype", "torch_dtype"):
        d.pop(k, None)
    base = BertConfig.from_hf(d)
    assert BertConfig.from_hf({**d, "tie_weights_": True, "torch_dtype": "float32"}) == base
    assert BertConfig.from_hf({**d, "tie_word_embeddings": True, "dtype": "float32"}) == base
    with pytest.raises(UserError, match="untied"):
        BertConfig.from_hf({**d, "tie_weights_": False})


def copy_checkpoint(tmp_path, name="tiny-bert"):
    dst = tmp_path / name
    shutil.copytree(MODELS / name, dst)
    return dst


def write_raw(path, header: dict, buffer: bytes, header_len=None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + buffer)


@pytest.mark.parametrize("case,match", [
    ("empty", "shorter than its 8-byte header"),
    ("huge_header", "exceeds the 100000000-byte limit"),
    ("header_past_end", "runs past the end"),
    ("not_brace", "does not start with '{'"),
    ("bad_json", "not valid JSON"),
    ("gap", "tensor 'b' starts at byte 12, expected 8"),
    ("size_mismatch", "tensor 'a' spans 8 bytes but shape"),
    ("truncated", "tensor 'b' ends at byte 16 past the 12-byte buffer"),
    ("trailing", "4 trailing bytes"),
    ("bad_dtype", "unsupported dtype 'F128'"),
])
def test_safetensors_reader_rules(tmp_path, case, match):
    p = tmp_path / "m.safetensors"
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    buf = bytes(16)
    if case == "empty":
        p.write_bytes(b"\x01\x00")
    elif case == "huge_header":
        write_raw(p, ok, buf, header_len=200_000_000)
    elif case == "header_past_end":
        write_raw(p, ok, b"", header_len=10_000)
    elif case == "not_brace":
        p.write_bytes(struct.pack("<Q", 4) + b"[1,2")
    elif case == "bad_json":
        p.write_bytes(struct.pack("<Q", 5) + b"{oops")
    elif case == "gap":
        write_raw(p, {**ok, "b": {**ok["b"], "data_offsets": [12, 20]}}, bytes(20))
    elif case == "size_mismatch":
        write_raw(p, {**ok, "a": {**ok["a"], "shape": [3]}}, buf)
    elif case == "truncated":
        write_raw(p, ok, buf[:12])
    elif case == "trailing":
        write_raw(p, ok, buf + bytes(4))
    elif case == "bad_dtype":
        write_raw(p, {**ok, "a": {**ok["a"], "dtype": "F128"}}, buf)
    with pytest.raises(UserError, match=match) as e:
        load_safetensors(p)
    assert str(p) in str(e.value)


def test_safetensors_round_trip(tmp_path):
    tensors = {"f": torch.randn(3, 4), "h": torch.randn(5).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(6).view(2, 3), "e": torch.zeros(0, 3), "u": torch.tensor([1, 2], dtype=torch.uint8)}
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0  # data starts 8-byte aligned
    back = load_safetensors(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    folder = copy_checkpoint(tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        BERT.from_pretrained(str(folder))


def rewrite(folder, edit):
    tensors = dict(load_safetensors(folder / "model.safetensors"))
    edit(tensors)
    save_safetensors(tensors, folder / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    folder = copy_checkpoint(tmp_path)
    rewrite(folder, lambda t: t.pop("bert.encoder.layer.1.attention.self.key.bias"))
    with pytest.raises(UserError, match=r"'bert.encoder.layer.1.attention.self.key.bias' .* is missing"):
        BERT.from_pretrained(str(folder))


def test_unexpected_tensor_is_named(tmp_path):
    folder = copy_checkpoint(tmp_path)
    rewrite(folder, lambda t: t.update({"classifier.weight": torch.zeros(2, 32)}))
    with pytest.raises(UserError, match="'classifier.weight' is not used"):
        BERT.from_pretrained(str(folder))


def test_config_that_disagrees_with_weights(tmp_path):
    folder = copy_checkpoint(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"'bert.encoder.layer.0.intermediate.dense.weight' has shape \[48, 32\]"):
        BERT.from_pretrained(str(folder))


def test_missing_files(tmp_path):
    folder = copy_checkpoint(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors is missing"):
        BERT.from_pretrained(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError):
        BERT.from_pretrained(str(folder))


def test_logits_only_where_asked():
    model = BERT.from_pretrained(str(MODELS / "tiny-distilbert"))
    ref = load_safetensors(MODELS / "tiny-distilbert" / "reference_outputs.safetensors")
    out = model(ref["input_ids"], ref["attention_mask"], logits=False)
    assert out.logits is None
    keep = ref["attention_mask"].bool()
    rows = model.mlm_logits(out.hidden_states[-1][keep])  # the pretraining loop's path
    assert (rows - ref["logits"][keep]).abs().max() < 1e-4


def test_return_unused_hands_back_task_heads(tmp_path):
    folder = copy_checkpoint(tmp_path)
    rewrite(folder, lambda t: t.update({"classifier.weight": torch.ones(2, 32)}))
    model, unused = BERT.from_pretrained(str(folder), return_unused=True)
    assert set(unused) == {"classifier.weight"} and unused["classifier.weight"].sum() == 64
