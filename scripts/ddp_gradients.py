"""scripts/ddp_gradients.py: tinydistil.py under torchrun, saving what DDP did to the first step's
gradients on each rank: the rank's own gradient, from its own micro-batch, and the gradient the
optimizer steps on after DistributedDataParallel's all-reduce.

    DDP_GRADIENTS=DIR python -m torch.distributed.run --standalone --nproc_per_node=2 \
        scripts/ddp_gradients.py pretrain --device cpu ...   # any `tinydistil.py` arguments

writes DIR/rank<R>.pt = {"own": (P,), "synced": (P,)} once per rank (a later run, --resume, keeps
the first run's), every trainable parameter flattened in one order. Data parallelism (the paper's
section 3 trains on 8 GPUs) is right when each rank's synced gradient is the mean of the ranks' own
gradients: TestPretrain's DDP test checks it. The run itself is tinydistil.py's, untouched: a
gradient hook on each parameter sees the rank's own gradient before DDP reduces it, and
clip_grad_norm_, which the loop calls once per step on the reduced gradients, is wrapped to save.
"""
import os
import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ["DDP_GRADIENTS"])
own = {}  # parameter -> this rank's gradient of the first backward, before the all-reduce


class WatchedDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP, plus a hook per parameter that keeps the first gradient its rank computed."""

    def __init__(self, module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(lambda grad, p=p: own.setdefault(p, grad.detach().clone()))


clip_grad_norm_ = torch.nn.utils.clip_grad_norm_


def save_then_clip(parameters, *args, **kwargs):
    """The loop's clip_grad_norm_; on the first step of the first run it saves both gradients."""
    parameters = [p for p in parameters if p.grad is not None]
    path = OUT / f"rank{os.environ['RANK']}.pt"
    if own and not path.exists():
        torch.save({"own": torch.cat([own[p].flatten() for p in parameters]),
                    "synced": torch.cat([p.grad.flatten() for p in parameters])}, path)
    return clip_grad_norm_(parameters, *args, **kwargs)


torch.nn.parallel.DistributedDataParallel = WatchedDDP
torch.nn.utils.clip_grad_norm_ = save_then_clip
sys.path.insert(0, str(ROOT))
sys.argv[0] = str(ROOT / "tinydistil.py")  # so the resume advice names tinydistil.py
runpy.run_path(sys.argv[0], run_name="__main__")
