"""Data-parallel training over torch.distributed: what parallel/mpi.py's DataParallel does over MPI, with the
same interface, for processes that torchrun starts (NCCL between GPUs, gloo on the CPU).

    torchrun --nproc_per_node 4 -m fusegrad train --backend torch --device cuda --batch_size 32

Every process draws the same global batch and keeps its rows; after the backward the grads are summed with
all_reduce on flat buckets of BUCKET_BYTES, where the grads live (the device for NCCL: no host copy), and
divided by the process count, so the loss curve is the one-process curve of the global batch. Rank r uses
cuda:LOCAL_RANK (torch_backend.resolve_device). If a rank fails it prints its reason and exits at once; its
peers' next collective fails (gloo: connection closed) and torchrun stops the rest.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys

import numpy as np

from fusegrad.core.trace import count, span
from fusegrad.parallel.common import BUCKET_BYTES, CHECK_INTERVAL, Replicas, buckets

TIMEOUT_S = 300  # a collective that waits longer than this fails instead of hanging


def launched_by_torchrun() -> int:
    """The process count torchrun (or a launcher setting its variables) started; 1 when not."""
    size = os.environ.get("WORLD_SIZE", "")
    return int(size) if size.isdigit() and "MASTER_ADDR" in os.environ and "RANK" in os.environ else 1


def _torch():
    """torch, with torch.distributed loaded (an optional dependency: imported on first use)."""
    import torch
    import torch.distributed

    return torch


class _Comm:
    """The few mpi4py calls DataParallel's shared methods use, over torch.distributed objects."""

    def bcast(self, obj, root=0):
        box = [obj]
        _torch().distributed.broadcast_object_list(box, src=root)
        return box[0]

    def allgather(self, obj):
        dist = _torch().distributed
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out


class TorchDataParallel(Replicas):
    """parallel/mpi.py's DataParallel over an initialised torch.distributed process group (shard,
    check_consistency and is_main are the shared Replicas')."""

    def __init__(self, bucket_bytes: int = BUCKET_BYTES, check_interval: int = CHECK_INTERVAL):
        torch = _torch()
        dist = torch.distributed
        self.comm = _Comm()
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.bucket_bytes, self.check_interval = bucket_bytes, check_interval
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @classmethod
    def from_env(cls):
        """Join the process group torchrun describes (env://) -> TorchDataParallel; None for one process."""
        if launched_by_torchrun() <= 1:
            return None
        torch = _torch()
        dist = torch.distributed
        if not dist.is_initialized():
            nccl = torch.cuda.is_available()
            if nccl:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if nccl else "gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
        return cls()

    def _flat(self, arrays):
        """One flat float32 buffer of the arrays (device tensors or numpy), on the collective's device."""
        torch = _torch()
        parts = [torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in arrays]
        return torch.cat([p.reshape(-1).to(self.device, torch.float32) for p in parts])

    def average(self, value):
        """Mean over ranks of a float (-> float) or of a 0-d device array (-> one, no host read)."""
        t = self._flat([value if not isinstance(value, float) else np.float32(value).reshape(1)])
        _torch().distributed.all_reduce(t)
        t /= self.size
        return float(t.item()) if isinstance(value, float) else t.reshape(()).to(value.device, value.dtype)

    def allreduce_grads(self, params) -> None:
        """Replace every grad by its mean over ranks: bucketed all_reduce, written back in place."""
        dist = _torch().distributed
        params = [p for p in params if p.grad is not None]
        with span("allreduce", "parallel", ranks=self.size):
            for idx in buckets([p.numel() for p in params], 4, self.bucket_bytes):
                flat = self._flat([params[i].grad for i in idx])
                dist.all_reduce(flat)
                flat /= self.size
                lo = 0
                for i in idx:
                    g, n = params[i].grad, params[i].numel()
                    avg = flat[lo:lo + n].reshape(g.shape)
                    if isinstance(g, np.ndarray):
                        g[...] = avg.numpy()
                    else:
                        g.copy_(avg)
                    lo += n
                count("allreduce:bytes", 4 * lo)

    def broadcast_params(self, named_params) -> None:
        """Rank 0's parameter values on every rank."""
        for _, t in named_params:
            flat = self._flat([t.data])
            _torch().distributed.broadcast(flat, src=0)
            if not self.is_main:
                host = flat.cpu().numpy().reshape(t.shape).astype(t.dtype)
                t.data = t.backend.asarray(host)

    @contextlib.contextmanager
    def abort_on_error(self):
        """Any exception on this rank: say which rank failed and why, then leave at once (the peers' next
        collective fails instead of waiting; torchrun stops them)."""
        try:
            yield
        except BaseException as exc:
            print(f"fusegrad: rank {self.rank} of {self.size} failed: {type(exc).__name__}: {exc}; "
                  f"stopping all ranks", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        dist = _torch().distributed  # done: no rank leaves while a peer still talks (gloo aborts at exit else)
        dist.barrier()
        dist.destroy_process_group()
