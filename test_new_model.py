"""test_new_model.py: new tests of model.py and hub.py (to be merged into test_all.py).

    python -m pytest -q test_new_model.py

Training-mode dropout parity with the reference library (saved outputs; transformers is never
imported), local checkpoint paths, configure_optimizers' parameter groups, without_mlm_head, frozen
parameters.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from common import UserError
from hub import NoCheckpointFolder, checkpoint_folder, load_safetensors
from model import BERT, configure_optimizers

ROOT = Path(__file__).parent
MODELS = ROOT / "fixtures" / "models"
TRAINING_SEED = 1234  # scripts/make_fixtures.py seeds the reference forward with it


def copy_checkpoint(tmp_path, name):
    return Path(shutil.copytree(MODELS / name, tmp_path / name))


def training_mode_forward(model, ref):
    types = ref["token_type_ids"] if model.config.type_vocab_size else None
    model.train()
    torch.manual_seed(TRAINING_SEED)
    with torch.no_grad():
        return model(ref["input_ids"], ref["attention_mask"], types, return_logits=False)


class TestTrainingModeDropout:
    """Issue 9 item 1: dropout is drawn in the same places and order as BertModel and
    DistilBertModel (DistilBERT's block has none on the attention output)."""

    DROPOUT_FIELDS = {"tiny-bert-encoder": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                      "tiny-distilbert": ("dropout", "attention_dropout")}

    def load(self, tmp_path, name):
        folder = copy_checkpoint(tmp_path, name)
        config = json.loads((folder / "config.json").read_text())
        hidden, attention = self.DROPOUT_FIELDS[name]
        config.update({hidden: 0.1, attention: 0.0})  # the reference outputs' settings
        (folder / "config.json").write_text(json.dumps(config))
        return BERT.from_pretrained(str(folder))

    @pytest.mark.parametrize("name", ["tiny-bert-encoder", "tiny-distilbert"])
    def test_same_seed_same_hidden_states(self, tmp_path, name):
        model = self.load(tmp_path, name)
        ref = load_safetensors(MODELS / name / "reference_outputs.safetensors")
        train_ref = load_safetensors(MODELS / name / "reference_training_outputs.safetensors")
        keep = ref["attention_mask"].bool()
        out = training_mode_forward(model, ref)
        assert len(out.hidden_states) == len(train_ref) == model.config.n_layer + 1
        for i, h in enumerate(out.hidden_states):
            assert (h - train_ref[f"hidden_states.{i}"])[keep].abs().max() <= 1e-5, i
        # the saved outputs really are training-mode ones: dropout moved them off the eval outputs
        last = f"hidden_states.{model.config.n_layer}"
        assert (train_ref[last] - ref[last])[keep].abs().max() > 1e-2

    def test_bert_placement_would_not_match_distilbert(self, tmp_path):
        model = self.load(tmp_path, "tiny-distilbert")
        for block in model.layers:  # BERT's extra dropout on the attention output
            block.attention_output_dropout = nn.Dropout(0.1)
        ref = load_safetensors(MODELS / "tiny-distilbert" / "reference_outputs.safetensors")
        train_ref = load_safetensors(MODELS / "tiny-distilbert" /
                                     "reference_training_outputs.safetensors")
        out = training_mode_forward(model, ref)
        keep = ref["attention_mask"].bool()
        assert (out.hidden_states[1] - train_ref["hidden_states.1"])[keep].abs().max() > 1e-2


class TestLocalCheckpointPaths:
    """Issue 13 item 5: a value that names a local path is a folder, never a Hub id."""

    @pytest.mark.parametrize("name", ["/tmp/tinydistil-no-such/dir", "./no-such-folder",
                                      "../no-such-folder", "~/no-such-tinydistil-folder"])
    def test_missing_folder_is_one_clear_line(self, name, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were it read as a Hub id, no request goes out
        with pytest.raises(NoCheckpointFolder) as e:
            BERT.from_pretrained(name)
        message = str(e.value)
        assert message.startswith(f"no checkpoint folder {name}") and "\n" not in message
        assert "huggingface" not in message.lower() and "hub" not in message.lower()
        assert isinstance(e.value, UserError)  # the CLI prints it as one line, exit 1

    def test_a_file_is_not_a_folder(self, tmp_path):
        (tmp_path / "model.safetensors").write_bytes(b"")
        with pytest.raises(NoCheckpointFolder, match="a file, not a folder"):
            BERT.from_pretrained(str(tmp_path / "model.safetensors"))

    def test_existing_relative_folder_loads_without_the_hub(self, monkeypatch):
        monkeypatch.chdir(ROOT)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert checkpoint_folder("fixtures/models/tiny-bert") == Path("fixtures/models/tiny-bert")
        assert BERT.from_pretrained("fixtures/models/tiny-bert").config.n_layer == 2

    def test_folder_without_weights_says_what_is_missing(self, tmp_path):
        folder = copy_checkpoint(tmp_path, "tiny-bert")
        (folder / "model.safetensors").unlink()
        with pytest.raises(UserError, match="model.safetensors is missing"):
            BERT.from_pretrained(str(folder))


class TestConfigureOptimizers:
    def test_decay_on_matrices_only_and_every_parameter_once(self):
        model = BERT.from_pretrained(str(MODELS / "tiny-bert"))
        opt = configure_optimizers(model, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-6)
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
        assert all(p.dim() >= 2 for p in decay["params"])
        assert all(p.dim() == 1 for p in no_decay["params"])
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        assert "embeddings.word_embeddings.weight" in decayed  # tied with the decoder: listed once
        assert "layers.0.attention.q_lin.weight" in decayed
        assert not any(n.endswith(".bias") or "norm" in n.lower() for n in decayed)
        assert len(decay["params"]) + len(no_decay["params"]) == len(names)
        assert opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.98)
        assert opt.defaults["eps"] == 1e-6 and opt.defaults["lr"] == 1e-3

    def test_frozen_position_embeddings_stay_frozen(self):
        model = BERT.from_pretrained(str(MODELS / "tiny-distilbert"))
        positions = model.embeddings.position_embeddings
        positions.requires_grad_(False)  # what pretraining does (issue 9 item 4)
        model.train()
        opt = configure_optimizers(model, lr=1e-2, weight_decay=0.01)
        listed = {id(p) for group in opt.param_groups for p in group["params"]}
        assert id(positions.weight) not in listed
        before = positions.weight.detach().clone()
        words_before = model.embeddings.word_embeddings.weight.detach().clone()
        ids = torch.tensor([[2, 40, 41, 42, 3]])
        model(ids).logits.sum().backward()
        opt.step()
        assert torch.equal(positions.weight, before) and not positions.weight.requires_grad
        assert not torch.equal(model.embeddings.word_embeddings.weight, words_before)
        assert not model.without_mlm_head().embeddings.position_embeddings.weight.requires_grad


class TestWithoutMlmHead:
    @pytest.mark.parametrize("name,architecture", [("tiny-bert", "BertModel"),
                                                   ("tiny-distilbert", "DistilBertModel")])
    def test_drops_the_head_and_saves_a_bare_encoder(self, tmp_path, name, architecture):
        model = BERT.from_pretrained(str(MODELS / name))
        ref = load_safetensors(MODELS / name / "reference_outputs.safetensors")
        head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vocab_"))
        before = model.num_params()
        assert model.without_mlm_head() is model
        assert not model.config.mlm_head and model.num_params() == before - head
        assert not any(n.startswith("vocab_") for n, _ in model.named_parameters())
        types = ref["token_type_ids"] if model.config.type_vocab_size else None
        with torch.no_grad():
            out = model(ref["input_ids"], ref["attention_mask"], types)
        assert out.logits is None
        keep = ref["attention_mask"].bool()
        last = ref[f"hidden_states.{model.config.n_layer}"]
        assert (out.hidden_states[-1] - last)[keep].abs().max() < 1e-4
        model.save_pretrained(tmp_path / "enc")
        saved = json.loads((tmp_path / "enc" / "config.json").read_text())
        assert saved["architectures"] == [architecture]
        keys = set(load_safetensors(tmp_path / "enc" / "model.safetensors"))
        assert "embeddings.word_embeddings.weight" in keys  # as transformers saves a bare encoder
        assert not any(k.startswith(("bert.", "distilbert.", "vocab_", "cls.")) for k in keys)
        again = BERT.from_pretrained(str(tmp_path / "enc"))
        assert not again.config.mlm_head
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                     model.state_dict().values()))
