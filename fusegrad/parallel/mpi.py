"""Data-parallel training over MPI: one process per rank, each with a full replica of the model.

Every rank draws the SAME global batch from the same RNG and keeps its own contiguous slice of rows;
after the backward the gradients are averaged with MPI Allreduce on a few large flat buffers (buckets)
instead of one call per parameter, so every rank applies the identical update and the parameters stay
identical (checked now and then by comparing digests). Only rank 0 logs and writes checkpoints. Since
the sampler's RNG, the weights and the optimizer moments are the same on every rank, a checkpoint
resumes under any number of ranks. If one rank fails, it says so on stderr and MPI_Abort stops all of
them (the others would otherwise wait forever in the next Allreduce).

    mpirun -n 2 fusegrad train --preset tiny --batch_size 8

>>> from mpi4py import MPI
>>> dp = DataParallel(MPI.COMM_SELF)           # a one-rank group, as in a test
>>> dp.shard(np.arange(8).reshape(4, 2)).shape   # (B, T): one rank keeps all rows
(4, 2)
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np

from fusegrad.core.trace import count, span
from fusegrad.parallel.common import BUCKET_BYTES, CHECK_INTERVAL, ParallelError, Replicas, buckets
from fusegrad.parallel.torch_dist import TorchDataParallel, launched_by_torchrun

__all__ = ["BUCKET_BYTES", "CHECK_INTERVAL", "DataParallel", "ParallelError", "buckets", "launched_ranks"]

ABORT_GRACE_S = 0.5  # seconds between a failing rank's message and MPI_Abort
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")  # set by mpirun/mpiexec


def launched_ranks() -> int:
    """How many ranks mpirun started (1 when not under MPI); read from the launcher's environment."""
    for var in _SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


class DataParallel(Replicas):
    """The MPI side of the trainer: sharding, gradient averaging, consistency checks, abort."""

    def __init__(self, comm=None, bucket_bytes: int = BUCKET_BYTES, check_interval: int = CHECK_INTERVAL):
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.bucket_bytes, self.check_interval = bucket_bytes, check_interval
        self._flat = {}  # bucket index -> reusable float32 host buffer

    @classmethod
    def from_env(cls):
        """A DataParallel over COMM_WORLD when mpirun started more than one rank; a torch.distributed one
        (parallel/torch_dist.py) when torchrun started several processes; else None."""
        if launched_ranks() > 1:
            return cls()
        return TorchDataParallel.from_env() if launched_by_torchrun() > 1 else None

    def average(self, value: float) -> float:
        """The mean of a number over ranks (the logged loss of the global batch)."""
        return self.comm.allreduce(float(value)) / self.size

    def allreduce_grads(self, params) -> None:
        """Replace every parameter's grad by its mean over ranks; buckets of flat float32 host buffers.

        All ranks must hold grads for the same parameters (they run the same model on the same step).
        """
        from mpi4py import MPI

        params = [p for p in params if p.grad is not None]
        with span("allreduce", "parallel", ranks=self.size):
            for b, idx in enumerate(buckets([p.numel() for p in params], 4, self.bucket_bytes)):
                total = sum(params[i].numel() for i in idx)
                flat = self._flat.get(b)
                if flat is None or flat.size != total:
                    flat = self._flat[b] = np.empty(total, np.float32)
                offsets = np.cumsum([0] + [params[i].numel() for i in idx])
                for i, lo, hi in zip(idx, offsets[:-1], offsets[1:]):
                    g = params[i].grad
                    flat[lo:hi] = (g if isinstance(g, np.ndarray) else params[i].backend.to_numpy(g)).reshape(-1)
                self.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
                flat *= 1.0 / self.size
                for i, lo, hi in zip(idx, offsets[:-1], offsets[1:]):
                    p = params[i]
                    avg = flat[lo:hi].reshape(p.shape)
                    if isinstance(p.grad, np.ndarray):
                        p.grad[...] = avg
                    else:
                        p.grad = p.backend.asarray(avg)
                count("allreduce:bytes", 4 * total)

    def broadcast_params(self, named_params) -> None:
        """Copy rank 0's parameter values to every rank (at start: identical replicas whatever the seed)."""
        for _, t in named_params:
            host = np.ascontiguousarray(t.numpy(), dtype=np.float32) if t.dtype == np.float32 else t.numpy().copy()
            self.comm.Bcast(host, root=0)
            if not self.is_main:
                t.data = t.backend.asarray(host)

    @contextlib.contextmanager
    def abort_on_error(self):
        """Any exception on this rank: say which rank failed and why, then MPI_Abort every rank."""
        try:
            yield
        except BaseException as exc:
            print(f"fusegrad: rank {self.rank} of {self.size} failed: {type(exc).__name__}: {exc}; "
                  f"stopping all ranks", file=sys.stderr, flush=True)
            # a launcher may drop output still in flight when MPI_Abort tears the job down (a CI run lost the
            # whole stderr of mpich's hydra once): give it time to forward the line
            time.sleep(ABORT_GRACE_S)
            self.comm.Abort(1)
            raise
