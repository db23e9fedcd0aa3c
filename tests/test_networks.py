"""EDM-compatible networks against the golden fixtures in shared/reference/edm (README there)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fdistill_lab.networks import (
    EDMPrecond,
    UNetBlock,
    build_edm,
    cifar10_ddpmpp_config,
    count_parameters,
    imagenet64_adm_config,
    tiny_adm_config,
    tiny_ddpmpp_config,
)

ATOL_F32 = 5e-6  # README "Recommended tolerances"
ATOL_F32_INTERMEDIATE = 1e-5
ATOL_F64 = 1e-9


def _load(edm_fixtures: Path, name: str) -> dict:
    return torch.load(edm_fixtures / name, weights_only=True)


def _net_from_fixture(fx: dict, dtype: torch.dtype = torch.float32) -> EDMPrecond:
    net = build_edm(**fx["config"])
    net.load_state_dict(fx["state_dict"], strict=True)
    return net.eval().to(dtype)


def _capture(net: EDMPrecond, names: list[str]) -> tuple[dict, list]:
    out: dict[str, torch.Tensor] = {}
    mods = dict(net.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n in names]
    return out, handles


@pytest.mark.parametrize("fixture", ["adm_tiny.pt", "ddpmpp_tiny.pt"])
def test_state_dict_names_order_shapes(edm_fixtures, fixture):
    fx = _load(edm_fixtures, fixture)
    net = build_edm(**fx["config"])
    ours = net.state_dict()
    assert list(ours) == list(fx["state_dict"])
    for k, v in fx["state_dict"].items():
        assert ours[k].shape == v.shape, k
        if k.endswith("resample_filter"):
            assert torch.equal(ours[k], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fixture", ["adm_tiny.pt", "ddpmpp_tiny.pt"])
def test_golden_outputs(edm_fixtures, fixture, dtype):
    fx = _load(edm_fixtures, fixture)
    net = _net_from_fixture(fx, dtype)
    inp = {k: v.to(dtype) for k, v in fx["inputs"].items()}
    kw = {"augment_labels": inp["augment_labels"]} if "augment_labels" in inp else {}
    f64 = dtype == torch.float64
    inter_names = [k for k in fx["intermediates_f64" if f64 else "intermediates"] if k != "model"]
    captured, handles = _capture(net, inter_names + ["model"])
    with torch.no_grad():
        out, feats = net(inp["x"], inp["sigma"], inp["class_labels"], return_features=True, **kw)
    for h in handles:
        h.remove()
    assert out.dtype == dtype
    if f64:
        torch.testing.assert_close(out, fx["outputs_f64"], atol=ATOL_F64, rtol=0)
        for k in inter_names:
            torch.testing.assert_close(captured[k], fx["intermediates_f64"][k], atol=ATOL_F64, rtol=0)
    else:
        torch.testing.assert_close(out, fx["outputs"], atol=ATOL_F32, rtol=0)
        torch.testing.assert_close(out, fx["outputs_f64"].float(), atol=ATOL_F32, rtol=0)
        for k in inter_names + ["model"]:
            torch.testing.assert_close(captured[k], fx["intermediates"][k], atol=ATOL_F32_INTERMEDIATE, rtol=0)
        torch.testing.assert_close(feats["bottleneck"], fx["bottleneck"], atol=ATOL_F32_INTERMEDIATE, rtol=0)
    if "inputs_aug" in fx:
        aug = fx["inputs_aug"]["augment_labels"].to(dtype)
        with torch.no_grad():
            out_aug = net(inp["x"], inp["sigma"], inp["class_labels"], augment_labels=aug)
        ref = fx["outputs_aug_f64"] if f64 else fx["outputs_aug"]
        torch.testing.assert_close(out_aug, ref, atol=ATOL_F64 if f64 else ATOL_F32, rtol=0)
        assert (out_aug - out).abs().max() > 1e-3  # augment labels really matter


def test_features_bottleneck_module_and_resolutions(edm_fixtures):
    fx = _load(edm_fixtures, "adm_tiny.pt")
    net = _net_from_fixture(fx)
    captured, handles = _capture(net, [fx["bottleneck_module"], "model.enc.16x16_block0"])
    inp = fx["inputs"]
    with torch.no_grad():
        _, feats = net(inp["x"], inp["sigma"], inp["class_labels"], return_features=True)
    for h in handles:
        h.remove()
    assert set(feats) == {"bottleneck", "16x16", "8x8"}
    assert torch.equal(feats["bottleneck"], captured[fx["bottleneck_module"]])
    assert torch.equal(feats["8x8"], feats["bottleneck"])
    assert torch.equal(feats["16x16"], captured["model.enc.16x16_block0"])
    assert feats["bottleneck"].shape == (4, 64, 8, 8)


def test_unetblock_four_heads(edm_fixtures):
    fx = _load(edm_fixtures, "unetblock_attn4.pt")
    cfg = fx["config_resolved"]
    block = UNetBlock(cfg["in_channels"], cfg["out_channels"], cfg["emb_channels"], attention=True,
                      num_heads=cfg["num_heads"], dropout=0.0, eps=cfg["eps"])
    assert list(block.state_dict()) == list(fx["state_dict"])
    block.load_state_dict(fx["state_dict"], strict=True)
    block.eval()
    with torch.no_grad():
        out = block(fx["inputs"]["x"], fx["inputs"]["emb"])
        out64 = block.double()(fx["inputs"]["x"].double(), fx["inputs"]["emb"].double())
    torch.testing.assert_close(out, fx["outputs"], atol=5e-6, rtol=0)
    torch.testing.assert_close(out64, fx["outputs_f64"], atol=1e-9, rtol=0)


def _read_list(path: Path) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    rows, total = [], None
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            m = re.search(r"parameter elements \((\d+)\)", line)
            total = int(m.group(1)) if m else total
            continue
        name, shape = line.split()
        rows.append((name, tuple(int(s) for s in shape.strip("[]").split(",") if s)))
    return rows, total


@pytest.mark.parametrize(
    "listing,config,n_tensors",
    [("imagenet64_adm_state_dict.txt", imagenet64_adm_config(), 553),
     ("cifar10_ddpmpp_cond_state_dict.txt", cifar10_ddpmpp_config(cond=True), 427)],
)
def test_full_size_state_dict_lists(edm_fixtures, listing, config, n_tensors):
    rows, total = _read_list(edm_fixtures / listing)
    with torch.device("meta"):
        net = build_edm(**config)
    ours = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert len(rows) == n_tensors
    assert ours == rows
    assert count_parameters(net) == total
    buffers = {k for k, _ in net.named_buffers()}
    assert buffers == {k for k, _ in rows if k.endswith(".resample_filter")}


def test_uncond_cifar_config_has_no_label_layer():
    with torch.device("meta"):
        net = build_edm(**cifar10_ddpmpp_config(cond=False))
    assert not any("map_label" in k for k in net.state_dict())
    assert net.label_dim == 0


def test_build_edm_rejects_unknown_type_and_kwargs():
    with pytest.raises(ValueError, match="DhariwalUNet.*SongUNet"):
        build_edm("UNetXL", img_resolution=8, img_channels=3)
    with pytest.raises(ValueError, match="model_channels"):
        build_edm("adm", img_resolution=8, img_channels=3, model_channel=32)
    net = build_edm("ddpmpp", img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1],
                    num_blocks=1, attn_resolutions=[])
    assert net.model_type == "SongUNet"


def _randomise(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("cfg_fn", [tiny_adm_config, tiny_ddpmpp_config])
def test_gradient_flows_to_x_and_scalar_sigma_and_int_labels(cfg_fn):
    torch.manual_seed(0)
    net = build_edm(**cfg_fn(img_resolution=8))
    _randomise(net)
    net.eval().requires_grad_(False)
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    labels = torch.tensor([1, 5, 9])
    out = net(x, 1.5, labels)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    with torch.no_grad():
        ref = net(x, torch.full((3,), 1.5), onehot)
        int_onehot = net(x, torch.full((3,), 1.5), onehot.long())  # integer one-hot rows, not 30 indices
        with pytest.raises(ValueError, match="2 labels for a batch of 3"):
            net(x, 1.5, labels[:2])
    torch.testing.assert_close(out.detach(), ref, atol=0, rtol=0)
    torch.testing.assert_close(int_onehot, ref, atol=0, rtol=0)


def test_autocast_bf16_runs_and_keeps_dtype():
    torch.manual_seed(0)
    net = build_edm(**tiny_adm_config(img_resolution=8)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x, torch.tensor([0.5, 2.0]), torch.tensor([0, 1]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, torch.tensor([0.5, 2.0]), torch.tensor([0, 1]))
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1


def test_conditional_net_without_labels_uses_zeros():
    torch.manual_seed(0)
    net = build_edm(**tiny_adm_config(img_resolution=8)).eval()
    _randomise(net)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = net(x, 1.0)
        b = net(x, 1.0, torch.zeros(2, 10))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_attention_matches_float32(dtype, monkeypatch):
    """bf16/fp16 attention (fused scaled_dot_product_attention) equals EDM's float32 attention computed on the
    same low-precision q, k, v, forward and backward, to the low precision's rounding."""
    from fdistill_lab.networks import layers
    from fdistill_lab.networks.layers import attention

    calls = []
    sdpa = layers.F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    heads, d, res = 3, 16, 8
    qkv = torch.randn(2, 3 * heads * d, res, res).to(dtype).requires_grad_(True)
    ref_in = qkv.detach().float().requires_grad_(True)
    out, ref = attention(qkv, heads), attention(ref_in, heads)
    assert calls == [1], "low precision should take the fused kernel"
    assert out.dtype == dtype and out.shape == ref.shape == (2, heads * d, res, res)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    g = torch.randn_like(ref)
    out.float().backward(g)
    ref.backward(g)
    torch.testing.assert_close(qkv.grad.float(), ref_in.grad, atol=2e-2, rtol=2e-2)


def test_bf16_autocast_keeps_activations_in_bf16():
    """Under bf16 autocast (the trainer's mixed precision) every layer's output stays bf16, as in EDM's fp16
    mode: a float32 GroupNorm output or bias add would silently promote the rest of the network to float32
    (twice the activation memory). The result stays close to the float32 network."""
    from collections import Counter

    from fdistill_lab.networks import layers

    torch.manual_seed(0)
    net = build_edm(**tiny_adm_config(img_resolution=16, channel_mult=[1, 2], attn_resolutions=[8]))
    with torch.no_grad():
        for p in net.parameters():  # EDM zero-initialises some layers; random weights exercise every path
            p.normal_(0, 0.05)
    x, sigma, y = torch.randn(3, 3, 16, 16), torch.tensor([0.3, 2.0, 40.0]), torch.tensor([1, 4, 7])
    seen: Counter = Counter()
    kinds = (layers.UNetBlock, layers.GroupNorm, layers.Conv2d)
    hooks = [m.register_forward_hook(lambda m, i, o: seen.update([(type(m).__name__, o.dtype)]))
             for m in net.modules() if isinstance(m, kinds)]
    ref = net(x, sigma, y)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, sigma, y)
    for h in hooks:
        h.remove()
    assert {dt for _, dt in seen} == {torch.bfloat16}, seen
    assert {name for name, _ in seen} == {"UNetBlock", "GroupNorm", "Conv2d"}
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.02 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("cfg", [tiny_adm_config(), tiny_ddpmpp_config()], ids=["adm", "ddpmpp"])
def test_decoder_modes_give_the_same_features_with_less_work(cfg):
    """decoder="no_grad": same x0 and features, x0 without a graph while the features keep theirs;
    decoder="skip": the encoder alone (no decoder block runs), same features."""
    from fdistill_lab.networks import layers

    torch.manual_seed(0)
    net = build_edm(**cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    r = net.img_resolution
    x = torch.randn(2, 3, r, r, requires_grad=True)
    sigma, y = torch.tensor([0.5, 3.0]), (torch.tensor([1, 2]) if net.label_dim else None)
    calls = []
    dec_blocks = [m for m in net.model.dec.modules() if isinstance(m, layers.UNetBlock)]
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in dec_blocks]
    x0, f = net(x, sigma, y, return_features=True)
    n_full = len(calls)
    x0_ng, f_ng = net(x, sigma, y, return_features=True, decoder="no_grad")
    none, f_skip = net(x, sigma, y, return_features=True, decoder="skip")
    for h in hooks:
        h.remove()
    assert n_full == len(dec_blocks) > 0 and len(calls) == 2 * n_full  # "skip" ran no decoder block
    assert none is None and torch.equal(x0_ng, x0) and not x0_ng.requires_grad and x0.requires_grad
    for k in f:
        assert torch.equal(f_ng[k], f[k]) and torch.equal(f_skip[k], f[k]) and f_skip[k].requires_grad
    with pytest.raises(ValueError, match=r"decoder must be one of \('grad', 'no_grad', 'skip'\); got 'half'"):
        net(x, sigma, y, return_features=True, decoder="half")
    with pytest.raises(ValueError, match="needs return_features=True"):
        net(x, sigma, y, decoder="skip")


def test_image_channel_convolutions_are_padded_to_eight_in_low_precision():
    """3-channel convolutions (the image in/out layers) get zero channels up to 8 in bf16 (GPUs have no
    tensor-core kernels for 3 channels): the same result (float64 exactly, bf16 to rounding), float32 untouched."""
    from fdistill_lab.networks import layers

    torch.manual_seed(0)
    for cin, cout in [(3, 16), (16, 3), (3, 3)]:
        x, w = torch.randn(2, cin, 6, 6, dtype=torch.float64), torch.randn(cout, cin, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(layers._conv2d_padded(x, w, 1), torch.nn.functional.conv2d(x, w, padding=1),
                                   rtol=0, atol=1e-12)
        conv = layers.Conv2d(cin, cout, kernel=3)
        xf = torch.randn(2, cin, 6, 6)
        assert not layers._pad_channels(xf, conv.weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layers._pad_channels(xf, conv.weight)
            out = conv(xf)
        assert out.shape == (2, cout, 6, 6) and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), conv(xf), atol=0.05, rtol=0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layers._pad_channels(torch.randn(1, 16, 4, 4), torch.randn(32, 16, 3, 3))
        # autocast leaves float64 alone, and so does the padding (float64 gradients stay bit-identical)
        assert not layers._pad_channels(torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(8, 3, 3, 3))


def _random_net(cfg: dict, seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    net = build_edm(**cfg)
    with torch.no_grad():
        for p in net.parameters():  # EDM zero-initialises some layers; random weights exercise every path
            p.normal_(0, 0.05)
    return net


@pytest.mark.parametrize("cfg", [tiny_adm_config(attn_resolutions=[4]), tiny_ddpmpp_config()], ids=["adm", "ddpmpp"])
def test_compiled_norms_route_every_norm_and_r1_runs_eagerly(cfg, monkeypatch):
    """use_compiled_norms sends every GroupNorm (with the block's scale/shift or embedding add, and the SiLU)
    through the compiled function: same numbers as the eager path (here a stand-in for torch.compile, which
    takes minutes on a CPU: the real one is checked by the slow and GPU tests). Inside twice_differentiable()
    (R1) and eager_norms() they run eagerly; use_compiled_norms(net, False) turns them off."""
    from fdistill_lab.networks import layers

    calls = []

    def spy(*args):
        calls.append({"add": args[5] is not None, "scale": args[6] is not None, "act": args[8]})
        return layers._norm_act(*args)

    monkeypatch.setattr(layers, "_get_compiled_norm_act", lambda: spy)
    net = _random_net(cfg)
    x = torch.randn(2, 3, net.img_resolution, net.img_resolution)
    sigma, y = torch.tensor([0.5, 3.0]), (torch.tensor([1, 2]) if net.label_dim else None)
    ref = net(x, sigma, y)
    assert not calls
    n = layers.use_compiled_norms(net)
    assert n == sum(isinstance(m, layers.GroupNorm) for m in net.modules()) > 0
    assert torch.equal(net(x, sigma, y), ref)
    per_call = len(calls)
    assert per_call >= n - 2  # DDPM++'s aux_norm output heads are not followed by the block pattern
    assert any(c["scale"] for c in calls) if net.model_type == "DhariwalUNet" else any(c["add"] for c in calls)
    assert {c["act"] for c in calls} == {True, False}  # the attention norms (and DDPM++'s aux_norm) have no SiLU
    with layers.twice_differentiable():
        net(x, sigma, y)
    with layers.eager_norms():
        net(x, sigma, y)
    assert len(calls) == per_call
    layers.use_compiled_norms(net, False)
    net(x, sigma, y)
    assert len(calls) == per_call
    with pytest.raises(ValueError, match="scale and shift go together"):
        layers.GroupNorm(8).norm_act(torch.randn(1, 8, 4, 4), scale=torch.ones(1))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_norms_match_eager_on_cpu():
    """The real torch.compile (inductor's C++ backend) on a CPU: one block pattern, float32 forward and backward."""
    from fdistill_lab.networks import layers

    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    scale, shift = torch.randn(2, 16, 1, 1), torch.randn(2, 16, 1, 1)
    args = (w, b, 4, 1e-5, None, scale, shift, True)
    ref = layers._norm_act(x, *args)
    g_ref = torch.autograd.grad(ref.square().sum(), (x, w, b))
    out = layers._get_compiled_norm_act()(x, *args)
    g = torch.autograd.grad(out.square().sum(), (x, w, b))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_compiled_norms_and_channels_last_match_eager_on_gpu():
    """Full-size ADM block pattern on the GPU in bf16: compiled norms and channels-last give the eager network's
    output and input gradient up to bf16 rounding."""
    from fdistill_lab.networks import layers

    cfg = tiny_adm_config(img_resolution=32, model_channels=64, channel_mult=[1, 2], attn_resolutions=[16])
    net = _random_net(cfg).cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda", requires_grad=True)
    sigma, y = torch.rand(8, device="cuda") * 5 + 0.1, torch.randint(0, 10, (8,), device="cuda")

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(x, sigma, y)
        (g,) = torch.autograd.grad(out.float().square().mean(), x)
        return out.float(), g

    ref, g_ref = run()
    layers.use_compiled_norms(net)
    net.to(memory_format=torch.channels_last)
    out, g = run()
    scale, g_scale = ref.abs().max().item(), g_ref.abs().max().item()
    torch.testing.assert_close(out, ref, atol=0.02 * scale, rtol=0)
    torch.testing.assert_close(g, g_ref, atol=0.05 * g_scale, rtol=0)
