"""glue.py: the nine GLUE tasks (section 4, Table 1 of the paper): the one task table, the official
tsv files, each task's metrics and the GLUE macro-score.

    from tasks import glue
    examples = glue.load("rte", "train")        # [Example(text_a, text_b, label), ...], file order
    glue.compute_metrics("rte", preds, labels)  # {"accuracy": ...}; ids follow TASKS["rte"].labels
    glue.glue_score({task: metrics, ...})       # Table 1's Score: the mean of the nine task scores

TASKS is the one list of the GLUE tasks; fine-tuning and the report iterate over it.
Files: <data_dir>/glue/<TASK>/{train,dev}.tsv (MNLI: dev_matched, dev_mismatched) as
download_glue_data.py lays them out (data_dir: --data-dir, $TINYDISTIL_DATA or
~/.cache/tinydistil), read with no network when present; else fetched as the task's zip under
GLUE_URL (extracted, then deleted), MRPC built as that script's format_mrpc does. Lines split
only on "\n", fields on tabs with quoting off (many texts hold `"`); columns by header name, but
CoLA has no header (label column 1, sentence 3); utf-8-sig for MRPC's byte-order mark. Label ids
follow Task.labels, as the Hugging Face glue datasets number them (MNLI: entailment 0, neutral 1,
contradiction 2); STS-B labels are float scores. QQP rows with missing fields are skipped, as every
GLUE loader does; in other tasks such a row means a damaged file.
"""

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np

import corpus
from common import ADVICE, UserError, atomic_write, write_error
from hub import fetch_url
from tasks import metrics

# Constants, so that a mirror or a test server can stand in.
GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/"
SENTEVAL_URL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/"


class Example(NamedTuple):
    text_a: str
    text_b: Optional[str]  # None for single-sentence tasks
    label: Union[int, float]  # class id, or the STS-B score


@dataclass(frozen=True)
class Task:
    dir: str  # folder under glue/
    zip: Optional[str]  # archive under GLUE_URL; None for MRPC, which is built from SentEval files
    text_a: Union[str, int]  # column name, or index for a file without header
    text_b: Union[str, int, None]
    label: Union[str, int]
    labels: Optional[tuple]  # label strings in id order; None means regression
    metrics: tuple  # what compute_metrics returns per dev split; task_score averages them all
    dev_splits: tuple = ("dev",)
    header: bool = True
    skip_malformed: bool = False

    @property
    def num_labels(self):
        return len(self.labels) if self.labels else 1


_01, _NLI = ("0", "1"), ("entailment", "not_entailment")
TASKS = {
    "cola": Task("CoLA", "CoLA.zip", 3, None, 1, _01, ("mcc",), header=False),
    "sst2": Task("SST-2", "SST-2.zip", "sentence", None, "label", _01, ("accuracy",)),
    "mrpc": Task("MRPC", None, "#1 String", "#2 String", "Quality", _01, ("accuracy", "f1")),
    "stsb": Task("STS-B", "STS-B.zip", "sentence1", "sentence2", "score", None,
                 ("pearson", "spearman")),
    "qqp": Task("QQP", "QQP-clean.zip", "question1", "question2", "is_duplicate", _01,
                ("accuracy", "f1"), skip_malformed=True),
    "mnli": Task("MNLI", "MNLI.zip", "sentence1", "sentence2", "gold_label",
                 ("entailment", "neutral", "contradiction"), ("accuracy",),
                 dev_splits=("dev_matched", "dev_mismatched")),
    "qnli": Task("QNLI", "QNLIv2.zip", "question", "sentence", "label", _NLI, ("accuracy",)),
    "rte": Task("RTE", "RTE.zip", "sentence1", "sentence2", "label", _NLI, ("accuracy",)),
    "wnli": Task("WNLI", "WNLI.zip", "sentence1", "sentence2", "label", _01, ("accuracy",)),
}
_METRICS = {"accuracy": metrics.accuracy, "f1": metrics.f1, "mcc": metrics.matthews_corrcoef,
            "pearson": metrics.pearson, "spearman": metrics.spearman}
_SPLIT_SUFFIX = {"dev_matched": "_m", "dev_mismatched": "_mm"}  # MNLI's two dev sets in one dict


def get(task):
    if task not in TASKS:
        raise UserError(f"unknown GLUE task {task!r}: use one of {', '.join(TASKS)}")
    return TASKS[task]


def compute_metrics(task, preds, labels, split="dev"):
    """Metrics of one dev split; MNLI's keys get _m (matched) or _mm (mismatched), so the two merge
    into one dict."""
    suffix = _SPLIT_SUFFIX.get(split, "")
    return {key + suffix: _METRICS[key](preds, labels) for key in get(task).metrics}


def task_score(task, results):
    """The one number per task that the paper's Table 1 shows (0-1): the mean of everything the
    task reports, i.e. CoLA MCC, STS-B mean of Pearson and Spearman, MRPC and QQP mean of F1 and
    accuracy, MNLI mean of matched and mismatched accuracy, accuracy elsewhere."""
    t = get(task)
    keys = [m + _SPLIT_SUFFIX.get(split, "") for split in t.dev_splits for m in t.metrics]
    missing = [k for k in keys if k not in results]
    if missing:
        raise UserError(f"{task} results lack {', '.join(missing)}: "
                        f"run the {task} evaluation again")
    return float(np.mean([results[k] for k in keys]))


def glue_score(results):
    """The paper's GLUE macro-score (0-1) from {task: metrics dict} holding all nine tasks: the
    plain average of their task scores."""
    missing = [t for t in TASKS if t not in results]
    if missing:
        raise UserError(f"the GLUE score needs all nine tasks; missing {', '.join(missing)}")
    return float(np.mean([task_score(t, results[t]) for t in TASKS]))


def load(task, split, data_dir=None):
    """The examples of one split ("train", "dev", or MNLI's "dev_matched"/"dev_mismatched"), in
    file order."""
    return _read(get(task), path(task, split, data_dir))


def path(task, split, data_dir=None):
    """The split's tsv, downloaded first when it is missing."""
    t = get(task)
    splits = ("train",) + t.dev_splits
    if split not in splits:
        raise UserError(f"{task} has no split {split!r}: use one of {', '.join(splits)}")
    root = corpus.data_dir(data_dir) / "glue"
    dest = root / t.dir / f"{split}.tsv"
    if not dest.exists():
        try:
            if t.zip is None:
                _build_mrpc(root / t.dir)
            else:
                _extract(fetch_url(GLUE_URL + t.zip, root / t.zip, desc=t.zip), root, t.dir)
        except UserError as e:  # say which file is missing: other splits may well be there
            raise UserError(f"{dest} is missing and could not be downloaded: {e}") from None
        if not dest.exists():
            raise UserError(f"the {task} download has no {dest.name}: put the file at {dest}")
    return dest


def _extract(archive, root, folder):
    """Move the files of archive's folder/ into root/folder/, keeping any already there."""
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            if isinstance(e, OSError) and e.errno in ADVICE:  # a full disk, not a bad archive
                raise write_error(root / folder, e, f"{archive} is kept") from None
            archive.unlink()
            raise UserError(f"{archive} is not a readable zip ({e}): deleted it, run again") from e
        for f in sorted((Path(tmp) / folder).rglob("*")):
            target = root / folder / f.relative_to(Path(tmp) / folder)
            if f.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, target)
    archive.unlink()


def _build_mrpc(folder):
    """train.tsv and dev.tsv from msr_paraphrase_train.txt: its header line (with the BOM) kept,
    rows whose (#1 ID, #2 ID) pair is in GLUE's dev ids go to dev, the others to train, fields
    stripped, file order."""
    name = "msr_paraphrase_train.txt"
    source = fetch_url(SENTEVAL_URL + name, folder / name)
    ids = fetch_url(GLUE_URL + "mrpc_dev_ids.tsv", folder / "dev_ids.tsv")
    dev_ids = {tuple(line.strip().split("\t"))
               for line in ids.read_text(encoding="utf-8").splitlines()}
    with open(source, encoding="utf-8") as f:
        header = f.readline()
        out = {"train": [header], "dev": [header]}
        for n, row in enumerate(f, start=2):
            fields = row.strip().split("\t")
            if len(fields) != 5:
                raise UserError(f"{source}:{n} has {len(fields)} fields, not 5: "
                                "delete the file and run again")
            split = "dev" if tuple(fields[1:3]) in dev_ids else "train"
            out[split].append("\t".join(fields) + "\n")
    for split, lines in out.items():
        atomic_write(folder / f"{split}.tsv", "".join(lines).encode("utf-8"))


def _read(t, path):
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(f, start=1)]
    rows = [(n, line.split("\t")) for n, line in lines if line]
    cols, width = (t.text_a, t.text_b, t.label), 4  # CoLA: source, label, author's mark, sentence
    if t.header:
        head = rows.pop(0)[1] if rows else []
        if not all(c is None or c in head for c in cols):
            raise UserError(f"{path} lacks the columns of GLUE {t.dir}: delete it and run again")
        cols, width = [None if c is None else head.index(c) for c in cols], len(head)
    a, b, y = cols
    examples = []
    for n, r in rows:
        if len(r) != width:
            if t.skip_malformed:
                continue
            raise UserError(f"{path}:{n} has {len(r)} fields, not {width}: the file is damaged, "
                            "delete it, run again")
        try:
            label = float(r[y]) if t.labels is None else t.labels.index(r[y])
        except ValueError:
            raise UserError(f"{path}:{n} has label {r[y]!r}, "
                            f"expected {t.labels or 'a number'}") from None
        examples.append(Example(r[a], None if b is None else r[b], label))
    return examples
