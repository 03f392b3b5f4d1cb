"""harness.py: the training run's harness, everything `tinydistil.py pretrain` needs around the
method: the processes (one, or DDP under torchrun), the output folder and its lock, checkpoints and
the random streams they carry, SIGTERM, and the log with its MFU. None of it is in the paper; it is
what makes a run of the paper's section 3 safe to stop, resume and read. Not run on its own:

    from harness import claim_out_dir, start_processes, save_checkpoint, TrainLog

bench.py and the studies take the MFU peak, the FLOP counts and the AdamW settings from here, so
the numbers they report are the ones `pretrain` logs.
"""
import contextlib
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from common import (LOCK_FILE, FolderLock, UserError, append_line, atomic_write, check_free_space,
                    has_bfloat16_matmul, pick_device, sync, write_error)
from model import BERT
from svg import line_panel, page
from tasks.zero_shot import copy_sentence_transformers_files

# AdamW as the reference's distiller.py: betas 0.9/0.98, eps 1e-6 (BERT's 0.999 and 1e-8 otherwise).
ADAMW_BETAS = (0.9, 0.98)
ADAMW_EPS = 1e-6
# A prime far above any number of ranks or steps: seeds made as SEED_STRIDE * seed + rank (+ step)
# never coincide between two (seed, rank) pairs, so every stream of every rank is its own.
SEED_STRIDE = 1_000_003


# ----------------------------------------------------------------------------- processes

@dataclass
class Distributed:
    """This run's processes: which one this is (rank 0 writes the files and the log), how many,
    and its device."""
    rank: int
    world: int
    device: torch.device
    host: object = None  # a gloo group of the same processes, for what happens on the host

    def say(self, *args, **kwargs):
        """print() on rank 0; the other ranks keep silent, so each line is said once."""
        if self.rank == 0:
            print(*args, **kwargs)

def start_processes(device_name: str, timeout_minutes: float = 360.0) -> Distributed:
    """DDP when launched by torchrun (one process per GPU: nccl; on CPU: gloo), else one process.
    Beside it a gloo group for the host's own waits, which never wait for a GPU: the ranks waiting
    for rank 0 to prepare the data (with its own timeout: a large corpus takes longer than NCCL's
    10 minutes), the SIGTERM flag, the random states gathered for a checkpoint."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Distributed(0, 1, pick_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":  # NCCL and all_gather_object use the current device: one GPU per rank
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    host = torch.distributed.new_group(backend="gloo",
                                       timeout=datetime.timedelta(minutes=timeout_minutes))
    return Distributed(rank, world, device, host)


def wait_for_everyone(dist: Distributed, timeout_minutes: float):
    """A barrier on the host group: one line if a rank waited past --ddp-timeout."""
    try:
        torch.distributed.barrier(group=dist.host)
    except RuntimeError as e:  # gloo's timeout (DistBackendError is a RuntimeError)
        raise UserError(f"rank {dist.rank} waited --ddp-timeout {timeout_minutes:g} minutes for "
                        f"the other processes (rank 0 loads the teacher and tokenises the corpus "
                        f"first): give a longer --ddp-timeout ({str(e).splitlines()[0]})") from None


def stop_processes(dist: Distributed):
    """The end of a run: every rank leaves together, and the process groups are torn down."""
    if dist.world > 1:  # rank 0 may still be saving; tearing gloo down under it aborts the others
        torch.distributed.barrier(group=dist.host)
    if dist.host is not None:  # torchrun, one process or more
        torch.distributed.destroy_process_group()


def rank_0_first(dist: Distributed, timeout_minutes: float, work):
    """work() on rank 0 first, then on the other ranks: rank 0 writes a cache (the tokenised
    corpus) that the others then only read. Returns what work() returned on this rank."""
    result = work() if dist.rank == 0 else None
    if dist.world > 1:
        wait_for_everyone(dist, timeout_minutes)
        if dist.rank != 0:
            result = work()
        wait_for_everyone(dist, timeout_minutes)
    return result


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, or the model itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool):
    """DDP's no_sync() on micro-batches whose gradients are only accumulated, else nothing."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the output folder

RUN_MARKER = "tinydistil-run.json"  # marks --out as ours: --overwrite replaces only our own files
RUN_FILES = (RUN_MARKER, "checkpoints", "train_log.jsonl", "train_log.svg", "model.safetensors",
             "config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json")
# what a sentence-transformers teacher's student carries (tasks/zero_shot.py), replaced as well
RUN_FILES += ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
              "1_Pooling", "2_Normalize")
RESUMABLE_CHANGES = {"resume", "overwrite", "log_every", "save_every", "device", "data_dir",
                     "ddp_timeout"}


class claim_out_dir:
    """`with claim_out_dir(cfg, out, master):` --out must be new, empty, or a tinydistil run of its
    own (then --resume or --overwrite): a user's files are never overwritten. The run holds a lock
    on --out until it ends (common.FolderLock), taken before anything in it is checked or
    replaced: a second run, --resume or --overwrite of a running run is refused. The folder is
    created and written to before the teacher loads, so a bad path fails in a second, not after
    the run; if the run then fails before its first complete checkpoint, a folder this call
    created is removed."""

    def __init__(self, cfg, out: Path, master: bool):
        self.out, self.created, self.lock = out, False, None
        if master:
            self.created = not out.exists()
            if out.exists() and not out.is_dir():
                raise UserError(f"--out {out} is a file: give a new or empty folder")
            self.lock = FolderLock(out)
            try:
                check_out_dir(cfg, out)
                sweep_leftovers(out)
                marker = json.dumps({"config": asdict(cfg)}, indent=1)
                atomic_write(out / RUN_MARKER, marker.encode(), "give a folder you can write to")
            except BaseException:
                self.__exit__(UserError, None, None)
                raise

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if self.lock is None:
            return
        if kind is not None and self.created and not (self.out / "checkpoints" / "latest").exists():
            shutil.rmtree(self.out, ignore_errors=True)  # under the lock: no one else is in it
        self.lock.release()


def sweep_leftovers(out: Path):
    """What a killed run left half-written (atomic_write's *.tmp files, a checkpoint's
    step-N.tmp): removed once this run holds the lock, so no other process can be writing it."""
    for path in [*out.glob("*.tmp"), *(out / "checkpoints").glob("*.tmp")]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_out_dir(cfg, out: Path):
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a new or empty folder")
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    ours = RUN_MARKER in entries
    if entries and not ours:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UserError(f"--out {out} holds files that are not a tinydistil run ({shown}): give a "
                        f"new or empty folder")
    latest = out / "checkpoints" / "latest"
    if cfg.resume and not latest.is_file():
        again = ": start it again with --overwrite" if ours else ""
        raise UserError(f"--resume: {out} has no complete checkpoint to continue from{again}")
    if ours and not (cfg.resume or cfg.overwrite):
        held = f"checkpoint {latest.read_text().strip()}" if latest.is_file() else "a student"
        raise UserError(f"{out} already holds a tinydistil run ({held}): pass --resume to continue "
                        f"it, --overwrite to replace it, or choose another --out")
    if ours and cfg.overwrite:
        replaced = [name for name in RUN_FILES if (out / name).exists()]
        print(f"--overwrite: replacing {', '.join(replaced)} in {out}")
        for name in replaced:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


# ----------------------------------------------------------------------------- checkpoints

def resume_command() -> str:
    """The command line of this run with --resume: what a stopped run tells the user to type."""
    args = sys.argv[1:] if "--resume" in sys.argv else sys.argv[1:] + ["--resume"]
    return shlex.join(["python", Path(sys.argv[0]).name, *args])


def read_train_log(path: Path) -> list:
    """train_log.jsonl as dicts; a line cut short (a run killed mid-write) is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def write_train_log_svg(out: Path):
    """--out/train_log.svg from train_log.jsonl: each loss term, the learning rate and the MFU
    against the step, one panel each (svg.py); rewritten at every checkpoint."""
    rows = read_train_log(out / "train_log.jsonl")

    def column(key):
        return [(row["step"], row.get(key)) for row in rows]
    mfu = [(step, None if v is None else 100 * v) for step, v in column("mfu")]
    panels = [line_panel(title, {key: column(key)}, "step") for title, key in (
        ("loss (weighted sum)", "loss"), ("L_ce (soft targets)", "loss_ce"),
        ("L_mlm (masked LM)", "loss_mlm"), ("L_cos (hidden states)", "loss_cos"))]
    panels += [line_panel("learning rate", {"lr": column("lr")}, "step", from_zero=True),
               line_panel("MFU, %", {"mfu": mfu}, "step", from_zero=True,
                          empty="MFU unknown (no native bfloat16)")]
    title = f"{out}: distillation, {len(rows)} log lines"
    atomic_write(out / "train_log.svg", page(panels, columns=3, title=title).encode())


def save_checkpoint(out: Path, student, opt, step, data_position, mask_gen, cfg, dist):
    """checkpoints/step-N/ (the student + train_state.pt) is written under a temporary name and
    renamed when complete, then checkpoints/latest points at it: a kill at any moment leaves the
    previous checkpoint whole. The student is also saved at the top of --out for `eval`."""
    device = dist.device  # dropout on a GPU draws from the device's generator; masking on the host
    rng = {"torch": [torch.get_rng_state()], "mask": [mask_gen.get_state()],
           "cuda": [torch.cuda.get_rng_state(device) if device.type == "cuda" else None],
           "device": [device.type]}
    if dist.world > 1:  # every rank has its own dropout and masking streams
        gathered = [None] * dist.world
        torch.distributed.all_gather_object(gathered, rng, group=dist.host)
        rng = {k: [g[k][0] for g in gathered] for k in rng}
    if dist.rank != 0:
        return
    ckpts = out / "checkpoints"
    final, tmp = ckpts / f"step-{step}", ckpts / f"step-{step}.tmp"
    latest = ckpts / "latest"
    advice = "nothing was saved: run again once there is space"
    if latest.is_file():
        advice = (f"the last complete checkpoint, {latest.read_text().strip()}, is kept: continue "
                  f"with {resume_command()} once there is space")
    try:  # a full disk: the half-written checkpoint goes, the last complete one stays
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp)
        state = {"step": step, "data_position": data_position, "optimizer": opt.state_dict(),
                 "rng": rng, "config": asdict(cfg)}
        atomic_write(tmp / "train_state.pt", lambda f: torch.save(state, f))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(latest, final.name.encode())
    except OSError as e:
        raise write_error(final, e, advice) from None
    except UserError as e:  # atomic_write's line, and what --resume can still use
        raise UserError(f"{e}; {advice}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in ckpts.glob("step-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    student.save_pretrained(out)
    write_train_log_svg(out)
    save_sentence_transformers_files(student, out)


def check_checkpoint_space(out: Path, student):
    """Before the first step: a checkpoint holds the student and AdamW's two moments (3 copies of
    the weights), and the student at the top of --out is replaced beside itself (1 more)."""
    weights = sum(p.numel() * p.element_size() for p in student.parameters())
    check_free_space(out, 4 * weights, "a checkpoint",
                     "free some space or choose another --out before training")


def save_sentence_transformers_files(student, out: Path):
    """A sentence-transformers teacher gives a sentence-transformers student: its modules.json,
    pooling and settings are copied beside the student, so SentenceTransformer(out) loads it and
    pools as the teacher (and as `eval stsb --zero-shot` scores it)."""
    copy_sentence_transformers_files(student.source_dir, out)


def read_checkpoint(cfg, out: Path, world: int) -> dict:
    """The last complete checkpoint's train_state, after checking it belongs to this very run."""
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    try:
        # On the host whatever device saved it: restore_checkpoint moves the optimizer's state
        # to this run's device (another GPU, the CPU), and no rank fills GPU 0 with rank 0's.
        state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"--resume: cannot read {ckpt / 'train_state.pt'} ({e})") from None
    saved = state["config"]
    if len(state["rng"]["torch"]) != world:
        raise UserError(f"--resume: {out} was trained by {len(state['rng']['torch'])} processes, "
                        f"this run has {world}: resume with the same number")
    changed = [k for k, v in asdict(cfg).items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:  # the step count sets the lr schedule, the seed the masks: all must match
        raise UserError(f"--resume: {out} was trained with other settings ("
                        + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} not {getattr(cfg, k)}"
                                    for k in changed) + "): pass the same arguments")
    return {**state, "dir": ckpt}


def restore_checkpoint(state, student, opt, mask_gen, dist, seed: int, out: Path, master: bool):
    """Weights, optimizer, random streams and data position of a checkpoint: the run continues
    bit for bit as if never stopped (on CUDA, see the README). Log lines written after the
    checkpoint are dropped. Returns (step, data position, a line to show or "")."""
    student.load_state_dict(BERT.from_pretrained(str(state["dir"])).state_dict())
    opt.load_state_dict(state.pop("optimizer"))  # its tensors go to the parameters' device
    note = restore_random_streams(state["rng"], dist.rank, dist.device, mask_gen, seed,
                                  state["step"])
    log_path = out / "train_log.jsonl"
    if master and log_path.is_file():
        kept = [row for row in read_train_log(log_path) if row["step"] <= state["step"]]
        atomic_write(log_path, "".join(json.dumps(row) + "\n" for row in kept).encode())
    return state["step"], state["data_position"], note


def masking_stream(seed: int, rank: int) -> torch.Generator:
    """Masking draws from its own random stream, apart from dropout's, on the host: the same masks
    on any device, and a checkpoint can carry it over between a CPU and a GPU."""
    return torch.Generator().manual_seed(SEED_STRIDE * (seed + 1) + rank)


def restore_random_streams(rng: dict, rank: int, device: torch.device, mask_gen, seed: int,
                           step: int) -> str:
    """The host's stream and masking's (a host generator) carry over from any device. Dropout on
    a GPU draws from the GPU's generator, which carries over between GPUs; but a CPU's and a GPU's
    streams are different generators, so resuming across the two continues dropout on this
    device's stream (on a GPU, seeded from --seed and the step) and returns a line saying so."""
    saved = rng.get("device", [None])[rank] or ("cpu" if rng["cuda"][rank] is None else "cuda")
    torch.set_rng_state(rng["torch"][rank])
    note = ""
    if "device" in rng or saved == "cpu":  # before "device" was saved, masking ran on the device
        mask_gen.set_state(rng["mask"][rank])
    else:
        mask_gen.manual_seed(SEED_STRIDE * (seed + 1) + rank + 7919 * step)
        note = ("the masking stream (saved by a GPU's generator) is reseeded from --seed and "
                "the step")
    if saved == device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"][rank], device)
    elif saved != device.type:
        if device.type == "cuda":
            torch.cuda.manual_seed(SEED_STRIDE * (seed + rank) + step)
        note = (f"--resume on {device.type} from a checkpoint made on {saved}: the weights, the "
                f"optimizer, the data position{'' if note else ' and the masking stream'} carry "
                f"over, dropout draws from {device.type}'s own random stream (it cannot carry "
                f"over between a CPU and a GPU), so the run continues, not bit for bit"
                + (f"; {note}" if note else ""))
    return note


# ----------------------------------------------------------------------------- signals

class Preempted(Exception):
    """SIGTERM arrived: the run saved a checkpoint and stops; main() exits with 128 + the signal."""


class StopSignal:
    """SIGTERM (what a cluster sends before preemption) lets the current step finish; the loop then
    saves a checkpoint and stops. Under DDP every rank must agree, so the flag is all-reduced."""

    def __init__(self):
        self.received = False
        self.previous = signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        self.received = True

    def agreed(self, dist: Distributed) -> bool:
        if dist.world == 1:
            return self.received
        flag = torch.tensor([float(self.received)])  # on the host: the GPU's queue runs on
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=dist.host)
        return bool(flag.item())

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


# ----------------------------------------------------------------------------- the log and MFU

_PEAKS = {}


def peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """FLOP/s of the best of several large square matmuls: the denominator of MFU (no vendor table,
    CPU included), or None for bfloat16 where it is emulated. Measured once per process."""
    if dtype == torch.bfloat16 and not has_bfloat16_matmul(device):
        return None
    if (device, dtype) not in _PEAKS:
        n = 8192 if device.type == "cuda" else 2048  # a GPU runs 4096 in 0.2 ms: timer-bound
        numbers = torch.Generator(device).manual_seed(0)  # not the global stream: resume replays it
        a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=numbers) for _ in range(2))
        best = float("inf")
        with torch.inference_mode():
            for _ in range(4):  # the first warms up; the best of the rest is the least disturbed
                sync(device)
                t0 = time.perf_counter()
                a @ b
                sync(device)
                best = min(best, time.perf_counter() - t0)
        _PEAKS[(device, dtype)] = 2 * n ** 3 / best
    return _PEAKS[(device, dtype)]


def flops_per_token(cfg, seq_len: int, with_head: bool) -> float:
    """Model FLOPs of one token's forward: 2 per multiply-add in the layers' matmuls, attention's
    two (T x T) products, and the vocabulary head when a loss needs it on every row (L_ce)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    layer = 2 * (4 * H * H + 2 * H * I) + 2 * 2 * seq_len * H
    return cfg.n_layer * layer + (2 * (H * H + H * cfg.vocab_size) if with_head else 0)


class TrainLog:
    """One `|`-separated line per log interval: step, loss terms, lr, grad norm, ms/step, tokens/s,
    MFU and ETA, also appended to --out/train_log.jsonl; a tqdm bar over the steps (rank 0 only).
    MFU = model FLOPs done / (seconds x peak FLOP/s of each model's dtype); the teacher runs forward
    only, the student forward and backward (3x). The peak is the best matmul speed seen so far."""

    def __init__(self, cfg, models, dtypes, dist, total_steps, step):
        self.cfg, self.models, self.dtypes, self.dist = cfg, models, dtypes, dist
        self.total, self.logged_at, self.peak_scale = total_steps, step, 1.0
        self.peaks = [peak_flops(dist.device, dtype) for dtype in dtypes]
        self.path = Path(cfg.out) / "train_log.jsonl"
        self.bar = tqdm(total=total_steps, initial=step, unit="step", disable=dist.rank != 0,
                        dynamic_ncols=True, leave=False)
        self.reset()

    def reset(self):
        self.loss_sums, self.tokens, self.seconds_at_peak = {}, 0, 0.0
        self.t0 = time.perf_counter()

    def add(self, loss, terms, n_tokens: int, seq_len: int):
        """After each micro-batch: its loss terms (a step's is the mean of its micro-batches'; a
        log line shows the mean over its steps), tokens and FLOPs."""
        for name, value in {"loss": loss, **terms}.items():  # summed on the device, read per line
            step_share = value.detach() / self.cfg.grad_accum
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + step_share
        self.tokens += n_tokens * self.dist.world
        with_head = self.cfg.alpha_ce > 0
        for model, peak, passes in zip(self.models, self.peaks, (1, 3)):
            flops = passes * n_tokens * flops_per_token(model.config, seq_len, with_head)
            self.seconds_at_peak += flops / peak if peak else float("nan")

    def step(self, step: int, lr: float, grad_norm: torch.Tensor):
        self.bar.update()
        if step % self.cfg.log_every and step != self.total:
            return
        # The one read of the device per log line (each .item() in the loop would stall it).
        names = list(self.loss_sums)
        values = torch.stack([self.loss_sums[k] for k in names] + [grad_norm.float()]).tolist()
        grad_norm, sums = values.pop(), dict(zip(names, values))
        sync(self.dist.device)
        seconds, n_steps = time.perf_counter() - self.t0, step - self.logged_at
        ms = 1000 * seconds / n_steps
        self.peak_scale = max(self.peak_scale, self.seconds_at_peak / seconds)  # never above 100%
        mfu = self.seconds_at_peak / seconds / self.peak_scale
        names = ("loss", "ce", "mlm", "cos", "hid", "pool")
        means = {k: sums.get(k, 0.0) / n_steps for k in names}
        rec = {"step": step, "loss": means["loss"], "loss_ce": means["ce"],
               "loss_mlm": means["mlm"], "loss_cos": means["cos"], "loss_hid": means["hid"],
               "loss_pool": means["pool"], "lr": lr,
               "grad_norm": grad_norm, "ms_per_step": ms,
               "tokens_per_s": self.tokens / seconds, "mfu": None if math.isnan(mfu) else mfu}
        eta = time.strftime("%H:%M:%S", time.gmtime(ms / 1000 * (self.total - step)))
        shown = ("ce", "mlm", "cos") + tuple(k for k in ("hid", "pool")  # the head-less terms
                                             if getattr(self.cfg, "alpha_" + k) > 0)
        terms = " | ".join(f"{k} {rec['loss_' + k]:.4f}" for k in shown)
        mfu_text = f"MFU {100 * mfu:.1f}%"
        if rec["mfu"] is None:
            mfu_text = "MFU unknown (no native bfloat16)"
        if self.dist.rank == 0:
            self.bar.write(f"step {step:5d}/{self.total} | loss {rec['loss']:.4f} | {terms} | "
                           f"lr {lr:.2e} | grad norm {grad_norm:.3f} | {ms:.0f} ms/step | "
                           f"{rec['tokens_per_s']:.0f} tokens/s | {mfu_text} | ETA {eta}")
            append_line(self.path, json.dumps(rec))
        self.logged_at = step
        self.reset()

    def pause(self, seconds: float):
        self.t0 += seconds  # the log's speed is the training's, not the disk's


