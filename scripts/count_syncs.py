"""scripts/count_syncs.py: how often pretraining's hot loop makes the host wait for the device.

    python scripts/count_syncs.py                  # the CPU: tiny fixture teacher, 6 steps of 2
    python scripts/count_syncs.py --device cuda    # a GPU: also counted by CUDA itself
    python scripts/count_syncs.py --json out.json  # the counts as JSON too

A host-device sync (`.item()`, `int(t)`, a boolean index, `nonzero`, multinomial's checks of its
weights, a blocking copy from unpinned host memory) stops the Python thread until the GPU has run
everything queued before it; a few per micro-batch leave a fast GPU idle between short kernels
(paper section 3's large batches hide it less than one would think: the paper recipe runs 400
micro-batches per step). The CPU has no queue, so this counts the syncs where a GPU would have them:
a TorchDispatchMode follows which tensors live on the training device (the models' weights, what is
copied there, and everything computed from them) and counts the ops that read such a tensor's
values back to the host. Tensors made by factory functions (torch.zeros(..., device=...)) count as
the device's once they meet a device tensor. On CUDA, torch.cuda.set_sync_debug_mode("warn")
counts the real ones too. The run is `tinydistil.pretrain` itself, with the counter around its
loop (`train_loop`); steps are delimited by the log's per-step hook, so a log step's reading of the
losses is counted in its step.
"""
import argparse
import collections
import json
import random
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT, HERE = Path(__file__).resolve().parent.parent, Path(__file__).name
sys.path.insert(0, str(ROOT))
import tinydistil  # noqa: E402

# ops that read a device tensor's values on the host: each waits for the device's queue
ALWAYS_SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2",
               "unique_consecutive", "repeat_interleave", "equal", "is_nonzero"}


def syncs_in(func, args, kwargs) -> bool:
    """Whether this op makes the host wait for its (device) inputs."""
    name = func.overloadpacket.__name__
    if name in ALWAYS_SYNC:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # a boolean index:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())  # nonzero inside
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
    if name in ("_to_copy", "copy_") and args:  # a device tensor copied into host memory
        source, target = (args[0], kwargs.get("device")) if name == "_to_copy" else (args[1],
                                                                                     args[0].device)
        return source.is_cuda and target is not None and torch.device(target).type == "cpu"
    if name == "multinomial":  # without replacement it checks the weights' sum and range first
        n = args[1] if len(args) > 1 else kwargs["num_samples"]
        replacement = args[2] if len(args) > 2 else kwargs.get("replacement", False)
        return not replacement or n == 1
    return False


class SyncCounter(TorchDispatchMode):
    """Counts the syncs of the ops run under it, by step: {step: Counter(what -> count)}."""

    def __init__(self):
        super().__init__()
        self.step, self.by_step = 1, collections.defaultdict(collections.Counter)

    def record(self, what: str):
        frames = [f for f in traceback.extract_stack()[:-2]
                  if f.filename.startswith(str(ROOT)) and Path(f.filename).name != HERE]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        self.by_step[self.step][f"{what} at {where}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(getattr(t, "_on_device", False) for t in tensors)
        if on_device and syncs_in(func, args, kwargs):
            self.record(func.overloadpacket.__name__)
        out = func(*args, **kwargs)
        if on_device:  # what it made, and what an in-place op (name_) or out= wrote: the device's
            written = [args[0]] if func.overloadpacket.__name__.endswith("_") and args else []
            for t in tree_leaves(out) + written + tree_leaves(kwargs.get("out")):
                if isinstance(t, torch.Tensor):
                    mark(t)
        return out


def mark(t):
    try:
        t._on_device = True
    except (AttributeError, RuntimeError):
        pass


def host_side(frame) -> bool:
    """A .to(x.device) in data.py's pipeline (mask_batch) whose function holds no device tensor
    names the host: on a GPU run it is no copy at all."""
    return (Path(frame.f_code.co_filename).name == "data.py"
            and not any(getattr(v, "_on_device", False) for v in frame.f_locals.values()
                        if isinstance(v, torch.Tensor)))


def patch_copies(counter: SyncCounter, device: torch.device):
    """Tensor.to(device) on the CPU returns the tensor itself: make it a marked copy instead (but
    see host_side), and count a blocking copy (host memory not pinned, non_blocking False) as a
    sync. Reading a device tensor with .tolist(), .cpu() or .numpy() counts as one too. Returns an
    undo function."""
    saved = {k: getattr(torch.Tensor, k) for k in ("to", "tolist", "cpu", "numpy")}

    def to(self, *args, **kwargs):
        target, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        out = saved["to"](self, *args, **kwargs)
        if target is None or getattr(self, "_on_device", False):
            return out
        if target.type == device.type and not host_side(sys._getframe(1)):
            out = out.clone() if out is self else out
            mark(out)
            if not non_blocking:
                counter.record("blocking copy to the device")
        return out

    def reading(name):
        def read(self, *args, **kwargs):
            if getattr(self, "_on_device", False) and device.type == "cpu":
                counter.record(name)
            return saved[name](self, *args, **kwargs)
        return read

    torch.Tensor.to = to
    for name in ("tolist", "cpu", "numpy"):
        setattr(torch.Tensor, name, reading(name))
    return lambda: [setattr(torch.Tensor, k, v) for k, v in saved.items()]


def count(cfg) -> dict:
    """Run pretrain(cfg) with the counter around its loop: {"steps": [syncs per step], "what":
    {op at file:line: total}, and on CUDA "cuda_steps": [syncs per step by CUDA's own count]}."""
    counter, seen = SyncCounter(), {"device": None, "cuda": [], "caught": []}
    original_loop, original_step = tinydistil.train_loop, tinydistil.TrainLog.step

    def counted_step(log, step, *args):
        original_step(log, step, *args)
        counter.step = step + 1
        seen["cuda"].append(sum("synchroniz" in str(w.message) for w in seen["caught"]))

    def counted_loop(cfg, teacher, model, opt, corpus, mask_gen, dist, *rest):
        device = seen["device"] = dist.device
        for module in (teacher, model):
            for t in [*module.parameters(), *module.buffers()]:
                mark(t)
        undo = patch_copies(counter, device)
        try:
            with counter, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                seen["caught"] = caught
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                original_loop(cfg, teacher, model, opt, corpus, mask_gen, dist, *rest)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            undo()
    tinydistil.train_loop, tinydistil.TrainLog.step = counted_loop, counted_step
    try:
        tinydistil.pretrain(cfg)
    finally:
        tinydistil.train_loop, tinydistil.TrainLog.step = original_loop, original_step
    n = cfg.max_steps
    steps = [sum(counter.by_step[s].values()) for s in range(1, n + 1)]
    what = collections.Counter()
    for s in range(1, n + 1):
        what.update(counter.by_step[s])
    result = {"steps": steps, "per_step": sum(steps) / n, "what": dict(what.most_common())}
    if seen["device"] is not None and seen["device"].type == "cuda":
        totals = seen["cuda"]
        result["cuda_steps"] = [b - a for a, b in zip([0] + totals, totals)]
    return result


def tiny_config(folder: Path, device: str, **overrides):
    """6 steps of 2 micro-batches, a log line every 3 steps, on the tiny fixture teacher and a
    generated corpus of its words (as the tests do)."""
    words = [w for w in (ROOT / "fixtures/models/tokenizer/vocab.txt").read_text().split()
             if w.isalpha() and len(w) > 2]
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))
                                for _ in range(300)) + "\n")
    base = dict(teacher=str(ROOT / "fixtures/models/tiny-bert"), out=str(folder / "out"),
                data=str(corpus), data_dir=str(folder / "data"), n_layer=2, batch_size=8,
                seq_len=32, max_steps=6, grad_accum=2, log_every=3, save_every=100, seed=0,
                device=device)
    return tinydistil.PretrainConfig(**{**base, **overrides})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = count(tiny_config(Path(tmp), args.device))
    print(f"syncs per optimizer step (2 micro-batches; a log line every 3 steps): "
          f"{result['steps']}, mean {result['per_step']:.1f}")
    for what, n in result["what"].items():
        print(f"  {n:4d}  {what}")
    if "cuda_steps" in result:
        print(f"CUDA's own count (set_sync_debug_mode) per step: {result['cuda_steps']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
