"""model.py: the BERT and DistilBERT encoders of the paper, and their checkpoints in the Hugging
Face layout (the file format and the Hub download are plumbing, in hub.py).

    from model import BERT, configure_optimizers
    m = BERT.from_pretrained("bert-base-uncased")  # a Hub repo id, or a local folder: ./out/student
    out = m(input_ids, attention_mask)             # .hidden_states, .logits, .pooler_output
    opt = configure_optimizers(m, lr=5e-4, weight_decay=0.01)

Paper section 2: the teacher is BERT-base (token-type embeddings, pooler, 12 layers); the student
has the same post-LN blocks (exact erf GELU) but "the token-type embeddings and the pooler are
removed and the number of layers is reduced by a factor of 2". Both have the MLM head, whose decoder
is tied to the word embeddings. One difference is in the reference code, not the paper: DistilBERT's
block has no dropout on the attention output, BERT's has. Module names are DistilBERT's (`q_lin`,
`ffn.lin1`, ...); the table CHECKPOINT_NAMES gives each one's name in both checkpoint layouts.
"""
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, atomic_write, writing
from hub import (LAYOUTS, checkpoint_folder, config_from_hf, config_to_hf, load_safetensors,
                 save_safetensors)


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
    pooler: bool = True              # tanh dense on [CLS]; from_pretrained: if the file has one
    mlm_head: bool = True            # MLM head present; sentence encoders ship without one
    dropout: float = 0.1             # on embeddings and sub-layer outputs
    attention_dropout: float = 0.1   # on the attention probabilities
    initializer_range: float = 0.02  # std of the normal init of fresh weights

    @staticmethod
    def preset(name: str) -> "BertConfig":
        """The published hyperparameters, so a model can be built without any download."""
        if name == "bert-base-uncased":
            return BertConfig()
        if name == "distilbert-base-uncased":
            return BertConfig(model_type="distilbert", n_layer=6, type_vocab_size=0, pooler=False)
        raise UserError(f"no preset {name!r}: use bert-base-uncased or distilbert-base-uncased")

    @staticmethod
    def from_hf(d: dict) -> "BertConfig":
        """From a Hugging Face config.json (its names translated and checked by hub.py)."""
        fields = config_from_hf(d)
        preset = {"bert": "bert-base-uncased", "distilbert": "distilbert-base-uncased"}
        return replace(BertConfig.preset(preset[fields["model_type"]]), **fields)

    def to_hf(self) -> dict:
        """config.json in the Hugging Face layout: *ForMaskedLM, or *Model without an MLM head."""
        return config_to_hf(asdict(self))


# ----------------------------------------------------------------------------- the network

@dataclass
class Output:
    hidden_states: tuple                      # embedding output, then (B, T, H) per layer
    logits: Optional[torch.Tensor]            # (B, T, V), or None
    pooler_output: Optional[torch.Tensor]     # (B, H), or None


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head, self.dropout_p = cfg.n_head, cfg.attention_dropout
        H = cfg.hidden_size
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(H, H) for _ in range(4))

    def forward(self, x, mask):
        B, T, H = x.shape
        hs = H // self.n_head
        q, k, v = (lin(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
                   for lin in (self.q_lin, self.k_lin, self.v_lin))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
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
        # BERT drops out the attention output (BertSelfOutput), DistilBERT's TransformerBlock not.
        self.attention_output_dropout = nn.Dropout(cfg.dropout)
        if cfg.model_type == "distilbert":
            self.attention_output_dropout = nn.Identity()
        self.ffn_output_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask):
        x = self.sa_layer_norm(x + self.attention_output_dropout(self.attention(x, mask)))
        return self.output_layer_norm(x + self.ffn_output_dropout(self.ffn(x)))


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = None
        if cfg.type_vocab_size:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids, token_type_ids):
        x = self.word_embeddings(input_ids)  # (B, T, H)
        if self.token_type_embeddings is not None and token_type_ids is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        elif self.token_type_embeddings is not None:  # no types given: all segment A, as BERT does
            x = x + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings.weight[:input_ids.shape[1]]
        return self.dropout(self.LayerNorm(x))


class BERT(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.source_dir = None  # the folder it was loaded from, for its tokenizer
        H = cfg.hidden_size
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.pooler = nn.Linear(H, H) if cfg.pooler else None  # tanh of it on [CLS]
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
        """The MLM head on any (..., H) tensor: callers may skip pad rows of the (V)-wide matmul."""
        return self.vocab_projector(self.vocab_layer_norm(F.gelu(self.vocab_transform(h))))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None,
                return_logits=True) -> Output:
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens is longer than the model's "
                             f"{self.config.max_position_embeddings} positions")
        # SDPA takes a boolean mask where True means "may attend"; (B, 1, 1, T) broadcasts over
        # heads and queries. No mask at all lets it pick its fastest kernel (batch 1, no padding).
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        hidden_states = [x]
        for block in self.layers:
            x = block(x, mask)
            hidden_states.append(x)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        logits = self.mlm_logits(x) if return_logits and self.config.mlm_head else None
        return Output(tuple(hidden_states), logits, pooled)

    def without_mlm_head(self) -> "BERT":
        """Drop the MLM head in place (task models and speed tests have none); returns the model."""
        if self.config.mlm_head:
            del self.vocab_transform, self.vocab_layer_norm, self.vocab_projector
        self.config = replace(self.config, mlm_head=False)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    # ------------------------------------------------------------------------- checkpoints

    def checkpoint_names(self) -> dict:
        """Our parameter name -> its name in a Hugging Face *ForMaskedLM file (CHECKPOINT_NAMES)."""
        column = LAYOUTS.index(self.config.model_type)
        names = {}
        for name, _ in self.named_parameters():  # the tied vocab_projector.weight is not listed
            module, leaf = name.rsplit(".", 1)
            layer = None
            if module.startswith("layers."):  # layers.3.ffn.lin1 -> layers.{i}.ffn.lin1, i = 3
                _, layer, rest = module.split(".", 2)
                module = "layers.{i}." + rest
            theirs = CHECKPOINT_NAMES[module][column]
            if theirs is None:
                raise ValueError(f"a {self.config.model_type} checkpoint has no {module}")
            theirs = theirs.format(i=layer)
            if module not in MLM_HEAD_MODULES:  # the encoder sits under bert. / distilbert.
                theirs = f"{self.config.model_type}.{theirs}"
            names[name] = f"{theirs}.{leaf}"
        return names

    @classmethod
    def from_pretrained(cls, name_or_dir: str, revision: str = "main", return_unused=False):
        """A local folder (any path: common.looks_like_path) or a Hub repo id -> BERT, in eval mode.
        With return_unused, tensors the encoder does not use (a fine-tuned task head) come back as
        (model, {name: tensor}) instead of being an error."""
        folder = checkpoint_folder(name_or_dir, revision)
        config_path, weights_path = folder / "config.json", folder / "model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise UserError(f"{path} is missing: a checkpoint folder needs config.json and "
                                f"model.safetensors (convert .bin weights to safetensors first)")
        try:
            cfg = BertConfig.from_hf(json.loads(config_path.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"{config_path} is not valid JSON ({e})") from None
        tensors = load_safetensors(weights_path)
        # BertModel and BertForMaskedLM files share one config.json: only the tensors say whether
        # the checkpoint has a pooler and an MLM head, so they decide which ones we build.
        pooler_keys = {"bert.pooler.dense.weight", "pooler.dense.weight"}
        mlm_head_keys = {"cls.predictions.transform.dense.weight", "vocab_transform.weight"}
        cfg = replace(cfg, pooler=cfg.model_type == "bert" and bool(pooler_keys & tensors.keys()),
                      mlm_head=bool(mlm_head_keys & tensors.keys()))
        model = cls(cfg)
        unused = model._copy_checkpoint_tensors(tensors, weights_path)
        if unused and not return_unused:
            raise UserError(f"{weights_path}: tensor {sorted(unused)[0]!r} is not used by a "
                            f"{cfg.model_type} model ({len(unused)} unused in all): is this the "
                            f"right checkpoint?")
        model.source_dir = folder
        return (model.eval(), unused) if return_unused else model.eval()

    def _copy_checkpoint_tensors(self, tensors: dict, path) -> dict:
        """Copy every parameter from its checkpoint tensor, checking names and shapes; returns the
        tensors left over (other than TENSORS_TO_SKIP)."""
        used = set()
        params = dict(self.named_parameters())
        layer_norms = {n for n, m in self.named_modules() if isinstance(m, nn.LayerNorm)}
        for ours, theirs in self.checkpoint_names().items():
            module, leaf = ours.rsplit(".", 1)
            candidates = [theirs, _without_encoder_prefix(theirs)]  # *ForMaskedLM or BertModel file
            if module in layer_norms:  # TF-era files (the real bert-base-uncased) say gamma/beta
                legacy = f"{theirs.rsplit('.', 1)[0]}.{LEGACY_LAYER_NORM_NAMES[leaf]}"
                candidates += [legacy, _without_encoder_prefix(legacy)]
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
        return {k: t for k, t in tensors.items() if k not in used and k not in TENSORS_TO_SKIP}

    def save_pretrained(self, out_dir, tensors=None, config=None):
        """config.json + model.safetensors (+ tokenizer files), loadable by the reference library.
        A task model passes its own tensors and config.json dict (the encoder's plus its head)."""
        out = Path(out_dir)
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        if tensors is None:
            state = self.state_dict()
            tensors = {theirs: state[ours] for ours, theirs in self.checkpoint_names().items()}
            if not self.config.mlm_head:  # a BertModel / DistilBertModel file: no encoder prefix
                tensors = {_without_encoder_prefix(k): t for k, t in tensors.items()}
        save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
        config_json = json.dumps(config or self.config.to_hf(), indent=2)
        atomic_write(out / "config.json", config_json.encode())
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
            src = Path(self.source_dir) / name if self.source_dir else None
            if src and src.is_file() and src.resolve() != (out / name).resolve():
                atomic_write(out / name, src.read_bytes())


CHECKPOINT_NAMES = {
    # our module: (its name in a BERT file, in a DistilBERT file); {i}: the layer; None: absent.
    # Encoder names get the prefix "bert." or "distilbert." in *ForMaskedLM files, the head's not.
    "embeddings.word_embeddings": ("embeddings.word_embeddings", "embeddings.word_embeddings"),
    "embeddings.position_embeddings": ("embeddings.position_embeddings",
                                       "embeddings.position_embeddings"),
    "embeddings.token_type_embeddings": ("embeddings.token_type_embeddings", None),
    "embeddings.LayerNorm": ("embeddings.LayerNorm", "embeddings.LayerNorm"),
    "layers.{i}.attention.q_lin": ("encoder.layer.{i}.attention.self.query",
                                   "transformer.layer.{i}.attention.q_lin"),
    "layers.{i}.attention.k_lin": ("encoder.layer.{i}.attention.self.key",
                                   "transformer.layer.{i}.attention.k_lin"),
    "layers.{i}.attention.v_lin": ("encoder.layer.{i}.attention.self.value",
                                   "transformer.layer.{i}.attention.v_lin"),
    "layers.{i}.attention.out_lin": ("encoder.layer.{i}.attention.output.dense",
                                     "transformer.layer.{i}.attention.out_lin"),
    "layers.{i}.sa_layer_norm": ("encoder.layer.{i}.attention.output.LayerNorm",
                                 "transformer.layer.{i}.sa_layer_norm"),
    "layers.{i}.ffn.lin1": ("encoder.layer.{i}.intermediate.dense",
                            "transformer.layer.{i}.ffn.lin1"),
    "layers.{i}.ffn.lin2": ("encoder.layer.{i}.output.dense", "transformer.layer.{i}.ffn.lin2"),
    "layers.{i}.output_layer_norm": ("encoder.layer.{i}.output.LayerNorm",
                                     "transformer.layer.{i}.output_layer_norm"),
    "pooler": ("pooler.dense", None),
    "vocab_transform": ("cls.predictions.transform.dense", "vocab_transform"),
    "vocab_layer_norm": ("cls.predictions.transform.LayerNorm", "vocab_layer_norm"),
    "vocab_projector": ("cls.predictions", "vocab_projector"),  # only its bias: the weight is tied
}
MLM_HEAD_MODULES = ("vocab_transform", "vocab_layer_norm", "vocab_projector")
LEGACY_LAYER_NORM_NAMES = {"weight": "gamma", "bias": "beta"}
POSITION_ID_BUFFERS = {"embeddings.position_ids", "bert.embeddings.position_ids",
                       "distilbert.embeddings.position_ids"}  # a saved arange, not a weight
TIED_DECODER_COPIES = {"cls.predictions.decoder.weight", "vocab_projector.weight"}  # = embeddings
NSP_HEAD = {"cls.seq_relationship.weight", "cls.seq_relationship.bias"}  # the paper drops NSP
TENSORS_TO_SKIP = POSITION_ID_BUFFERS | TIED_DECODER_COPIES | NSP_HEAD


def _without_encoder_prefix(key: str) -> str:
    """The name in a file saved from a bare BertModel / DistilBertModel: no "bert." prefix."""
    layout, _, rest = key.partition(".")
    return rest if layout in LAYOUTS else key


def configure_optimizers(module: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                         eps=1e-8) -> torch.optim.AdamW:
    """AdamW: weight decay on matrices and embeddings (dim >= 2), none on biases and LayerNorm."""
    params = [p for p in module.parameters() if p.requires_grad]  # frozen ones are left out
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel over all tensors; torch's CPU default loops over them, several times slower
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
