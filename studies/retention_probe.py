"""studies/retention_probe.py: how close each student of the retention study is to its teacher on
held-out text, before any fine-tuning (issue 9: why distillation adds what it adds).

    flock /tmp/tinydistil-cpu.lock python studies/retention_probe.py --data-dir DATA \
        --code /tmp/td-artifacts/code/3a6e82b7dbeb --teacher $T/model --students NAME=DIR,NAME=DIR

Paper section 2: distillation trains the student's last hidden states towards the teacher's (L_cos)
and its MLM head on masked tokens (L_mlm). On 256 WikiText-2 validation sequences of 127-128 tokens
(text no student trained on), masked as pretrain masks them, this measures per student: L_cos
against the float32 teacher over every real token, and L_mlm and top-1 accuracy of the student's
own MLM head over the masked tokens. --code is the exported project version the students were made
by (retention.py's clean copy), so the probe reads them with the same model code.
Appends one JSON line per student to --out (studies/retention_probe.jsonl).

--seq-len 512 --min-len 192 asks what the small recipe's 128-token sequences leave untrained: the
validation paragraphs of 192 tokens or more, whole, with each measure also split by position
(0-127, the positions every student trained; 128 on, which only a --seq-len 512 student did):

    ... --seq-len 512 --min-len 192 --students truncated=DIR,distilled-small=DIR,distilled-512=DIR
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", required=True, help="the project folder the students were made by")
    p.add_argument("--teacher", required=True, help="the teacher's checkpoint folder")
    p.add_argument("--students", required=True, help="comma-separated NAME=DIR pairs")
    p.add_argument("--data-dir", required=True, help="holds wikitext-2/wiki.valid.tokens")
    p.add_argument("--n-seqs", type=int, default=256, help="validation sequences, the first ones")
    p.add_argument("--seq-len", type=int, default=128, help="texts are cut into chunks this long")
    p.add_argument("--min-len", type=int, default=None,
                   help="shortest chunk kept; default seq-len - 1 (full-length chunks only)")
    p.add_argument("--out", default="studies/retention_probe.jsonl",
                   help="one JSON line per student")
    return p.parse_args()


def masked_batches(teacher, args, batch_size=16):
    """Validation chunks of at least --min-len tokens, masked as pretrain masks them:
    (input_ids, mask, labels) batches."""
    from corpus import data_dir, load_corpus
    from data import collate, load_tokenizer, mask_batch, mask_weights, special_ids
    tok = load_tokenizer(teacher.source_dir)
    ids = special_ids(tok)
    seqs = load_corpus("wikitext-2", tok, data_dir(args.data_dir), data_fraction=1.0,
                       seq_len=args.seq_len, split="valid")
    min_len = args.seq_len - 1 if args.min_len is None else args.min_len
    full = [i for i in range(len(seqs)) if seqs.lengths[i] >= min_len][:args.n_seqs]
    probs = mask_weights(seqs, teacher.config.vocab_size, ids.values())
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(0, len(full), batch_size):
        input_ids, mask = collate(seqs, full[i:i + batch_size], ids["pad"])
        masked, labels = mask_batch(input_ids, mask, probs, ids["mask"], teacher.config.vocab_size,
                                    gen)
        batches.append((masked, mask, labels))
    return batches


TRAINED_BY_EVERY_STUDENT = 128  # the small recipe's --seq-len: positions beyond it see no training


@torch.no_grad()
def probe(student, teacher, batches):
    """Held-out L_cos against the teacher (every real token) and the student's MLM loss and top-1
    accuracy on the masked tokens (when it has a head); each also over positions 0-127 and 128 on
    when the chunks are longer."""
    has_head = bool(student.config.mlm_head)
    cos, mlm, hit, late_token, late_masked, n_masked = [], [], [], [], [], 0
    for input_ids, mask, labels in batches:
        real = mask.bool()  # (B, T)
        positions = torch.arange(mask.shape[1]).expand_as(real)  # (B, T)
        late = positions[real] >= TRAINED_BY_EVERY_STUDENT  # (N,)
        t_h = teacher(input_ids, mask).hidden_states[-1][real]  # (N, H)
        s_h = student(input_ids, mask).hidden_states[-1][real]  # (N, H)
        cos.append(1 - F.cosine_similarity(s_h, t_h, dim=-1))
        late_token.append(late)
        predicted = labels[real] != -100  # (N,)
        n_masked += int(predicted.sum())
        if has_head:
            logits = student.mlm_logits(s_h[predicted])  # (M, V)
            gold = labels[real][predicted]
            mlm.append(F.cross_entropy(logits, gold, reduction="none"))
            hit.append((logits.argmax(-1) == gold).float())
            late_masked.append(late[predicted])
    cos, late_token = torch.cat(cos), torch.cat(late_token)
    line = {"heldout_L_cos": cos.mean().item(), "tokens": len(cos),
            "masked": n_masked,
            "heldout_L_mlm": torch.cat(mlm).mean().item() if has_head else None,
            "heldout_mlm_top1": torch.cat(hit).mean().item() if has_head else None}
    if late_token.any():
        line["by_position"] = by_position(cos, late_token, mlm, hit, late_masked, has_head)
    return line


def by_position(cos, late_token, mlm, hit, late_masked, has_head):
    """The probe's measures over positions 0-127 and 128 on."""
    out = {}
    for name, is_late in (("0-127", False), ("128+", True)):
        keep = late_token == is_late
        out[name] = {"L_cos": cos[keep].mean().item(), "tokens": int(keep.sum())}
        if has_head:
            keep = torch.cat(late_masked) == is_late
            out[name].update(L_mlm=torch.cat(mlm)[keep].mean().item(),
                             mlm_top1=torch.cat(hit)[keep].mean().item(), masked=int(keep.sum()))
    return out


def main():
    args = parse_args()
    sys.path.insert(0, args.code)  # the students' own model code, not the checkout being edited
    from model import BERT
    torch.manual_seed(0)
    teacher = BERT.from_pretrained(args.teacher).eval()
    batches = masked_batches(teacher, args)
    for pair in args.students.split(","):
        name, folder = pair.split("=", 1)
        t0 = time.time()
        student = BERT.from_pretrained(folder).eval()
        line = {"student": name, "dir": folder, "code": args.code, "seq_len": args.seq_len,
                **probe(student, teacher, batches), "seconds": round(time.time() - t0, 1)}
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
