"""Data parallelism for the training loops under ``torchrun`` / ``accelerate launch`` (one process per GPU).

The launchers set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; ``setup()`` joins the process group (NCCL on
GPUs, Gloo on CPUs) and pins each process to its GPU. The loops then keep their single-process shape: every rank
builds the same micro-batch indices, takes its slice (``batch_size`` stays the *global* batch), and the
gradients of the trainable parameters are averaged across ranks before clipping and the optimizer step, so all
ranks hold identical weights. Only rank 0 logs metrics and writes checkpoints.

Why not ``DistributedDataParallel``: the trainable parameters are a few LoRA matrices spread over three adapters
that are switched per call, plus the special-token rows; one explicit all-reduce of those gradients per step is
simpler to follow than DDP's bucket hooks over a model whose active adapter changes inside a step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's part of a global micro-batch."""
        if len(indices) % self.world:
            raise ValueError(f"batch_size {len(indices)} is not divisible by the {self.world} processes: each "
                             "process must get the same number of examples")
        return list(indices[self.rank :: self.world])

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:  # a parameter unused on this rank still takes part in the reduction
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average logged scalars across ranks (so rank 0 reports the whole batch)."""
        if self.world == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def setup() -> Dist:
    """Join the process group when launched with several processes; a no-op (rank 0 of 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())
