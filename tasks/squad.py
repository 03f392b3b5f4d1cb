"""squad.py: SQuAD v1.1 extractive question answering: loading, windows, span decoding, EM/F1.

    from tasks import squad
    examples = squad.load("dev")                  # [{"id", "question", "context", "answers"}, ...]
    feats = squad.features(examples, tokenizer)   # one dict per 384-token window
    ... a model gives start_logits, end_logits: one row per feature ...
    preds = squad.postprocess(examples, feats, start_logits, end_logits)   # {id: answer text}
    squad.evaluate(examples, preds)               # {"exact_match": 0-1, "f1": 0-1}

Files: <data_dir>/squad/{train,dev}-v1.1.json, downloaded from URL when missing. A window is
[CLS] question [SEP] context piece [SEP]; the question is cut to 64 tokens and consecutive context
pieces start `stride` tokens apart (doc_stride as in BERT's run_squad.py, which the paper's code
followed: windows overlap by the rest). The answer's characters are mapped to tokens through the
tokenizer's offsets; a window that does not hold the whole answer points at position 0, the [CLS]
token. Decoding takes the 20 best start and 20 best end positions of each window, keeps spans
inside the context with end >= start and at most 30 tokens whose start token has its maximal
context in that window (BERT's rule: the window where it is farthest from either edge, so a span
is not judged from a window that cuts its surroundings off), scores them by start + end logit, and
returns the best span over all windows of a question, cut from the original context by character
offsets.
Paper: section 4.1, Table 2 (SQuAD v1.1 dev EM/F1).
"""

import json

import numpy as np

import corpus
from common import UserError
from hub import fetch_url
from tasks import metrics

URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"


def load(split, data_dir=None):
    """Examples of train or dev in file order; answers are [{"text", "answer_start"}, ...] (dev
    has 1-6)."""
    if split not in ("train", "dev"):
        raise UserError(f"SQuAD has no split {split!r}: use train or dev")
    name = f"{split}-v1.1.json"
    path = fetch_url(URL + name, corpus.data_dir(data_dir) / "squad" / name, desc=name)
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        return [{"id": qa["id"], "question": qa["question"], "context": p["context"],
                 "answers": [{"text": a["text"], "answer_start": a["answer_start"]}
                             for a in qa["answers"]]}
                for article in articles for p in article["paragraphs"] for qa in p["qas"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a SQuAD v1.1 file ({e!r}): delete it, run again") from e


def _token_span(offsets, answer):
    """First and last context token covering the answer's characters, or None."""
    start, end = answer["answer_start"], answer["answer_start"] + len(answer["text"])
    first = next((k for k, (_, e) in enumerate(offsets) if e > start), None)
    last = next((k for k in range(len(offsets) - 1, -1, -1) if offsets[k][0] < end), None)
    return None if first is None or last is None or last < first else (first, last)


def _windows(n_tokens, room, stride):
    """(first context token, length) of each window over a context of n_tokens: windows of at most
    room tokens whose starts are stride apart, the last one reaching the end."""
    spans, start = [], 0
    while True:
        n = min(room, n_tokens - start)
        spans.append((start, n))
        if start + n >= n_tokens:
            return spans
        start += min(n, stride)


def _max_context(spans):
    """For each window, which of its tokens have their maximal context in it (BERT's
    _check_is_max_context): a token's score in a window is min(tokens left of it, tokens right of
    it) + 0.01 * window length, and the first window with the best score is its max context."""
    n_tokens = spans[-1][0] + spans[-1][1]
    best_score, best_window = np.full(n_tokens, -1.0), np.zeros(n_tokens, dtype=np.int64)
    for w, (start, n) in enumerate(spans):
        pos = np.arange(start, start + n)
        score = np.minimum(pos - start, start + n - 1 - pos) + 0.01 * n
        wins = score > best_score[pos]  # strictly better: on a tie the earlier window keeps it
        best_score[pos[wins]] = score[wins]
        best_window[pos[wins]] = w
    return [(best_window[start:start + n] == w).tolist() for w, (start, n) in enumerate(spans)]


def features(examples, tokenizer, max_len=384, stride=128, max_query_len=64):
    """One dict per window: example_index, input_ids, token_type_ids, offsets ((start, end)
    characters in the context for context tokens, None for the others), max_context (True where a
    context token has its maximal context in this window), start_position and end_position (first
    answer; 0 = [CLS])."""
    tokenizer.no_truncation()  # windows are cut here; a truncating tokenizer would cut contexts
    tokenizer.no_padding()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise UserError("the tokenizer has no [CLS] or [SEP] token: use a BERT WordPiece "
                        "tokenizer")
    questions = tokenizer.encode_batch([ex["question"] for ex in examples],
                                       add_special_tokens=False)
    unique = list(dict.fromkeys(ex["context"] for ex in examples))
    contexts = dict(zip(unique, tokenizer.encode_batch(unique, add_special_tokens=False)))
    feats = []
    for i, (ex, q) in enumerate(zip(examples, questions)):
        q_ids, ctx = q.ids[:max_query_len], contexts[ex["context"]]
        room = max_len - len(q_ids) - 3  # context tokens per window
        before = len(q_ids) + 2  # [CLS] question [SEP] before them
        if room < 1:
            raise UserError(f"max_len {max_len} leaves no room for the context after a "
                            f"{len(q_ids)}-token question")
        answer = _token_span(ctx.offsets, ex["answers"][0]) if ex["answers"] else None
        spans = _windows(len(ctx.ids), room, stride)
        for (start, n), max_context in zip(spans, _max_context(spans)):
            inside = answer is not None and start <= answer[0] and answer[1] < start + n
            feats.append({
                "example_index": i,
                "input_ids": [cls, *q_ids, sep, *ctx.ids[start:start + n], sep],
                "token_type_ids": [0] * before + [1] * (n + 1),
                "offsets": [None] * before + ctx.offsets[start:start + n] + [None],
                "max_context": [False] * before + max_context + [False],
                "start_position": answer[0] - start + before if inside else 0,
                "end_position": answer[1] - start + before if inside else 0,
            })
    return feats


def postprocess(examples, features, start_logits, end_logits, n_best=20, max_answer_len=30):
    """{example id: answer text}. A span may start only where its window is the start token's max
    context. Logit rows may be padded past their window; the padding is ignored."""
    if not len(features) == len(start_logits) == len(end_logits):
        raise ValueError(f"{len(features)} features but {len(start_logits)}/{len(end_logits)} "
                         "logit rows")
    best = {}  # example index -> (score, text)
    for f, s_row, e_row in zip(features, start_logits, end_logits):
        offsets, i = f["offsets"], f["example_index"]
        s_row = np.asarray(s_row, dtype=np.float64)[:len(offsets)]
        e_row = np.asarray(e_row, dtype=np.float64)[:len(offsets)]
        ends = np.argsort(-e_row, kind="stable")[:n_best]
        for s in np.argsort(-s_row, kind="stable")[:n_best]:
            if not f["max_context"][s]:  # also skips the question and special tokens
                continue
            for e in ends:
                if offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                    continue
                score = s_row[s] + e_row[e]
                if i not in best or score > best[i][0]:
                    best[i] = (score, examples[i]["context"][offsets[s][0]:offsets[e][1]])
    return {ex["id"]: best[i][1] if i in best else "" for i, ex in enumerate(examples)}


def evaluate(examples, predictions):
    """The official v1.1 scores, as fractions (the script prints percent); a question without a
    prediction scores 0."""
    em, f1 = [], []
    for ex in examples:
        truths = [a["text"] for a in ex["answers"]]
        pred = predictions.get(ex["id"])
        em.append(0.0 if pred is None else metrics.squad_em(pred, truths))
        f1.append(0.0 if pred is None else metrics.squad_f1(pred, truths))
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1))}
