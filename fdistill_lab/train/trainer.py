"""The image trainer: f-distill of a frozen teacher into a one-step student, in one process or on each of several
data-parallel ranks (paper sections 6-9).

Network-agnostic: any denoiser with the EDMPrecond interface ``net(x, sigma, class_labels,
return_features=False) -> x0`` or ``(x0, features)`` (attributes ``img_resolution``, ``img_channels``,
``label_dim``). Student and fake score start as copies of the frozen teacher (section 9). Each iteration updates
the student, the critic (fake score + discriminator heads) or both, by the schedule of
:func:`~fdistill_lab.method.iteration_updates`; the losses are :mod:`fdistill_lab.method`'s, and this module makes
the network calls around them: micro-batches, mixed precision, data parallelism, EMA, checkpoints.

All randomness (latents, noise levels, noise, uniform labels) comes from one :class:`~fdistill_lab.train.rng.
TrainerRNG`, saved in checkpoints, so a resumed run repeats an uninterrupted one exactly. Under bf16 autocast the
networks run in bf16 while ratio, weight and loss maths stay in fp32. With ``world_size`` > 1 the trainable
networks are wrapped in ``DistributedDataParallel`` (gradients averaged over ranks); the ratio normaliser and the
weight mean all-reduce themselves, so the two-stage normalisation sees the global batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..files import atomic_save, load_file
from ..losses import mean_logit
from ..method import FDistillWeighting, critic_objective, frozen, generator_objective, iteration_updates, noisy
from ..networks import EDMPrecond
from ..networks.discriminator import Discriminator
from ..networks.layers import twice_differentiable, use_compiled_norms
from . import speed
from .config import DistillConfig, _int_at_least
from .rng import TrainerRNG

CHECKPOINT_FORMAT = "fdistill-trainer-v1"
Scalars = dict[str, torch.Tensor]  # logged 0-d tensors on the training device, read back once per step
# the networks' buffers are constants: no buffer broadcast in every forward (torch >= 2.13 renamed the option)
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


def _freeze_unfed_inputs(net: nn.Module) -> None:
    """Freeze the augment-label mapping of EDM's networks (CIFAR-10's have ``augment_dim`` 9): distillation
    never passes augment labels, so no gradient reaches it, and DDP stops a run over a parameter that gets
    none ("Expected to have finished reduction in the prior iteration")."""
    mapping = getattr(getattr(net, "model", None), "map_augment", None)
    if mapping is not None:
        mapping.requires_grad_(False)


def _local_grads_unless(last: bool, *wrapped: nn.Module) -> contextlib.ExitStack:
    """Gradient accumulation under DDP: keep the gradients of all but the last micro-batch local
    (``no_sync``), so each step all-reduces them once instead of once per micro-batch."""
    stack = contextlib.ExitStack()
    if not last:
        for net in wrapped:
            if hasattr(net, "no_sync"):
                stack.enter_context(net.no_sync())
    return stack


def _grad_norm(params: Iterable[nn.Parameter], device: torch.device) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros((), device=device)


class FDistillTrainer:
    """f-distill training of a one-step student from a frozen teacher (sections 6-9), as rank ``rank`` of
    ``world_size`` data-parallel processes (one process by default; each rank holds its share of the batch).

    ``teacher``: EDMPrecond-like denoiser (frozen here). ``student`` / ``fake_score`` default to copies of it.
    ``rng_mode``: how ranks draw their random numbers (:class:`~fdistill_lab.train.rng.TrainerRNG`). Use
    :meth:`step` with one real batch per iteration, :meth:`sample` for images, and :meth:`save_checkpoint` /
    :meth:`load_checkpoint` (atomic) to resume exactly.
    """

    def __init__(self, teacher: nn.Module, config: DistillConfig | None = None,
                 device: torch.device | str | None = None, rank: int = 0, world_size: int = 1, rng_mode: str = "shared",
                 student: nn.Module | None = None, fake_score: nn.Module | None = None) -> None:
        self.config = cfg = config if config is not None else DistillConfig()
        if not isinstance(cfg, DistillConfig):
            raise TypeError(f"config must be a DistillConfig; got {type(cfg).__name__}")
        for attr in ("img_resolution", "img_channels", "label_dim"):
            if not hasattr(teacher, attr):
                raise TypeError(f"teacher lacks attribute {attr!r}: it must follow the EDMPrecond interface")
        self.device = torch.device(device) if device is not None else next(teacher.parameters()).device
        self.rng = TrainerRNG(cfg.seed, self.device, rank, world_size, rng_mode)
        self.rank, self.world_size = rank, world_size
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.student = (student if student is not None else copy.deepcopy(teacher)).to(self.device).train()
        self.fake_score = (fake_score if fake_score is not None else copy.deepcopy(teacher)).to(self.device).train()
        for net in (self.student, self.fake_score):
            net.requires_grad_(True)
            _freeze_unfed_inputs(net)
        self.student_ema = copy.deepcopy(self.student).eval().requires_grad_(False)
        self._compiler = speed.Compiler(cfg.compile, cfg.cuda_graphs, self.device)
        if cfg.compile == "steps" and world_size > 1:
            raise ValueError(f"compile='steps' traces a whole step into one graph, which DDP's forward does not allow "
                             f"(world_size={world_size}): use compile='networks' with several processes")
        for net in (self.teacher, self.student, self.fake_score, self.student_ema):
            use_compiled_norms(net, cfg.compile_norms)
        speed.prepare_networks((self.teacher, self.student, self.fake_score, self.student_ema), cfg.channels_last,
                               cfg.fold_biases)
        feat_net = self.teacher if cfg.disc_placement == "teacher" else self.fake_score
        with torch.random.fork_rng(devices=[]):  # heads initialised from config.seed, not the global RNG state
            torch.default_generator.manual_seed(cfg.seed)  # the CPU stream only: CUDA RNGs are not forked here
            self.disc = Discriminator.for_network(feat_net, cfg.disc_features, cfg.disc_hidden).to(self.device).train()
        self.weighting = FDistillWeighting.from_config(cfg).to(self.device)
        self._student_fwd, self._fake_fwd, self._disc_fwd = (self._wrap(m) for m in (self.student, self.fake_score,
                                                                                       self.disc))
        # compile="networks": each unwrapped network called through its compiled version (a DDP wrapper holds one)
        self._compiled = {id(m): self._compiler.wrap(m, "networks")
                          for m in (self.teacher, self.student, self.fake_score, self.disc)}
        # compile="steps": each micro-batch's forward computation as one graph
        self._gen_compute = self._compiler.wrap(self._generator_compute, "steps")
        self._gen_logits_compute = self._compiler.wrap(self._generator_logits_compute, "steps")
        self._crit_compute = self._compiler.wrap(self._critic_compute, "steps")
        adam = dict(betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.adam_eps, fused=cfg.fused_optimizer)
        self.opt_student = speed.adamw(self.student.parameters(), cfg.lr_student, **adam)
        self.opt_fake = speed.adamw(self.fake_score.parameters(), cfg.lr_fake, **adam)
        self.opt_disc = speed.adamw(self.disc.parameters(), cfg.lr_disc, **adam)
        self.label_dim = int(getattr(teacher, "label_dim", 0))
        self.step_count = 0
        self.history: list[dict[str, float]] = []

    def _wrap(self, net: nn.Module) -> nn.Module:
        """The network as called in training: DDP-wrapped on several ranks (gradients averaged), else itself."""
        if self.world_size == 1:
            return net
        ids = [self.device.index] if self.device.type == "cuda" else None
        # compile="networks": DDP around the compiled network (dynamo cannot trace DDP's forward into one graph)
        return DistributedDataParallel(self._compiler.wrap(net, "networks"), device_ids=ids,
                                       gradient_as_bucket_view=True, **_NO_BUFFER_SYNC)

    # ------------------------------------------------------------------ network calls

    def _net(self, net: nn.Module, eager: bool = False) -> nn.Module:
        """What calls ``net``: its compiled version with compile="networks" (unless ``eager``), else itself."""
        return net if eager else self._compiled.get(id(net), net)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return speed.memory_format(x, self.config.channels_last)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _shape(self, n: int) -> tuple[int, int, int, int]:
        return (n, self.teacher.img_channels, self.teacher.img_resolution, self.teacher.img_resolution)

    def _labels(self, real_labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Generator labels: the real batch's (FastGen) or uniform random (DMD2); None if unconditional."""
        if self.label_dim == 0:
            return None
        if self.config.generator_labels == "uniform" or real_labels is None:
            return self.rng.labels(n, self.label_dim)
        return real_labels.to(self.device)

    def _generate(self, z: torch.Tensor, labels: torch.Tensor | None, net: nn.Module | None = None) -> torch.Tensor:
        """x = G(student_sigma z) in fp32 for latents ``z``."""
        n, s = z.shape[0], self.config.student_sigma
        with self._autocast():
            x = self._net(net or self._student_fwd)(self._input(z * s), torch.full((n,), s, device=z.device), labels)
        return x.float()

    def _features(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                  decoder: str = "grad", eager: bool = False) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(x0, features) of ``net``. ``decoder`` "no_grad" (x0 is only used detached) or "skip" (x0 unused)
        saves the decoder's memory or work on EDM networks; other networks run whole (same results), unless they
        declare ``decoder_modes``. ``eager``: never the compiled network (R1's pass, whose double backward
        torch.compile lacks)."""
        takes = getattr(net, "decoder_modes", isinstance(net, EDMPrecond))  # adapters may declare support
        kwargs = {"decoder": decoder} if decoder != "grad" and takes else {}
        with self._autocast():
            x0, feats = self._net(net, eager)(self._input(x), sigma, labels, return_features=True, **kwargs)
        return (x0.float() if x0 is not None else None), feats

    def _denoise(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None
                 ) -> torch.Tensor:
        with self._autocast():
            return self._net(net)(self._input(x), sigma, labels).float()

    def _logits(self, feats: dict[str, torch.Tensor], disc: nn.Module | None = None, eager: bool = False
                ) -> torch.Tensor:
        """The discriminator heads' logits [B, H] in fp32, one column per head (``disc_features``)."""
        with self._autocast():
            return self._net(disc or self._disc_fwd, eager)(feats).float()

    def _micro_batches(self, images: torch.Tensor, labels: torch.Tensor | None
                       ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        k = self.config.accum_steps
        if images.shape[0] % k:
            raise ValueError(f"batch size {images.shape[0]} is not divisible by accum_steps={k}")
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
        if self.label_dim and labels is None:
            raise ValueError("the teacher is class-conditional: pass labels with the real batch")
        imgs = images.to(self.device, torch.float32).chunk(k)
        labs = labels.to(self.device).chunk(k) if labels is not None else (None,) * k
        return list(zip(imgs, labs))

    # ------------------------------------------------------------------ the two objectives
    # Each micro-batch first draws its random numbers (eagerly), then runs one forward computation of them (the
    # networks, the weighting, the losses): one function, which compile="steps" compiles as one graph.

    def _generator_draws(self, real_labels: torch.Tensor | None, n: int
                         ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels, latents z, sigma, eps) of a generator micro-batch, in this order of draws."""
        labels = self._labels(real_labels, n)
        z = self.rng.randn(*self._shape(n))
        sigma = self.draw_sigma(n, critic=False)
        return labels, z, sigma, self.rng.randn(*self._shape(n))

    def draw_sigma(self, n: int, critic: bool) -> torch.Tensor:
        """Noise levels of a generator (``critic`` False) or critic micro-batch: uniform indices of the Karras
        grid (section 9). Subclasses with another noise schedule (the text-to-image trainer) override this."""
        cfg = self.config
        lo, hi = (cfg.fake_min_index, cfg.fake_max_index) if critic else (cfg.min_index, cfg.max_index)
        return self.rng.sigma(n, lo, hi, cfg.num_grid)

    def _generator_predict(self, sigma: torch.Tensor, labels: torch.Tensor | None
                           ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """x_t -> (x0_teacher, x0_fake, logits [B, H]): the discriminator reads the features of the network that
        ``disc_placement`` names, in the same call as its x0. Frozen critics, called unwrapped (DDP-safe)."""
        def predict(x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if self.config.disc_placement == "teacher":
                with torch.no_grad():
                    x0_fake = self._denoise(self.fake_score, x_t, sigma, labels)
                x0_teacher, feats = self._features(self.teacher, x_t, sigma, labels, decoder="no_grad")
            else:
                with torch.no_grad():
                    x0_teacher = self._denoise(self.teacher, x_t, sigma, labels)
                x0_fake, feats = self._features(self.fake_score, x_t, sigma, labels, decoder="no_grad")
            return x0_teacher, x0_fake, self._logits(feats, self.disc)
        return predict

    def _generator_compute(self, z: torch.Tensor, labels: torch.Tensor | None, sigma: torch.Tensor,
                           eps: torch.Tensor, weights: tuple[torch.Tensor, Scalars] | None
                           ) -> tuple[torch.Tensor, Scalars]:
        """:func:`~fdistill_lab.method.generator_objective` of x = G(z) with the drawn sigma and eps."""
        cfg = self.config
        return generator_objective(self._generate(z, labels), sigma, eps, self._generator_predict(sigma, labels),
                                   self.weighting, cfg.gan_weight_gen, cfg.dmd_normalize, weights, cfg.gan_head_loss)

    def _generator_loss(self, real_labels: torch.Tensor | None, n: int,
                        weights: tuple[torch.Tensor, Scalars] | None = None) -> tuple[torch.Tensor, Scalars]:
        """The generator objective on one micro-batch. ``weights``: (h_norm, statistics) computed beforehand over
        the whole batch (:meth:`_batch_weights`); None computes them from this one."""
        labels, z, sigma, eps = self._generator_draws(real_labels, n)
        return self._compiler.call(self._gen_compute, z, labels, sigma, eps, weights)

    @torch.no_grad()
    def _generator_logits_compute(self, z: torch.Tensor, labels: torch.Tensor | None, sigma: torch.Tensor,
                                  eps: torch.Tensor) -> torch.Tensor:
        x = self._generate(z, labels)
        net = self.teacher if self.config.disc_placement == "teacher" else self.fake_score
        _, feats = self._features(net, noisy(x, sigma, eps), sigma, labels, decoder="skip")
        return mean_logit(self._logits(feats, self.disc))

    def _generator_logits(self, real_labels: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean logits [B] (what the ratio needs) and noise levels of one generator micro-batch, with the same
        draws as :meth:`_generator_loss` makes from the same random states (the networks drawing nothing in
        between: the teacher is in eval mode, and the fake score's no-grad denoising comes after the draws that
        reach the logits)."""
        labels, z, sigma, eps = self._generator_draws(real_labels, n)
        return self._compiler.call(self._gen_logits_compute, z, labels, sigma, eps), sigma

    def _batch_weights(self, chunks: list[tuple[torch.Tensor, torch.Tensor | None]]
                       ) -> tuple[list[list[Any]], list[tuple[torch.Tensor, Scalars]]]:
        """Both normalisation stages over the whole batch when it is split into micro-batches (section 5): a
        first, gradient-free pass gives every micro-batch's logits, the weighting runs once on all of them (one
        bin update, one batch mean), and the random states are kept so the gradient pass replays the same draws.
        Returns (random states before each micro-batch, (h, statistics) of each micro-batch)."""
        states, logits, sigmas = [], [], []
        for imgs, labs in chunks:
            states.append(self.rng.snapshot())
            lg, sg = self._generator_logits(labs, imgs.shape[0])
            logits.append(lg)
            sigmas.append(sg)
        h, wstats = self.weighting(torch.cat(logits), torch.cat(sigmas), update=True)
        summary = wstats.summary_tensors()
        return states, [(part, summary) for part in h.split([lg.shape[0] for lg in logits])]

    def _critic_draws(self, real: torch.Tensor, real_labels: torch.Tensor | None
                      ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]:
        """(labels, z, sigma, eps, sigma_real, eps_real) of a critic micro-batch, in this order of draws."""
        cfg = self.config
        n = real.shape[0]
        labels = self._labels(real_labels, n)
        z = self.rng.randn(*self._shape(n))
        sigma = self.draw_sigma(n, critic=True)
        eps = self.rng.randn(*self._shape(n))
        if cfg.real_same_t:
            return labels, z, sigma, eps, sigma, eps
        return labels, z, sigma, eps, self.draw_sigma(n, critic=True), self.rng.randn(*real.shape)

    def _critic_compute(self, real: torch.Tensor, real_labels: torch.Tensor | None, labels: torch.Tensor | None,
                        z: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, sigma_r: torch.Tensor,
                        eps_r: torch.Tensor) -> tuple[torch.Tensor, Scalars]:
        """:func:`~fdistill_lab.method.critic_objective` on detached student samples G(z) and one real
        micro-batch, with the drawn noise."""
        cfg = self.config
        n = real.shape[0]
        with torch.no_grad():
            x_fake = self._generate(z, labels, self.student)
        use_r1 = cfg.r1_gamma > 0
        both_labels = torch.cat([labels, real_labels]) if labels is not None else None

        def predict(x_t: torch.Tensor, x_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # fake and real go through each network in one batched call (one forward per backward: DDP-safe)
            both_x, both_sigma = torch.cat([x_t, x_r]), torch.cat([sigma, sigma_r])
            # R1 differentiates the discriminator's input gradient: attention without the fused kernels, eager
            # networks (torch.compile has no double backward)
            twice = twice_differentiable() if use_r1 else contextlib.nullcontext()
            if cfg.disc_placement == "teacher":
                x0_fake = self._denoise(self._fake_fwd, x_t, sigma, labels)
                with torch.set_grad_enabled(use_r1), twice:
                    _, feats = self._features(self.teacher, both_x, both_sigma, both_labels, decoder="skip",
                                              eager=use_r1)
                if not use_r1:
                    feats = {k: v.detach() for k, v in feats.items()}
            else:
                with twice:
                    x0_both, feats = self._features(self._fake_fwd, both_x, both_sigma, both_labels, eager=use_r1)
                x0_fake = x0_both[:n]
            logits_fake, logits_real = self._logits(feats, eager=use_r1).split([n, n])
            return x0_fake, logits_fake, logits_real

        return critic_objective(x_fake, sigma, eps, real, sigma_r, eps_r, predict, cfg.fake_score_weighting,
                                gan_weight=cfg.gan_weight_disc, r1_gamma=cfg.r1_gamma,
                                gan_head_loss=cfg.gan_head_loss)

    def _critic_loss(self, real: torch.Tensor, real_labels: torch.Tensor | None) -> tuple[torch.Tensor, Scalars]:
        """:func:`~fdistill_lab.method.critic_objective` on detached student samples and one real micro-batch."""
        labels, z, sigma, eps, sigma_r, eps_r = self._critic_draws(real, real_labels)
        real_labels = real_labels.to(self.device) if labels is not None else None
        return self._compiler.call(self._crit_compute, real, real_labels, labels, z, sigma, eps, sigma_r, eps_r)

    # ------------------------------------------------------------------ steps

    def generator_step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """One student update (accumulated over micro-batches), gradient clip, AdamW step, EMA update.
        ``images`` only sets the batch size; ``labels`` are the generator's labels when
        ``generator_labels="real"``."""
        cfg = self.config
        self.opt_student.zero_grad(set_to_none=True)
        self._compiler.begin_step()
        logs: list[Scalars] = []
        chunks = self._micro_batches(images, labels)
        with frozen(self.fake_score, self.disc):
            # with micro-batches, the weights are normalised over the whole batch first (not per micro-batch)
            states, weights = self._batch_weights(chunks) if len(chunks) > 1 else ([], [])
            for i, (imgs, labs) in enumerate(chunks):
                if states:
                    self.rng.restore(states[i])
                with _local_grads_unless(i == len(chunks) - 1, self._student_fwd):
                    loss, stats = self._generator_loss(labs, imgs.shape[0], weights[i] if weights else None)
                    (loss / cfg.accum_steps).backward()
                logs.append(stats)
        params = list(self.student.parameters())
        if cfg.grad_clip is not None:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = _grad_norm(params, self.device)
        self.opt_student.step()
        self._update_ema()
        return _read_logs(logs, grad_norm_student=gnorm)

    def critic_step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """One update of the fake score (DSM) and the discriminator heads (GAN D loss) on a real batch."""
        cfg = self.config
        self.opt_fake.zero_grad(set_to_none=True)
        self.opt_disc.zero_grad(set_to_none=True)
        self._compiler.begin_step()
        logs: list[Scalars] = []
        chunks = self._micro_batches(images, labels)
        for i, (imgs, labs) in enumerate(chunks):
            with _local_grads_unless(i == len(chunks) - 1, self._fake_fwd, self._disc_fwd):
                loss, stats = self._critic_loss(imgs, labs)
                (loss / cfg.accum_steps).backward()
            logs.append(stats)
        params = list(self.fake_score.parameters()) + list(self.disc.parameters())
        if cfg.critic_grad_clip is not None:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.critic_grad_clip)
        else:
            gnorm = _grad_norm(params, self.device)
        self.opt_fake.step()
        self.opt_disc.step()
        return _read_logs(logs, grad_norm_critic=gnorm)

    def updates(self, i: int | None = None) -> tuple[bool, bool]:
        """(generator?, critic?) at iteration ``i`` (default: the next); see :func:`.method.iteration_updates`."""
        cfg = self.config
        return iteration_updates(self.step_count if i is None else i, cfg.schedule, cfg.student_update_freq,
                                 cfg.critic_warmup)

    def step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """One iteration of the schedule on one real batch; returns (and appends to ``history``) its logs."""
        t0 = time.perf_counter()
        gen, critic = self.updates()
        logs: dict[str, float] = {"step": float(self.step_count), "generator_step": float(gen)}
        if gen:
            logs.update(self.generator_step(images, labels))
        if critic:
            logs.update(self.critic_step(images, labels))
        self.step_count += 1
        dt = time.perf_counter() - t0
        logs["time_s"] = dt
        logs["images_per_s"] = images.shape[0] / max(dt, 1e-9)
        self.history.append(logs)
        return logs

    @torch.no_grad()
    def _update_ema(self) -> None:
        beta = self.config.ema_beta
        for p_ema, p in zip(self.student_ema.parameters(), self.student.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.student_ema.buffers(), self.student.buffers()):
            b_ema.copy_(b)

    @torch.no_grad()
    def sample(self, n: int | None = None, labels: torch.Tensor | None = None, z: torch.Tensor | None = None,
               use_ema: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """One-step samples G(80 z; 80, y). Uses its own ``generator`` (not the training stream); latents and
        labels are drawn on its device."""
        on = generator.device if generator is not None else torch.device("cpu")
        if z is None:
            if n is None:
                n = labels.shape[0] if labels is not None else None
            if n is None:
                raise ValueError("pass n, labels or z")
            z = torch.randn(*self._shape(n), generator=generator, device=on)
        n = z.shape[0]
        if labels is None and self.label_dim:
            labels = torch.randint(0, self.label_dim, (n,), generator=generator, device=on)
        net = self.student_ema if use_ema else self.student
        s = self.config.student_sigma
        z = z.to(self.device)
        with self._autocast():
            x = net(z * s, torch.full((n,), s, device=self.device), labels.to(self.device) if labels is not None
                    else None)
        return x.float()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume (the teacher is not included: it is frozen)."""
        return {
            "format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "step": self.step_count,
            "student": self.student.state_dict(), "student_ema": self.student_ema.state_dict(),
            "fake_score": self.fake_score.state_dict(), "disc": self.disc.state_dict(),
            "weighting": self.weighting.state_dict(), "opt_student": self.opt_student.state_dict(),
            "opt_fake": self.opt_fake.state_dict(), "opt_disc": self.opt_disc.state_dict(),
            "rng": self.rng.cpu.get_state(), "device_rng": self.rng.state_dict()["device"],
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a checkpoint of another configuration raises ValueError."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not an f-distill trainer state (format {state.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT!r})")
        diff = self.config.differences(state["config"])
        if diff:
            raise ValueError("checkpoint was written with another configuration (setting: (checkpoint, "
                             f"current)): {diff}")
        if "device_rng" in state and (state["device_rng"] is None) != (self.rng.on_device is None):
            raise ValueError("checkpoint was written with another rng_mode; resume with the same rng_mode")
        self.student.load_state_dict(state["student"])
        self.student_ema.load_state_dict(state["student_ema"])
        self.fake_score.load_state_dict(state["fake_score"])
        self.disc.load_state_dict(state["disc"])
        self.weighting.load_state_dict(state["weighting"])
        self.opt_student.load_state_dict(state["opt_student"])
        self.opt_fake.load_state_dict(state["opt_fake"])
        self.opt_disc.load_state_dict(state["opt_disc"])
        if "device_rng" in state:  # (checkpoints before the merged trainer kept the device stream in ``extra``)
            self.rng.load_state_dict({"cpu": state["rng"], "device": state["device_rng"]})
        else:
            self.rng.cpu.set_state(state["rng"])
        self.step_count = int(state["step"])
        self.history = [dict(h) for h in state.get("history", [])]

    def checkpoint_state(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`state_dict` plus ``extra`` (e.g. a data sampler's state), as :meth:`save_checkpoint` writes it."""
        state = self.state_dict()
        if extra:
            state["extra"] = extra
        return state

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Atomic save (temporary file + os.replace) of :meth:`checkpoint_state`."""
        return atomic_save(self.checkpoint_state(extra), path)

    def load_checkpoint(self, path: str | Path, fix: str = "delete it to start afresh") -> dict[str, Any]:
        """Load a checkpoint written by :meth:`save_checkpoint`; returns its ``extra`` dict. ``fix``: what the
        error for an unreadable file tells the user to do."""
        state = load_file(path, "f-distill trainer checkpoint", fix,
                          required_keys=("format", "config", "step", "student"),
                          mmap=self.device.type == "cuda")  # GPU ranks share one mapped copy in host memory
        try:
            self.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return state.get("extra", {})

    WEIGHT_KEYS = ("student", "student_ema", "fake_score", "disc", "weighting")

    def load_weights(self, path: str | Path) -> dict[str, Any]:
        """Start from another run's networks: load the student, its EMA, the fake score, the discriminator and
        the ratio-bin state of a checkpoint written by :meth:`save_checkpoint`, whatever settings wrote it.
        Optimiser states, the step counter and the RNG stay fresh. This is a fine-tuning stage, such as the
        paper's ImageNet-64 stage at lr 5e-7 (Table 5), or DMD2's restart of its best no-GAN run with the GAN
        on. Returns the checkpoint (its ``config``, ``step`` and ``extra``). The networks must have the same
        shapes (the same teacher, discriminator and bin settings); if not, ValueError names the part that differs.
        """
        state = load_file(path, "f-distill trainer checkpoint", "init_from takes a trainer checkpoint "
                          "(<run>/checkpoints/ckpt_*.pt) or a run folder, not an exported student",
                          required_keys=("format", "config", "step", *self.WEIGHT_KEYS),
                          mmap=self.device.type == "cuda")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an f-distill trainer checkpoint (format {state.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT!r})")
        for key in self.WEIGHT_KEYS:
            try:
                getattr(self, key).load_state_dict(state[key])
            except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
                raise ValueError(
                    f"{path}: its {key} does not fit this run ({str(exc).splitlines()[0][:300]}...); the "
                    "teacher and the discriminator and bin settings must be those of the run that wrote it") from None
        return state


def _read_logs(logs: list[Scalars], **extra: torch.Tensor) -> dict[str, float]:
    """Micro-batch means of the logged scalars, plus ``extra``, as floats read back from the device in one
    transfer (a float() per value would make the host wait for a GPU a dozen times per iteration)."""
    keys = list(logs[0])
    values = [d[k] for d in logs for k in keys] + list(extra.values())
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in values))
    flat = torch.stack([v.detach().to(dtype) for v in values]).tolist()
    n = len(keys)
    out = {k: sum(flat[j * n + i] for j in range(len(logs))) / len(logs) for i, k in enumerate(keys)}
    return {**out, **dict(zip(extra, flat[n * len(logs):]))}


def fit(
    trainer: FDistillTrainer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    steps: int,
    progress: bool = True,
    desc: str = "f-distill",
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Run ``steps`` iterations from ``batches`` with a tqdm.auto progress bar; returns their logs."""
    from tqdm.auto import tqdm

    _int_at_least("steps", steps, 0)
    it = iter(batches)
    logs = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=True)
    for _ in bar:
        images, labels = next(it)
        out = trainer.step(images, labels)
        logs.append(out)
        if callback is not None:
            callback(trainer.step_count, out)
        if "loss_f" in out:
            bar.set_postfix(loss_f=f"{out['loss_f']:.3g}", ratio=f"{out['ratio_mean']:.2f}", refresh=False)
    return logs


__all__ = ["CHECKPOINT_FORMAT", "DistillConfig", "FDistillTrainer", "fit"]  # DistillConfig: from .config
