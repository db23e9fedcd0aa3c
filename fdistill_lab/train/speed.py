"""Speed settings of the image trainer, each a :class:`~fdistill_lab.train.config.DistillConfig` setting that changes
how a step runs and not its maths (the eager step's results up to rounding; ``tests/test_speed.py``):

* ``compile``: ``"none"`` (eager), ``"networks"`` (each network call through ``torch.compile``) or ``"steps"``
  (the whole forward computation of a generator or critic micro-batch, networks, weighting and losses, as one
  compiled graph; its backward is compiled with it). Static shapes and ``fullgraph``: a graph break (a host sync
  such as ``.item()``, data-dependent Python control flow) is an error, not a silent return to eager code. Under
  DDP (several processes) only ``"networks"``: each DDP wrapper holds the compiled network.
* ``cuda_graphs``: the compiled graphs are replayed as CUDA graphs (``torch.compile`` mode ``reduce-overhead``),
  so the host launches a step in a few calls; needs ``compile`` and a CUDA device.
* ``channels_last``: every network's weights and inputs in channels-last layout, so cuDNN's bf16 kernels get
  NHWC tensors without conversions.
* ``fused_optimizer``: AdamW with ``fused=True`` (one kernel for all parameters of a network).
* ``fold_biases``: a convolution's bias added by the convolution itself instead of a separate add (not in the
  3-channel image convolutions that bf16 pads to 8 channels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

COMPILE_MODES = ("none", "networks", "steps")
# backend of torch.compile; tests may set "aot_eager" (dynamo's graph capture and compiled autograd without code
# generation, seconds instead of minutes on a CPU)
BACKEND = "inductor"
# graphs per compiled function: one per shape x grad mode x decoder mode x frozen or trained; more than the default 8
RECOMPILE_LIMIT = 256


def check_device(cuda_graphs: bool, device: torch.device) -> None:
    """ValueError if CUDA graphs are asked for on a device without them."""
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device; this trainer runs on {device.type!r} "
                         "(set cuda_graphs=False)")


def prepare_networks(nets: Iterable[nn.Module], channels_last: bool, fold_biases: bool) -> None:
    """Put the networks' weights in channels-last layout and/or fold their convolution biases (in place)."""
    from ..networks.layers import Conv2d

    for net in nets:
        if channels_last:
            net.to(memory_format=torch.channels_last)
        for m in net.modules():
            if isinstance(m, Conv2d):
                m.fold_bias = fold_biases


def memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels-last layout if asked and it is an image batch, else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def adamw(params: Iterable[nn.Parameter], lr: float, fused: bool, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW, fused (one kernel per step) or torch's default implementation (``foreach`` on GPUs)."""
    return torch.optim.AdamW(params, lr=lr, fused=True if fused else None, **kwargs)


def _configure_compilation() -> None:
    """More graphs per function than dynamo's default allows (and an error past them, not eager code); and compiled
    code drawing its random numbers (dropout, label dropout) with the eager random ops, in program order, from the
    global generators: the trainer replays a micro-batch's draws in its gradient pass from the random state of its
    gradient-free logits pass, which is another graph."""
    import torch._dynamo
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):  # past the limit: an error, not silently eager code
        cfg.fail_on_recompile_limit_hit = True


class Compiler:
    """Compiles the trainer's functions the way ``compile`` and ``cuda_graphs`` say, and calls them.

    :meth:`wrap` returns ``fn`` itself when nothing is compiled at that level. With CUDA graphs each generator or
    critic step is one graph generation (:meth:`begin_step`: the graphs of its micro-batches form one path of
    CUDA graph trees), and :meth:`call` clones the outputs, whose memory a later replay reuses (the trainer keeps a
    micro-batch's statistics until the step ends)."""

    def __init__(self, mode: str, cuda_graphs: bool, device: torch.device) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}; got {mode!r}")
        if cuda_graphs and mode == "none":
            raise ValueError("cuda_graphs=True needs compile='networks' or 'steps' (torch.compile captures the graphs)")
        check_device(cuda_graphs, device)
        self.mode, self.cuda_graphs = mode, cuda_graphs
        if mode != "none":
            _configure_compilation()

    def wrap(self, fn: Callable[..., Any], level: str) -> Callable[..., Any]:
        """``fn`` compiled if ``level`` ("networks" or "steps") is this compiler's mode, else ``fn``."""
        if level != self.mode:
            return fn
        extra = {"mode": "reduce-overhead"} if self.cuda_graphs else {}
        return torch.compile(fn, backend=BACKEND, dynamic=False, fullgraph=True, **extra)

    def begin_step(self) -> None:
        """Mark the start of a generator or critic step (a new CUDA graph generation)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; with CUDA graphs its tensor outputs are cloned out of the graphs' memory pool."""
        out = fn(*args)
        return _clone_tensors(out) if self.cuda_graphs else out


def _clone_tensors(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_tensors(o) for o in out)
    if isinstance(out, list):
        return [_clone_tensors(o) for o in out]
    if isinstance(out, dict):
        return {k: _clone_tensors(v) for k, v in out.items()}
    return out


__all__ = ["COMPILE_MODES", "Compiler", "adamw", "check_device", "memory_format", "prepare_networks"]
