"""tasks/distil.py: the teacher side of distillation during fine-tuning, the paper's "(D)".

    python tinydistil.py eval sst2 --model out/student --out out/sst2-teacher   # or any task model
    python tinydistil.py eval sst2 --model out/student --teacher out/sst2-teacher --alpha-kd 0.5

Paper section 4.1, Table 2, "DistilBERT (D)": a second step of distillation during fine-tuning, the
teacher a model already fine-tuned on the task, as the reference run_squad_w_distillation.py (which
does it for SQuAD; here every task). The student's loss is

    (1 - alpha) * task loss + alpha * KD term        (alpha: --alpha-kd, T: --kd-temperature)

with the KD term from losses.py: T^2 * KL(softmax(teacher / T) || softmax(student / T)) on the
class logits (L_ce), the same on SQuAD's start and end distributions (L_kd_span), and the
squared distance to the teacher's score for STS-B's regression (L_kd_mse). The teacher is frozen
and runs without dropout, so finetune.py computes its logits for the training set once and reuses
them every epoch. Here: the checks that a teacher fits the task and the student, made on its
config.json and tokenizer before any data or weights are loaded; the choice of the teacher's
precision; the KD term for a head.
"""
import json

import data
from common import UserError
from hub import checkpoint_folder
from losses import L_ce, L_kd_mse, L_kd_span
from tasks.heads import head_of, task_head


def _describe(head):
    if head.qa:
        return "question answering (start/end logits)"
    return f"labels {list(head.labels)}" if head.labels else "a regression score"


def _same_head(head, wanted):
    """Same kind of head and the same labels in the same order; a checkpoint saved without label
    names (transformers' default LABEL_0, LABEL_1, ...) is taken at its word on the order."""
    if head.qa != wanted.qa or (head.labels is None) != (wanted.labels is None):
        return False
    if head.labels is None:
        return True
    unnamed = tuple(f"LABEL_{i}" for i in range(len(wanted.labels)))
    return head.labels in (tuple(wanted.labels), unnamed)


def check_teacher(name, task, student):
    """The teacher's folder, once its config.json and tokenizer show that it is fine-tuned on task
    (same head and labels) and reads the student's token ids (same vocabulary); else one line."""
    folder = checkpoint_folder(name)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--teacher {name}: cannot read its config.json ({e})") from None
    head, wanted = head_of(config, f"--teacher {name}"), task_head(task)
    if head.task not in (None, task):
        raise UserError(f"--teacher {name} was fine-tuned on {head.task}, not {task}: "
                        f"give a teacher fine-tuned on {task}")
    if not _same_head(head, wanted):
        raise UserError(f"--teacher {name} has a head for {_describe(head)}; {task} needs "
                        f"{_describe(wanted)}: give a teacher fine-tuned on {task}")
    teacher_vocab = data.load_tokenizer(folder).get_vocab()
    student_vocab = data.load_tokenizer(checkpoint_folder(student)).get_vocab()
    if teacher_vocab != student_vocab:
        raise UserError(f"--teacher {name} has another vocabulary ({len(teacher_vocab)} tokens) "
                        f"than the student {student} ({len(student_vocab)}): the two must read "
                        f"the same token ids")
    return folder


def kd_term(logits, teacher_logits, attention_mask, model, temperature):
    """The distillation term for the model's head (see the module docstring); teacher_logits has
    the shape of logits."""
    if model.qa:
        return L_kd_span(logits, teacher_logits, attention_mask, temperature)
    if model.labels is None:
        return L_kd_mse(logits[:, 0], teacher_logits[:, 0])
    return L_ce(logits, teacher_logits, temperature)
