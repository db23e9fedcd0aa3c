"""Building blocks of EDM's U-Nets, written from the published formulas and parameter names.

Source: Karras et al. 2022 (EDM), appendix on network architectures, and the parameter names of EDM's released
checkpoints. Parameter and buffer names/shapes equal EDM's so that released checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "weight_init",
    "Linear",
    "Conv2d",
    "GroupNorm",
    "PositionalEmbedding",
    "FourierEmbedding",
    "UNetBlock",
    "attention",
    "DECODER_MODES",
    "check_decoder_mode",
    "twice_differentiable",
    "use_compiled_norms",
    "eager_norms",
]

# how a U-Net backbone runs its decoder: as usual, without autograd (the caller needs only the encoder features'
# gradient: no decoder activations kept), or not at all (features only)
DECODER_MODES = ("grad", "no_grad", "skip")


def check_decoder_mode(decoder: str) -> None:
    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder must be one of {DECODER_MODES}; got {decoder!r}")

LOW_PRECISION = (torch.float16, torch.bfloat16)

InitSpec = dict  # {'init_mode': str, 'init_weight': float, 'init_bias': float}


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random tensor for EDM's init modes (xavier/kaiming, uniform/normal). Only matters when training
    from scratch; teachers and students are initialised from checkpoints."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(
        f"unknown init_mode {mode!r}; valid: xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal"
    )


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like.dtype)


class Linear(nn.Module):
    """Fully connected layer: ``weight`` [out, in], optional ``bias`` [out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fan = dict(fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], init_mode, **fan) * init_weight)
        if bias:
            self.bias = nn.Parameter(weight_init([out_features], init_mode, **fan) * init_bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), _cast(self.bias, x))


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down-sampling by a separable FIR filter (buffer
    ``resample_filter`` [1,1,k,k], present only when resampling). ``kernel=0`` is a pure resampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        if up and down:
            raise ValueError("Conv2d cannot both up- and down-sample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.fold_bias = False  # add the bias inside a plain convolution's kernel (speed setting fold_biases)
        fan = dict(fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        if kernel:
            w = weight_init([out_channels, in_channels, kernel, kernel], init_mode, **fan) * init_weight
            self.weight = nn.Parameter(w)
        else:
            self.register_parameter("weight", None)
        if kernel and bias:
            self.bias = nn.Parameter(weight_init([out_channels], init_mode, **fan) * init_bias)
        else:
            self.register_parameter("bias", None)
        if up or down:
            f1 = torch.as_tensor(list(resample_filter), dtype=torch.float32)
            f = torch.outer(f1, f1)[None, None] / f1.sum().square()
            self.register_buffer("resample_filter", f)
        else:
            self.register_buffer("resample_filter", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _cast(self.weight, x)
        f = _cast(self.resample_filter, x)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            ft = (f * 4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(x, ft, groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                ft = (f * 4).tile([self.in_channels, 1, 1, 1])
                x = F.conv_transpose2d(x, ft, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                             padding=f_pad)
            if w is not None and _pad_channels(x, w):
                x = _conv2d_padded(x, w, w_pad)
            elif w is not None:
                folded = self.fold_bias and self.bias is not None
                x = F.conv2d(x, w, _cast(self.bias, x) if folded else None, padding=w_pad)
                if folded:
                    return x
        if self.bias is not None:  # in the output's dtype: bf16/fp16 under autocast, as in EDM's fp16 mode
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


def _low_precision(x: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` runs in bf16/fp16 (low-precision input or autocast on its device)."""
    if x.dtype in LOW_PRECISION:
        return True
    if x.dtype != torch.float32:  # autocast leaves float64 alone
        return False
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()
    except RuntimeError:  # a device type autocast does not know (e.g. meta tensors)
        return False


def _pad_channels(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Image-channel convolutions (3 in or out) in low precision have no tensor-core kernels: pad to 8."""
    return bool((w.shape[0] % 8 or w.shape[1] % 8) and _low_precision(x))


def _conv2d_padded(x: torch.Tensor, w: torch.Tensor, padding: int) -> torch.Tensor:
    """``F.conv2d(x, w, padding=padding)`` with in/out channels zero-padded to multiples of 8 (the zeros add
    nothing; the output is sliced back)."""
    cout, cin = w.shape[:2]
    pin, pout = -cin % 8, -cout % 8
    if pin:
        x = F.pad(x, (0, 0, 0, 0, 0, pin))
    w = F.pad(w, (0, 0, 0, 0, 0, pin, 0, pout))
    return F.conv2d(x, w, padding=padding)[:, :cout]


def _norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
              add: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None,
              act: bool) -> torch.Tensor:
    """silu(group_norm(x + add) * (1 + scale) + shift), each of add / scale-shift / silu optional."""
    if add is not None:
        x = x + add
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        y = torch.addcmul(shift, y, scale + 1)
    return F.silu(y) if act else y


_compiled_norm_act: Callable[..., torch.Tensor] | None = None
_eager_norms = contextvars.ContextVar("fdistill_eager_norms", default=False)
# one graph per shape x dtype x which inputs need grad x variant: a full ADM training step needs many
COMPILE_RECOMPILE_LIMIT = 512


def _get_compiled_norm_act() -> Callable[..., torch.Tensor]:
    global _compiled_norm_act
    if _compiled_norm_act is None:
        import torch._dynamo

        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        setattr(cfg, name, max(getattr(cfg, name), COMPILE_RECOMPILE_LIMIT))
        # static shapes: a graph per shape, each with kernels tuned to it (on an H200, dynamic-shape kernels made
        # the ADM student's forward+backward 32% slower than eager, static ones took 13% less GPU time than eager)
        _compiled_norm_act = torch.compile(_norm_act, dynamic=False, fullgraph=True)
    return _compiled_norm_act


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups.

    :meth:`norm_act` also applies what follows the norm in the U-Net blocks (embedding scale/shift, SiLU). With
    ``compiled`` set (see :func:`use_compiled_norms`) that runs as one ``torch.compile``d function, i.e. a few
    fused kernels instead of a normalisation kernel and one memory pass per elementwise op.
    """

    def __init__(
        self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.compiled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_act(x, act=False)

    def norm_act(self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                 act: bool = True, add: torch.Tensor | None = None) -> torch.Tensor:
        """silu(norm(x + add) * (1 + scale) + shift); ``add``, ``scale``/``shift`` (together) and ``act`` optional."""
        if (scale is None) != (shift is None):
            raise ValueError("scale and shift go together: pass both or neither")
        # bf16/fp16 input is normalised as it is (statistics accumulate in float32 inside the kernel), as in EDM's
        # fp16 mode; autocast would make a float32 copy and so every later activation float32 (twice the memory)
        low = x.dtype in LOW_PRECISION
        fn = _get_compiled_norm_act() if self.compiled and not _eager_norms.get() else _norm_act
        with torch.autocast(x.device.type, enabled=False) if low else contextlib.nullcontext():
            return fn(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.num_groups, self.eps, add, scale,
                      shift, act)


@contextlib.contextmanager
def eager_norms() -> Iterator[None]:
    """Run compiled norms (:func:`use_compiled_norms`) eagerly inside this context (e.g. under a FLOP counter)."""
    token = _eager_norms.set(True)
    try:
        yield
    finally:
        _eager_norms.reset(token)


def use_compiled_norms(net: nn.Module, enabled: bool = True) -> int:
    """Run every :class:`GroupNorm` of ``net`` with its scale/shift and SiLU through ``torch.compile`` (or back
    in eager mode); returns how many there are. Numerically equal up to rounding (the fused kernels round once,
    eager rounds after every op). Each new activation shape compiles once: about a minute for the first forward
    and backward of the full ADM on a GPU, minutes on a CPU."""
    norms = [m for m in net.modules() if isinstance(m, GroupNorm)]
    for m in norms:
        m.compiled = enabled
    return len(norms)


class PositionalEmbedding(nn.Module):
    """Transformer-style embedding of a scalar per sample: [cos(x f_j), sin(x f_j)] with
    f_j = (1/max_positions)^(j / (C/2 - endpoint)). The table is built in float64 for float64 input
    and in float32 otherwise (EDM builds it in float32)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=dt, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++): buffer ``freqs`` ~ N(0, scale^2), output [cos, sin]."""

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Context for forward passes that will be differentiated twice (the R1 penalty's gradient of a gradient):
    the fused kernels that bf16/fp16 :func:`attention` uses have no second derivative, the math backend has; and
    compiled norms (:func:`use_compiled_norms`) run eagerly (``torch.compile`` has no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with eager_norms(), sdpa_kernel(SDPBackend.MATH):
        yield


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over the pixels of ``qkv`` [B, 3C, H, W].

    EDM's layout: channels are viewed as [B*heads, C/heads, 3, HW] and
    split on the size-3 axis, so q, k, v are interleaved per channel inside each head. For float32/float64
    input the logits q.k / sqrt(C/heads) and the softmax are computed as EDM does, in float32 (float64 for
    float64 input) with autocast disabled. For bf16/fp16 input (mixed-precision training) the same
    attention goes through ``F.scaled_dot_product_attention`` (fused flash kernel on GPUs: float32
    accumulation and softmax on the bf16/fp16 values, without the [HW, HW] matrices in memory).
    Returns [B, C, H, W].
    """
    b, c3, h, w = qkv.shape
    c = c3 // 3
    q, k, v = qkv.reshape(b * num_heads, c // num_heads, 3, h * w).unbind(2)
    if qkv.dtype in LOW_PRECISION:
        q, k, v = (t.reshape(b, num_heads, c // num_heads, h * w).transpose(2, 3).contiguous() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(2, 3).reshape(b, c, h, w)
    dt = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    with torch.autocast(qkv.device.type, enabled=False):
        logits = torch.einsum("ncq,nck->nqk", q.to(dt), (k / math.sqrt(k.shape[1])).to(dt))
        weights = logits.softmax(dim=2).to(v.dtype)
    out = torch.einsum("nqk,nck->ncq", weights, v)
    return out.reshape(b, c, h, w)


class UNetBlock(nn.Module):
    """Residual block shared by ADM and DDPM++: GroupNorm-SiLU-conv, embedding injection, GroupNorm-SiLU-
    dropout-conv, skip, optional self-attention (EDM's network appendix).

    Submodules in EDM's order: norm0, conv0, affine, norm1, conv1, [skip], [norm2, qkv, proj].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: InitSpec | None = None,
        init_zero: InitSpec | None = None,
        init_attn: InitSpec | None = None,
    ) -> None:
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip: Conv2d | None = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(self.norm0.norm_act(x))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = self.norm1.norm_act(x, scale=scale, shift=shift)
        else:
            x = self.norm1.norm_act(x, add=params)
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale
        if self.num_heads:
            a = attention(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(a) + x) * self.skip_scale
        return x
