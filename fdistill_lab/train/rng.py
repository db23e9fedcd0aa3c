"""The image trainer's one source of randomness: the latents, noise levels, noise and uniform labels of every
step, for one process or for one of several data-parallel ranks, with its state for checkpoints."""

from __future__ import annotations

from typing import Any

import torch

from ..edm import sample_sigma_grid

RNG_MODES = ("shared", "per_rank")


class TrainerRNG:
    """Draws on ``device`` for rank ``rank`` of ``world_size``, from a CPU generator seeded by ``seed`` (``mode``):

    * ``"shared"``: every rank runs the same stream and draws for the whole global batch, keeping its slice, so W
      ranks compute what one process computes on the global batch (up to summation order); the cost is W times the
      draws on the CPU. With one process this is the plain single-process stream.
    * ``"per_rank"``: rank r seeds its own streams (offset r) and draws only its share; latents and noise come from a
      second generator on the device (no CPU work, no host-to-device copy). The same distribution, but the result
      depends on the number of ranks.
    """

    def __init__(self, seed: int, device: torch.device, rank: int = 0, world_size: int = 1,
                 mode: str = "shared") -> None:
        if mode not in RNG_MODES:
            raise ValueError(f"rng_mode must be one of {RNG_MODES}; got {mode!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank {rank}, world_size {world_size}")
        self.device, self.rank, self.mode = torch.device(device), rank, mode
        offset = rank if mode == "per_rank" else 0
        self.cpu = torch.Generator().manual_seed(seed * 1_000_003 + offset)
        self.on_device: torch.Generator | None = None
        if mode == "per_rank":
            self.on_device = torch.Generator(device=self.device).manual_seed((seed * 1_000_003 + offset) ^ 0x5EED)
        self.shares = world_size if mode == "shared" else 1

    def _mine(self, full: torch.Tensor, n: int) -> torch.Tensor:
        return full if self.shares == 1 else full[self.rank * n:(self.rank + 1) * n]

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal [shape] on the device (this rank's share of the global draw)."""
        if self.on_device is not None:
            return torch.randn(*shape, generator=self.on_device, device=self.device)
        n = shape[0]
        return self._mine(torch.randn(n * self.shares, *shape[1:], generator=self.cpu), n).to(self.device)

    def sigma(self, n: int, lo: int, hi: int, num_grid: int) -> torch.Tensor:
        """Noise levels: uniform indices in [lo, hi] of the ``num_grid``-point Karras grid (float64 maths), float32."""
        s = sample_sigma_grid(n * self.shares, lo, hi, num_grid, generator=self.cpu)
        return self._mine(s, n).to(device=self.device, dtype=torch.float32)

    def uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        """Uniform numbers in [lo, hi) (float64), e.g. the text-to-image trainer's noise times."""
        full = lo + (hi - lo) * torch.rand(n * self.shares, generator=self.cpu, dtype=torch.float64)
        return self._mine(full, n)

    def labels(self, n: int, num_classes: int) -> torch.Tensor:
        """Uniform class labels."""
        full = torch.randint(0, num_classes, (n * self.shares,), generator=self.cpu)
        return self._mine(full, n).to(self.device)

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"cpu": self.cpu.get_state(),
                "device": self.on_device.get_state().cpu() if self.on_device is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("device") is None) != (self.on_device is None):
            raise ValueError("the random state was saved with another rng_mode; resume with the same rng_mode")
        self.cpu.set_state(state["cpu"])
        if self.on_device is not None:
            self.on_device.set_state(state["device"])

    def snapshot(self) -> list[Any]:
        """Every stream a generator micro-batch draws from, the global ones that dropout uses included, to replay
        the same draws (:meth:`restore`)."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return [self.state_dict(), torch.get_rng_state(), cuda]

    def restore(self, snap: list[Any]) -> None:
        mine, cpu, cuda = snap
        self.load_state_dict(mine)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
