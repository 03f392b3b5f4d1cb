"""model.py: a handwritten BERT / DistilBERT encoder, a safetensors reader and writer, and
from_pretrained / save_pretrained in the Hugging Face layout.

    from model import BERT
    m = BERT.from_pretrained("bert-base-uncased")      # Hub repo id, or a local folder
    out = m(input_ids, attention_mask)                 # out.hidden_states, out.logits, out.pooler_output

Paper section 2: the teacher is BERT-base (token-type embeddings, pooler, 12 layers); the student has
the same post-LN blocks (exact erf GELU) but "the token-type embeddings and the pooler are removed and
the number of layers is reduced by a factor of 2". Both have the MLM head whose decoder is tied to the
word embeddings. Module names follow DistilBERT's checkpoint (`q_lin`, `ffn.lin1`, ...); BERT's are
mapped by the explicit table BERT_LAYER_NAMES.
"""
import json
import math
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError
from hub import snapshot_download


@dataclass
class BertConfig:
    model_type: str = "bert"         # "bert" (token types, pooler) or "distilbert" (neither)
    vocab_size: int = 30522
    hidden_size: int = 768
    n_layer: int = 12
    n_head: int = 12
    intermediate_size: int = 3072    # width of the feed-forward layer
    max_position_embeddings: int = 512
    type_vocab_size: int = 2         # 0: no token-type embeddings (DistilBERT)
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    pooler: bool = True              # tanh dense on [CLS]; set from the checkpoint's tensors
    mlm_head: bool = True            # MLM head present; sentence encoders ship without one
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02  # std of the normal init of fresh weights

    @staticmethod
    def preset(name: str) -> "BertConfig":
        """The published hyperparameters, so a model can be built without any download."""
        if name == "bert-base-uncased":
            return BertConfig()
        if name == "distilbert-base-uncased":
            return BertConfig(model_type="distilbert", n_layer=6, type_vocab_size=0, pooler=False)
        raise UserError(f"no preset named {name!r}: use bert-base-uncased or distilbert-base-uncased")

    @staticmethod
    def from_hf(d: dict) -> "BertConfig":
        """From a Hugging Face config.json of model_type bert or distilbert (old and new spellings)."""
        mt = d.get("model_type")
        if mt not in ("bert", "distilbert"):
            raise UserError(f"config.json: unsupported model_type {mt!r}; tinydistil reads 'bert' and "
                            f"'distilbert' checkpoints")
        col, defaults = (0, BertConfig()) if mt == "bert" else (1, BertConfig.preset("distilbert-base-uncased"))
        kw = {}
        for ours, names in HF_CONFIG_NAMES.items():
            if names[col] is None:
                continue
            if names[col] not in d and ours in REQUIRED_CONFIG:
                raise UserError(f"config.json of model_type {mt!r} lacks the field {names[col]!r}")
            kw[ours] = d.get(names[col], getattr(defaults, ours))
        cfg = replace(defaults, **{**kw, "pad_token_id": kw["pad_token_id"] or 0})  # null in some files
        act = d.get("hidden_act" if mt == "bert" else "activation", "gelu")
        tied = d.get("tie_word_embeddings", d.get("tie_weights_", True))
        if act != "gelu":
            raise UserError(f"config.json: activation {act!r} is not supported (exact erf 'gelu' only)")
        if not tied:
            raise UserError("config.json: untied input/output embeddings are not supported")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"config.json: position_embedding_type {d['position_embedding_type']!r} is "
                            f"not supported (absolute only)")
        if cfg.hidden_size % cfg.n_head:
            raise UserError(f"config.json: hidden size {cfg.hidden_size} is not a multiple of "
                            f"{cfg.n_head} heads")
        return cfg

    def to_hf(self) -> dict:
        """config.json for BertForMaskedLM / DistilBertForMaskedLM (or BertModel without a head)."""
        col = 0 if self.model_type == "bert" else 1
        d = {names[col]: getattr(self, ours) for ours, names in HF_CONFIG_NAMES.items() if names[col]}
        if col == 0:
            arch = "BertForMaskedLM" if self.mlm_head else "BertModel"
            d.update(hidden_act="gelu", position_embedding_type="absolute")
        else:  # DistilBERT's own fields, with the values the student really has
            arch = "DistilBertForMaskedLM"
            d.update(activation="gelu", sinusoidal_pos_embds=False, qa_dropout=0.1,
                     seq_classif_dropout=0.2, tie_weights_=True)
        return {"architectures": [arch], "model_type": self.model_type, **d,
                "tie_word_embeddings": True, "torch_dtype": "float32"}


HF_CONFIG_NAMES = {  # our field -> its config.json name in (BERT, DistilBERT); None: no such field
    "vocab_size": ("vocab_size", "vocab_size"),
    "hidden_size": ("hidden_size", "dim"),
    "n_layer": ("num_hidden_layers", "n_layers"),
    "n_head": ("num_attention_heads", "n_heads"),
    "intermediate_size": ("intermediate_size", "hidden_dim"),
    "max_position_embeddings": ("max_position_embeddings", "max_position_embeddings"),
    "type_vocab_size": ("type_vocab_size", None),
    "layer_norm_eps": ("layer_norm_eps", None),  # DistilBERT hard-codes 1e-12
    "pad_token_id": ("pad_token_id", "pad_token_id"),
    "dropout": ("hidden_dropout_prob", "dropout"),
    "attention_dropout": ("attention_probs_dropout_prob", "attention_dropout"),
    "initializer_range": ("initializer_range", "initializer_range"),
}
REQUIRED_CONFIG = {"vocab_size", "hidden_size", "n_layer", "n_head", "intermediate_size",
                   "max_position_embeddings", "type_vocab_size"}


# ----------------------------------------------------------------------------- the network

@dataclass
class Output:
    hidden_states: tuple                      # embedding output, then (B, T, H) per layer
    logits: Optional[torch.Tensor]            # (B, T, V), or None
    pooler_output: Optional[torch.Tensor]     # (B, H), or None


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head, self.p = cfg.n_head, cfg.attention_dropout
        H = cfg.hidden_size
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(H, H) for _ in range(4))

    def forward(self, x, mask):
        B, T, H = x.shape
        split = lambda t: t.view(B, T, self.n_head, H // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(split(self.q_lin(x)), split(self.k_lin(x)),
                                           split(self.v_lin(x)), attn_mask=mask,
                                           dropout_p=self.p if self.training else 0.0)
        return self.out_lin(y.transpose(1, 2).reshape(B, T, H))  # (B, T, H)


class FFN(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.lin1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.lin2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))  # exact erf GELU, as BERT was trained with


class Block(nn.Module):
    """Post-LN: each sub-layer's output is added to its input, then normalised (BERT, not GPT-2)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention, self.ffn = Attention(cfg), FFN(cfg)
        self.sa_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.output_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask):
        x = self.sa_layer_norm(x + self.dropout(self.attention(x, mask)))
        return self.output_layer_norm(x + self.dropout(self.ffn(x)))


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = (nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
                                      if cfg.type_vocab_size else None)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids, token_type_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:input_ids.shape[1]]
        if self.token_type_embeddings is not None:
            x = x + (self.token_type_embeddings(token_type_ids) if token_type_ids is not None
                     else self.token_type_embeddings.weight[0])
        return self.dropout(self.LayerNorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))


class BERT(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config, self.source_dir = cfg, None
        H = cfg.hidden_size
        self.embeddings = Embeddings(cfg)
        self.transformer = Transformer(cfg)
        self.pooler = nn.ModuleDict({"dense": nn.Linear(H, H)}) if cfg.pooler else None
        if cfg.mlm_head:
            self.vocab_transform = nn.Linear(H, H)
            self.vocab_layer_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
            self.vocab_projector = nn.Linear(H, cfg.vocab_size)
        self.apply(self._init_weights)
        if cfg.mlm_head:  # tied: the decoder is the word embedding matrix, only its bias is its own
            self.vocab_projector.weight = self.embeddings.word_embeddings.weight

    def _init_weights(self, m):  # as the reference: N(0, 0.02) weights, zero biases and pad row
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])

    def mlm_logits(self, h):
        """The MLM head on any (..., H) tensor, so callers can skip the pad rows of a (V)-wide matmul."""
        return self.vocab_projector(self.vocab_layer_norm(F.gelu(self.vocab_transform(h))))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, logits=True) -> Output:
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens is longer than the model's "
                             f"{self.config.max_position_embeddings} positions")
        # SDPA takes a boolean mask where True means "may attend"; (B, 1, 1, T) broadcasts over heads
        # and queries. No mask at all lets it pick its fastest kernel (batch size 1, no padding).
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        hidden = [x]
        for block in self.transformer.layer:
            x = block(x, mask)
            hidden.append(x)
        pooled = torch.tanh(self.pooler.dense(x[:, 0])) if self.pooler is not None else None
        out_logits = self.mlm_logits(x) if logits and self.config.mlm_head else None
        return Output(tuple(hidden), out_logits, pooled)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    # ------------------------------------------------------------------------- checkpoints

    def checkpoint_names(self) -> dict:
        """Our parameter name -> its name in a Hugging Face *ForMaskedLM file (one explicit table)."""
        bert = self.config.model_type == "bert"
        enc = "bert." if bert else "distilbert."
        table = {}
        for name, p in self.named_parameters():  # tied vocab_projector.weight is not listed
            module, leaf = name.rsplit(".", 1)
            if name.startswith("transformer.layer."):
                _, _, i, sub = module.split(".", 3)
                theirs = (f"{enc}encoder.layer.{i}.{BERT_LAYER_NAMES[sub]}" if bert
                          else f"{enc}transformer.layer.{i}.{sub}")
            elif module.startswith(("embeddings", "pooler")):
                theirs = enc + module
            else:
                theirs = (BERT_HEAD_NAMES if bert else DISTILBERT_HEAD_NAMES)[module]
            table[name] = f"{theirs}.{leaf}"
        return table

    @classmethod
    def from_pretrained(cls, name_or_dir: str, revision: str = "main", return_unused=False):
        """A Hub repo id or local folder -> BERT. With return_unused, tensors the encoder does not use
        (a fine-tuned task head) come back as (model, {name: tensor}) instead of being an error."""
        folder = Path(name_or_dir)
        if not folder.is_dir():
            try:
                folder = snapshot_download(name_or_dir, revision=revision)
            except UserError as e:
                raise UserError(f"{e} (and there is no local folder {name_or_dir!r})") from None
        cfg_path, st_path = folder / "config.json", folder / "model.safetensors"
        for p in (cfg_path, st_path):
            if not p.is_file():
                raise UserError(f"{p} is missing: a checkpoint folder needs config.json and "
                                f"model.safetensors (convert .bin weights to safetensors first)")
        try:
            cfg = BertConfig.from_hf(json.loads(cfg_path.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg_path} is not valid JSON ({e})") from None
        tensors = load_safetensors(st_path)
        # Which optional parts exist is a fact of the file, not of config.json.
        present = lambda *keys: any(k in tensors for k in keys)
        cfg.pooler = cfg.model_type == "bert" and present("bert.pooler.dense.weight",
                                                          "pooler.dense.weight")
        cfg.mlm_head = present("cls.predictions.transform.dense.weight", "vocab_transform.weight")
        model = cls(cfg)
        unused = model._load_hf_tensors(tensors, st_path, return_unused)
        model.source_dir = folder
        return (model.eval(), unused) if return_unused else model.eval()

    def _load_hf_tensors(self, tensors: dict, path, return_unused=False):
        used = set()
        params = dict(self.named_parameters())
        layer_norms = {n for n, m in self.named_modules() if isinstance(m, nn.LayerNorm)}
        for ours, theirs in self.checkpoint_names().items():
            module, leaf = ours.rsplit(".", 1)
            base, hf_leaf = theirs.rsplit(".", 1)
            candidates = [theirs, _unprefixed(theirs)]  # *ForMaskedLM file, or bare encoder file
            if module in layer_norms:  # TF-era files (the real bert-base-uncased) say gamma/beta
                legacy = f"{base}.{LEGACY_LAYER_NORM[hf_leaf]}"
                candidates += [legacy, _unprefixed(legacy)]
            if ours == "vocab_projector.bias":  # some files keep the bias under the decoder's name
                candidates.append("cls.predictions.decoder.bias")
            found = [k for k in candidates if k in tensors]
            if not found:
                raise UserError(f"{path}: tensor {theirs!r} (for {ours}) is missing")
            t = tensors[found[0]]
            if tuple(t.shape) != tuple(params[ours].shape):
                raise UserError(f"{path}: tensor {found[0]!r} has shape {list(t.shape)} but "
                                f"config.json implies {list(params[ours].shape)}")
            with torch.no_grad():
                params[ours].copy_(t.float())
            used.update(found)
        unused = sorted(k for k in tensors if k not in used and k not in IGNORED)
        if return_unused:
            return {k: tensors[k] for k in unused}
        if unused:
            raise UserError(f"{path}: tensor {unused[0]!r} is not used by a {self.config.model_type} "
                            f"model ({len(unused)} unused in all): is this the right checkpoint?")

    def save_pretrained(self, out_dir, tensors=None, config=None):
        """config.json + model.safetensors (+ tokenizer files), loadable by the reference library.
        A task model passes its own tensors and config.json dict (the encoder's plus its head)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if tensors is None:
            bare = self.config.model_type == "bert" and not self.config.mlm_head  # BertModel: no prefix
            tensors = {(_unprefixed(theirs) if bare else theirs): self.state_dict()[ours]
                       for ours, theirs in self.checkpoint_names().items()}
        save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
        _atomic_write(out / "config.json", json.dumps(config or self.config.to_hf(), indent=2).encode())
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
            src = self.source_dir and Path(self.source_dir) / name
            if src and src.is_file() and src.resolve() != (out / name).resolve():
                _atomic_write(out / name, src.read_bytes())


BERT_LAYER_NAMES = {  # ours (DistilBERT's names) -> BERT's, inside one encoder layer
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}
BERT_HEAD_NAMES = {"vocab_transform": "cls.predictions.transform.dense",
                   "vocab_layer_norm": "cls.predictions.transform.LayerNorm",
                   "vocab_projector": "cls.predictions"}  # its bias is cls.predictions.bias
DISTILBERT_HEAD_NAMES = {k: k for k in ("vocab_transform", "vocab_layer_norm", "vocab_projector")}
LEGACY_LAYER_NORM = {"weight": "gamma", "bias": "beta"}
ENCODER_PREFIXES = ("bert.", "distilbert.")  # absent in files saved from a bare BertModel


def _unprefixed(key: str) -> str:
    prefix = next((p for p in ENCODER_PREFIXES if key.startswith(p)), "")
    return key[len(prefix):]


IGNORED = {  # tensors real checkpoints carry that this model has no use for
    "embeddings.position_ids", "bert.embeddings.position_ids",  # a saved arange buffer, not a weight
    "distilbert.embeddings.position_ids",
    "cls.seq_relationship.weight", "cls.seq_relationship.bias",  # BERT's NSP head: the paper drops NSP
    "cls.predictions.decoder.weight", "vocab_projector.weight",  # tied copies of the word embeddings
}


# ----------------------------------------------------------------------------- safetensors

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_SIZE = 100_000_000  # the official implementation's limit


def load_safetensors(path) -> dict:
    """Read a .safetensors file: u64 little-endian header size N, N bytes of JSON, then the buffer.
    Enforces the official rules; every violation names the file and the tensor."""
    path = Path(path)
    try:
        data = bytearray(path.read_bytes())  # writable, so torch.frombuffer can share it
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    bad = lambda why: UserError(f"{path} is not a valid safetensors file: {why}")
    if len(data) < 8:
        raise bad("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_SIZE:
        raise bad(f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
    if 8 + n > len(data):
        raise bad(f"header length {n} runs past the end of the file ({len(data)} bytes): truncated?")
    raw = bytes(data[8:8 + n])
    if not raw.startswith(b"{"):
        raise bad("the header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    buffer_len, start, tensors, end = len(data) - 8 - n, 8 + n, {}, 0
    try:
        entries = sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))
    except (KeyError, TypeError):
        raise bad("a tensor entry has no data_offsets pair") from None
    for name, info in entries:
        dtype, shape, (begin, stop) = info.get("dtype"), info.get("shape"), info["data_offsets"]
        if dtype not in DTYPES:
            raise bad(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if begin != end:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {end} (offsets must tile "
                      f"the buffer with no gap or overlap)")
        itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
        if stop - begin != math.prod(shape) * itemsize:
            raise bad(f"tensor {name!r} spans {stop - begin} bytes but shape {shape} x {dtype} "
                      f"needs {math.prod(shape) * itemsize}")
        if stop > buffer_len:
            raise bad(f"tensor {name!r} ends at byte {stop} past the {buffer_len}-byte buffer: truncated?")
        count = math.prod(shape)
        t = (torch.frombuffer(data, dtype=DTYPES[dtype], count=count, offset=start + begin)
             if count else torch.empty(0, dtype=DTYPES[dtype]))
        tensors[name], end = t.view(shape), stop
    if end != buffer_len:
        raise bad(f"{buffer_len - end} trailing bytes are not covered by any tensor")
    return tensors


def save_safetensors(tensors: dict, path, metadata: Optional[dict] = None):
    """Write tensors in the safetensors layout, atomically (temp file, then rename)."""
    names = {v: k for k, v in DTYPES.items()}
    header, offset, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        blob = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference pads the header to 8-byte alignment with spaces
    _atomic_write(path, struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _atomic_write(path, data: bytes):
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
