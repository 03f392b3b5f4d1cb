"""studies/retention_sts_probe.py: how close each student of the STS-B retention study is to its
teacher on the text it trained on (WikiText-2) and on the text it is scored on (STS-B sentences),
with nothing trained (issue 17: why every loss recipe stops at the same zero-shot STS-B).

    flock /tmp/tinydistil-cpu.lock python studies/retention_sts_probe.py --data-dir DATA \
        --teacher $T/model --students truncated=DIR,default=DIR

Per student and text, against the float32 teacher, on clean input (as `eval --zero-shot` reads
it): the cosine distance 1 - cos(s, t) of the last hidden states, averaged over the [CLS] tokens,
the [SEP] tokens and the other (word) tokens apart, and the cosine distance of the mean-pooled
sentence embeddings (what zero-shot STS-B compares). The texts: the first --n-texts unique STS-B
dev sentences (median 14 tokens), and the first --n-texts WikiText-2 *validation* chunks of the
small recipe's 128 tokens (text no student trained on). Appends one JSON line per student to --out.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the teacher's checkpoint folder")
    p.add_argument("--students", required=True, help="comma-separated NAME=DIR pairs")
    p.add_argument("--data-dir", required=True, help="holds wikitext-2/ and glue/STS-B/")
    p.add_argument("--n-texts", type=int, default=512, help="texts of each kind, the first ones")
    p.add_argument("--out", default=str(ROOT / "studies" / "retention_sts_probe.jsonl"),
                   help="one JSON line per student")
    return p.parse_args()


def texts(teacher, args):
    """{"stsb": (input_ids, mask) batches of STS-B dev sentences, "wikitext": the same of
    WikiText-2 validation chunks}, 32 texts a batch."""
    from corpus import data_dir, load_corpus
    from data import collate, load_tokenizer, special_ids
    from tasks import glue
    tok = load_tokenizer(teacher.source_dir)
    ids = special_ids(tok)
    pairs = glue.load("stsb", "dev", args.data_dir)
    sentences = list(dict.fromkeys(s for e in pairs for s in (e.text_a, e.text_b)))
    encoded = [e.ids for e in tok.encode_batch(sentences[:args.n_texts])]
    wiki = load_corpus("wikitext-2", tok, data_dir(args.data_dir), data_fraction=1.0, seq_len=128,
                       split="valid")
    out = {"stsb": [], "wikitext": []}
    for i in range(0, len(encoded), 32):
        chunk = encoded[i:i + 32]
        width = max(map(len, chunk))
        input_ids = torch.tensor([e + [ids["pad"]] * (width - len(e)) for e in chunk])  # (B, T)
        out["stsb"].append((input_ids, (input_ids != ids["pad"]).long()))
    n_wiki = min(args.n_texts, len(wiki))
    for i in range(0, n_wiki, 32):
        out["wikitext"].append(collate(wiki, list(range(i, min(i + 32, n_wiki))), ids["pad"]))
    return out, ids


@torch.no_grad()
def distances(student, teacher, batches, ids):
    """Mean cosine distance to the teacher: by token kind, and of the mean-pooled embeddings."""
    sums = {"cls": [], "sep": [], "words": [], "pooled": []}
    for input_ids, mask in batches:
        s = student(input_ids, mask, return_logits=False).hidden_states[-1]  # (B, T, H)
        t = teacher(input_ids, mask, return_logits=False).hidden_states[-1]  # (B, T, H)
        d = 1 - F.cosine_similarity(s, t, dim=-1)  # (B, T)
        real = mask.bool()
        sums["cls"].append(d[input_ids == ids["cls"]])
        sums["sep"].append(d[input_ids == ids["sep"]])
        sums["words"].append(d[real & (input_ids != ids["cls"]) & (input_ids != ids["sep"])])
        m = mask[..., None].float()  # (B, T, 1)
        pooled = [(x * m).sum(1) / m.sum(1) for x in (s, t)]  # (B, H) each
        sums["pooled"].append(1 - F.cosine_similarity(*pooled, dim=-1))
    return {k: round(torch.cat(v).mean().item(), 4) for k, v in sums.items()}


def main():
    from model import BERT
    args = parse_args()
    teacher = BERT.from_pretrained(args.teacher).eval()
    batches, ids = texts(teacher, args)
    for pair in args.students.split(","):
        name, folder = pair.split("=", 1)
        t0 = time.time()
        student = BERT.from_pretrained(folder).eval()
        line = {"student": name, "dir": folder, "n_texts": args.n_texts,
                **{kind: distances(student, teacher, b, ids) for kind, b in batches.items()}}
        line["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(line), flush=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
