"""torch.distributed helpers for training on one or many GPUs (torchrun) or CPU processes (gloo).

``init_distributed()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and starts NCCL on CUDA or gloo on CPU; without those variables it is a
single process. ``GlobalBatchSampler`` deals each global batch of a seeded per-epoch permutation out
to the ranks, so the data stream depends only on (seed, step), not on the number of ranks, and a
resumed run continues from a step count. Also: rank-aware seeding, barriers, gathering RNG states.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "cleanup", "barrier", "is_distributed", "seed_for_rank",
           "GlobalBatchSampler", "rng_state", "set_rng_state", "gather_objects", "broadcast_module",
           "all_reduce_mean", "any_rank", "any_ranks", "DeviceUnavailable", "require_cuda_or_smoke", "NEEDS_CUDA",
           "DEVICES"]

DEVICES = ("auto", "cuda", "cpu")
SMOKE_ENV = "FDISTILL_SMOKE"


class DeviceUnavailable(RuntimeError):
    """The device a run asks for is not there (``device=cuda`` without a GPU, too few GPUs for the ranks)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: ``rank`` of ``world_size``, ``local_rank`` on its node, ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if not raw.lstrip("-").isdigit():
        raise ValueError(f"environment variable {name} must be an integer; got {raw!r}")
    return int(raw)


def init_distributed(device: str = "auto") -> DistEnv:
    """Start the process group from torchrun's environment (NCCL on CUDA, gloo on CPU).

    ``device``: 'auto' (CUDA if available), 'cuda' (error without it) or 'cpu'. Each rank uses GPU
    ``LOCAL_RANK``. Without ``WORLD_SIZE`` > 1 nothing is initialised (single process).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("device 'cuda' requested but torch.cuda.is_available() is False (no GPU, or a "
                                "CPU-only torch build); use --device cpu (or auto), or install a CUDA build of torch")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise DeviceUnavailable(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) visible; "
                               "use torchrun --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    backend = None
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {"device_id": dev} if use_cuda else {}
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def cleanup() -> None:
    """Destroy the process group if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def seed_for_rank(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) with ``seed + 1000003 * rank`` (distinct per rank)."""
    s = int(seed) + 1_000_003 * int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (Python, NumPy, torch CPU and CUDA), for exact resume; only plain
    types and tensors, so checkpoints load with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state: dict[str, Any] = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (the CUDA state only if present and CUDA is in use)."""
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _python_state(s: Any) -> tuple:
    # torch.load(weights_only=True) returns lists for tuples
    return (s[0], tuple(s[1]), s[2])


def _numpy_state(s: Any) -> tuple:
    keys = s[1].numpy() if isinstance(s[1], torch.Tensor) else np.asarray(s[1])
    return (s[0], keys.astype(np.uint32), int(s[2]), int(s[3]), float(s[4]))


def gather_objects(obj: Any) -> list[Any]:
    """All ranks' ``obj`` as a list indexed by rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (identical starting weights)."""
    if is_distributed():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over ranks (same keys on every rank); unchanged in a single process."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (e.g. a SIGTERM seen by one process)."""
    return any_ranks([flag], device)[0]


def any_ranks(flags: list[bool], device: torch.device) -> list[bool]:
    """:func:`any_rank` of several flags in one all-reduce."""
    if not is_distributed():
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


class GlobalBatchSampler:
    """Local index batches of a sharded, seeded, step-addressed stream of global batches.

    Epoch e is a permutation of ``range(num_items)`` from ``seed + e``; global batch b takes the next
    ``global_batch`` indices of the concatenated epochs (a batch may straddle two epochs). The global batch
    is cut into global micro-batches of ``W * micro_batch`` positions; rank r gets slice r of each, so that
    micro-batch j on all ranks together is global micro-batch j (default ``micro_batch``: B / W, i.e. rank r
    gets positions ``[r B / W, (r + 1) B / W)``). ``start_batch`` resumes after that many batches. Use as
    ``DataLoader(dataset, batch_sampler=...)``; iterating is endless.
    """

    def __init__(self, num_items: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_batch: int = 0, shuffle: bool = True, micro_batch: int | None = None) -> None:
        if num_items < 1:
            raise ValueError(f"the data set is empty (num_items={num_items})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank {rank}, world_size {world_size}")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} must be a positive multiple of world_size {world_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0; got {start_batch}")
        self.num_items, self.global_batch, self.rank, self.world_size = num_items, global_batch, rank, world_size
        self.seed, self.start_batch, self.shuffle = seed, start_batch, shuffle
        self.local_batch = global_batch // world_size
        self.micro_batch = micro_batch or self.local_batch
        if self.micro_batch < 1 or self.local_batch % self.micro_batch:
            raise ValueError(f"micro_batch {micro_batch} must divide the per-rank batch {self.local_batch}")
        self._cached: tuple[int, torch.Tensor] | None = None

    def _epoch(self, e: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != e:
            perm = (torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + e))
                    if self.shuffle else torch.arange(self.num_items))
            self._cached = (e, perm)
        return self._cached[1]

    def global_indices(self, b: int) -> list[int]:
        """Indices of global batch ``b`` (all ranks)."""
        start = b * self.global_batch
        e, off = divmod(start, self.num_items)
        out: list[int] = []
        while len(out) < self.global_batch:
            perm = self._epoch(e)
            take = perm[off: off + self.global_batch - len(out)]
            out += take.tolist()
            e, off = e + 1, 0
        return out

    def local_indices(self, b: int) -> list[int]:
        """This rank's indices of global batch ``b``."""
        full, m, w = self.global_indices(b), self.micro_batch, self.world_size
        return [i for j in range(0, len(full), m * w) for i in full[j + self.rank * m: j + (self.rank + 1) * m]]

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start_batch
        while True:
            yield self.local_indices(b)
            b += 1


NEEDS_CUDA = "needs a CUDA GPU"  # in the message of require_cuda_or_smoke; tools recognise the stop by it


def require_cuda_or_smoke(smoke: bool, what: str = "the real ImageNet-64 training",
                          smoke_what: str = "tiny network, synthetic data") -> None:
    """Stop (RuntimeError) unless a CUDA GPU is available or smoke mode is on (``smoke`` or FDISTILL_SMOKE=1).

    Called first thing by the GPU notebooks (05, 06), before any other check; ``what`` names the real run and
    ``smoke_what`` what the smoke run uses instead."""
    env = os.environ.get(SMOKE_ENV, "").strip().lower()
    if smoke is True or env in ("1", "true", "yes") or torch.cuda.is_available():
        return
    raise RuntimeError(
        f"This notebook {NEEDS_CUDA} for {what} (torch.cuda.is_available() is False). "
        "Run it on a machine with an NVIDIA GPU and a CUDA build of torch, or run the CPU smoke version of the "
        f"whole pipeline with `-p smoke True` ({smoke_what}).")
