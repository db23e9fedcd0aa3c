"""The f-distill trainer on one of several data-parallel processes (DDP over torchrun or gloo).

Each rank holds ``global_batch / world_size`` real images. The trainable networks are wrapped in
``DistributedDataParallel`` (gradients averaged over ranks); the ratio normaliser and the weight mean
already all-reduce (``fdistill_lab.ratio``), so the two-stage normalisation sees the global batch.

Randomness (``rng_mode``):

* ``"shared"``: all ranks run the same trainer RNG stream and draw latents, noise levels, noise and
  uniform labels for the whole global micro-batch, each keeping its slice. W ranks then compute what
  one process computes on the global batch (equal up to float summation order); the cost is W times
  the random draws on the CPU.
* ``"per_rank"``: rank r uses its own streams (seed offset r) and draws only its share: the same
  distribution, no redundant work, but the result depends on the number of ranks. The large draws
  (latents, noise) come from a generator on the training device (``noise_generator``: no CPU work and no
  host-to-device copy on GPUs); its state is saved with the checkpoints by :mod:`fdistill_lab.train`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..edm import sample_sigma_grid
from .trainer import DistillConfig, FDistillTrainer

RNG_MODES = ("shared", "per_rank")
# the networks' buffers are constants: no buffer broadcast in every forward (torch >= 2.13 renamed the option)
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


class DataParallelTrainer(FDistillTrainer):
    """:class:`FDistillTrainer` for rank ``rank`` of ``world_size`` (module docstring). With
    ``world_size`` 1 it is exactly the base trainer."""

    def __init__(self, teacher: nn.Module, config: DistillConfig, device: torch.device | str, rank: int = 0,
                 world_size: int = 1, rng_mode: str = "shared", **kwargs) -> None:
        if rng_mode not in RNG_MODES:
            raise ValueError(f"rng_mode must be one of {RNG_MODES}; got {rng_mode!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank {rank}, world_size {world_size}")
        self.rank, self.world_size, self.rng_mode = rank, world_size, rng_mode
        device = torch.device(device)
        wrap = None
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None

            def wrap(m: nn.Module) -> nn.Module:
                return DistributedDataParallel(m, device_ids=ids, gradient_as_bucket_view=True, **_NO_BUFFER_SYNC)
        offset = rank if rng_mode == "per_rank" else 0
        super().__init__(teacher, config, device, wrap=wrap, rng_offset=offset, **kwargs)
        self.noise_generator: torch.Generator | None = None
        if rng_mode == "per_rank":
            seed = (config.seed * 1_000_003 + offset) ^ 0x5EED
            self.noise_generator = torch.Generator(device=self.device).manual_seed(seed)

    @property
    def _shares(self) -> int:
        return self.world_size if self.rng_mode == "shared" else 1

    def _slice(self, full: torch.Tensor, n: int) -> torch.Tensor:
        if self._shares == 1:
            return full
        return full[self.rank * n:(self.rank + 1) * n]

    def _randn(self, *shape: int) -> torch.Tensor:
        if self.noise_generator is not None:
            return torch.randn(*shape, generator=self.noise_generator, device=self.device)
        n = shape[0]
        full = torch.randn(n * self._shares, *shape[1:], generator=self.generator)
        return self._slice(full, n).to(self.device)

    def _sigma(self, n: int, lo: int, hi: int) -> torch.Tensor:
        s = sample_sigma_grid(n * self._shares, lo, hi, self.config.num_grid, generator=self.generator)
        return self._slice(s, n).to(device=self.device, dtype=torch.float32)

    def _labels(self, real_labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if self.label_dim == 0:
            return None
        if self.config.generator_labels == "uniform" or real_labels is None:
            full = torch.randint(0, self.label_dim, (n * self._shares,), generator=self.generator)
            return self._slice(full, n).to(self.device)
        return real_labels.to(self.device)


__all__ = ["DataParallelTrainer", "RNG_MODES"]
