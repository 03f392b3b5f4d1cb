"""tasks/heads.py: an encoder with the task head of the reference library's task classes.

    from tasks.heads import TaskModel, task_head
    model = TaskModel(BERT.from_pretrained("out/student"), *task_head("rte"), task="rte")
    logits = model(input_ids, attention_mask, token_type_ids)   # (B, 2)
    model.save_pretrained("out/rte"); TaskModel.from_pretrained("out/rte")

Paper section 4 and 4.1: every model is fine-tuned per task with the heads of the reference
classes, so a saved model loads in transformers unchanged: a BERT checkpoint classifies its tanh
pooler output (BertForSequenceClassification; a checkpoint without pooler gets a fresh one), a
DistilBERT/student its [CLS] state through pre_classifier, ReLU, dropout 0.2 and classifier
(DistilBertForSequenceClassification); STS-B is a 1-output regression; SQuAD puts start/end logits
on every token (qa_outputs). config.json records the labels (id2label) and the task
(finetuning_task, a standard field of the reference configs), so a teacher for another task is
told apart (tasks/distil.py).
"""
import json
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from common import UserError
from model import BERT
from tasks import glue, imdb

SEQ_CLASSIF_DROPOUT, QA_DROPOUT = 0.2, 0.1  # DistilBERT's defaults; hub's config_to_hf writes them


def tokenizer_for(encoder: BERT):
    """The tokenizer saved beside an encoder's checkpoint (fine-tuning and zero-shot both read
    text with it)."""
    if encoder.source_dir is None:
        raise UserError("this model was built without a checkpoint folder, so it has no "
                        "tokenizer: save_pretrained it and load it back, or give a folder")
    return data.load_tokenizer(encoder.source_dir)


class Head(NamedTuple):
    labels: Optional[tuple]  # label names in id order; None for regression or QA
    qa: bool                 # start/end logits per token instead of one row per input
    task: Optional[str] = None  # the task it was fine-tuned on, when the checkpoint says


def task_head(task) -> Head:
    """The head a task needs: GLUE's labels (None: STS-B's regression), IMDb's, SQuAD's spans."""
    if task == "squad":
        return Head(None, True, task)
    if task == "imdb":
        return Head(imdb.LABELS, False, task)
    return Head(glue.TASKS[task].labels, False, task)


def head_of(hf_config: dict, name) -> Head:
    """The head a fine-tuned checkpoint's config.json describes; name is for the message."""
    arch = (hf_config.get("architectures") or ["an encoder"])[0]
    if not arch.endswith(("ForSequenceClassification", "ForQuestionAnswering")):
        raise UserError(f"{name} is {arch}, not a fine-tuned task model: make one with "
                        f"`python tinydistil.py eval TASK --out DIR`")
    task = hf_config.get("finetuning_task")
    if arch.endswith("ForQuestionAnswering"):
        return Head(None, True, task)
    id2label = hf_config.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
    if hf_config.get("problem_type") == "regression" or len(id2label) == 1:
        return Head(None, False, task)
    return Head(tuple(id2label[str(i)] for i in range(len(id2label))), False, task)


class TaskModel(nn.Module):
    """An encoder plus the task head of the reference *ForSequenceClassification/
    *ForQuestionAnswering. labels: label names (classification), None for regression (1 output);
    qa: start/end logits instead; task: recorded in the saved config.json."""

    def __init__(self, encoder: BERT, labels=None, qa=False, task=None):
        super().__init__()
        H = encoder.config.hidden_size
        self.bert = encoder.config.model_type == "bert"
        self.labels = None if qa or labels is None else list(labels)
        self.qa, self.task = qa, task
        # The reference classes have no MLM head, and BertForQuestionAnswering no pooler; a
        # classifier on a BERT saved without pooler gets a fresh one.
        encoder.without_mlm_head()
        fresh = []
        has_pooler = self.bert and not qa
        if has_pooler and encoder.pooler is None:
            encoder.pooler = nn.Linear(H, H)
            fresh.append(encoder.pooler)
        if not has_pooler:
            encoder.pooler = None
        encoder.config = replace(encoder.config, pooler=has_pooler)
        self.encoder = encoder
        if qa:
            self.dropout = nn.Dropout(0.0 if self.bert else QA_DROPOUT)
            self.qa_outputs = nn.Linear(H, 2)
        else:
            if not self.bert:
                self.pre_classifier = nn.Linear(H, H)
            self.dropout = nn.Dropout(encoder.config.dropout if self.bert else SEQ_CLASSIF_DROPOUT)
            self.classifier = nn.Linear(H, len(self.labels) if self.labels else 1)
        for m in fresh + [m for n, m in self.named_children() if n != "encoder"]:
            if isinstance(m, nn.Linear):  # as the reference's _init_weights
                nn.init.normal_(m.weight, std=encoder.config.initializer_range)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Logits: (B, num_labels), (B, 1) for regression, (B, T, 2) start/end for QA. Token types
        are dropped for models without them (the student), so callers may always pass them."""
        types = token_type_ids if self.encoder.config.type_vocab_size else None
        out = self.encoder(input_ids, attention_mask, types, return_logits=False)
        if self.qa:
            return self.qa_outputs(self.dropout(out.hidden_states[-1]))
        if self.bert:
            return self.classifier(self.dropout(out.pooler_output))
        cls = out.hidden_states[-1][:, 0]  # (B, H): the [CLS] state
        return self.classifier(self.dropout(F.relu(self.pre_classifier(cls))))

    def save_pretrained(self, out):
        """config.json + model.safetensors (+ tokenizer files) in the reference task layout."""
        enc = self.encoder.state_dict()
        tensors = {theirs: enc[ours] for ours, theirs in self.encoder.checkpoint_names().items()}
        head = {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}
        tensors.update(head)
        config = self.encoder.config.to_hf()
        kind = "QuestionAnswering" if self.qa else "SequenceClassification"
        config["architectures"] = [("Bert" if self.bert else "DistilBert") + "For" + kind]
        if self.task:
            config["finetuning_task"] = self.task
        if not self.qa:
            names = self.labels or ["LABEL_0"]
            kind = "single_label_classification" if self.labels else "regression"
            config.update(id2label=dict(enumerate(names)), problem_type=kind,
                          label2id={n: i for i, n in enumerate(names)})
        self.encoder.save_pretrained(out, tensors, config)

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """A folder (or Hub id) written by save_pretrained or by the reference task classes."""
        encoder, unused = BERT.from_pretrained(name_or_dir, return_unused=True)
        head = head_of(json.loads((encoder.source_dir / "config.json").read_text()), name_or_dir)
        model = cls(encoder, head.labels, head.qa, head.task)
        own = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
        if set(own) != set(unused):
            raise UserError(f"{name_or_dir}: its head needs the tensors {sorted(own)}, "
                            f"the file has {sorted(unused)}")
        with torch.no_grad():
            for k, v in own.items():
                if v.shape != unused[k].shape:
                    raise UserError(f"{name_or_dir}: {k} has shape {list(unused[k].shape)}, "
                                    f"config.json implies {list(v.shape)}")
                v.copy_(unused[k].float())
        return model.eval()
