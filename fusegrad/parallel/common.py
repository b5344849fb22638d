"""What the data-parallel groups share (MPI: parallel/mpi.py, torch.distributed: parallel/torch_dist.py):
gradient buckets, sharding the global batch, comparing the replicas' parameters."""
from __future__ import annotations

import hashlib

import numpy as np

from fusegrad.core.errors import ConfigError, FusegradError
from fusegrad.core.trace import span

BUCKET_BYTES = 16 << 20  # gradient bytes per all-reduce: large enough to amortise latency, small in memory
CHECK_INTERVAL = 50  # steps between parameter-consistency checks


class ParallelError(FusegradError, RuntimeError):
    """Ranks disagree (parameters drifted, a batch that does not split) or one of them failed."""


def buckets(sizes, itemsize: int, bucket_bytes: int = BUCKET_BYTES) -> list:
    """Group consecutive arrays (element counts `sizes`) into buckets of at most `bucket_bytes`
    (an array bigger than that gets a bucket of its own). Returns lists of indices.

    >>> buckets([4, 4, 10, 1], itemsize=4, bucket_bytes=32)
    [[0, 1], [2], [3]]
    """
    out, current, used = [], [], 0
    for i, n in enumerate(sizes):
        if current and used + n * itemsize > bucket_bytes:
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += n * itemsize
    if current:
        out.append(current)
    return out


class Replicas:
    """A group of `size` processes, this one `rank`, each with a full replica; `comm` has mpi4py's
    bcast/allgather of Python objects."""
    comm = None
    rank, size = 0, 1
    check_interval = CHECK_INTERVAL

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: np.ndarray) -> np.ndarray:
        """This rank's rows of the global batch (B, ...): rows [rank B/n, (rank+1) B/n)."""
        B = batch.shape[0]
        if B % self.size:
            raise ConfigError(f"data parallel: batch_size {B} does not split evenly over {self.size} ranks; "
                             f"use a multiple of {self.size}")
        per = B // self.size
        return batch[self.rank * per:(self.rank + 1) * per]

    def check_consistency(self, named_params, step: int) -> None:
        """Raise ParallelError on every rank if any parameter differs from rank 0's (compared by digest)."""
        with span("consistency_check", "parallel"):
            digests = [hashlib.blake2b(np.ascontiguousarray(t.numpy()).tobytes(), digest_size=8).digest()
                       for _, t in named_params]
            reference = self.comm.bcast(digests, root=0)
            bad = [name for (name, _), d, r in zip(named_params, digests, reference) if d != r]
            drifted = self.comm.allgather(bad[0] if bad else None)
        culprits = [(rank, name) for rank, name in enumerate(drifted) if name is not None]
        if culprits:
            listed = ", ".join(f"rank {r} ({n})" for r, n in culprits)
            raise ParallelError(f"step {step}: parameters differ from rank 0's on {listed}; the replicas "
                                f"diverged (non-deterministic kernels or a missed gradient allreduce)")
