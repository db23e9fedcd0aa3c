"""The trainer's speed settings (fdistill_lab.train.speed) give the eager step's results: compiled networks and
compiled steps (dynamo's whole-graph capture with the aot_eager backend here; inductor's generated code in the slow
and gpu tests), channels-last layout, folded biases, fused AdamW; and bad settings fail with clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from fdistill_lab.networks import Conv2d, build_edm, tiny_adm_config, tiny_ddpmpp_config
from fdistill_lab.train import speed
from fdistill_lab.train.config import DistillConfig
from fdistill_lab.train.presets import resolve
from fdistill_lab.train.smoke_assets import smoke_teacher_config
from fdistill_lab.train.trainer import FDistillTrainer

pytestmark = pytest.mark.usefixtures("one_thread")
SKIP_KEYS = ("time_s", "images_per_s")


def _teacher(cfg: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_edm(**(cfg or smoke_teacher_config()))


def _run(steps: int = 3, teacher_cfg: dict | None = None, batch: int = 4, **settings
         ) -> tuple[list[dict[str, float]], FDistillTrainer]:
    """``steps`` iterations (generator, critic, generator, ...) of a fresh trainer on fixed batches."""
    tr = FDistillTrainer(_teacher(teacher_cfg), DistillConfig(student_update_freq=2, gan_weight_gen=1e-2, **settings))
    ch, res = tr.teacher.img_channels, tr.teacher.img_resolution
    g = torch.Generator().manual_seed(1)
    logs = []
    for _ in range(steps):
        x, y = torch.rand(batch, ch, res, res, generator=g) * 2 - 1, torch.randint(0, 10, (batch,), generator=g)
        logs.append(tr.step(x, y))
    return logs, tr


def _assert_same(ref: tuple[list[dict[str, float]], FDistillTrainer], out: tuple[list[dict[str, float]],
                 FDistillTrainer], tol: float) -> None:
    """Equal logs and networks up to ``tol`` (relative to each value's size). Beyond float32 rounding the
    discriminator's accuracy is left out: one logit near 0 that rounds to the other side moves it by 1/batch."""
    (logs_a, tr_a), (logs_b, tr_b) = ref, out
    skip = SKIP_KEYS + (("disc_acc",) if tol > 1e-4 else ())
    for a, b in zip(logs_a, logs_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if k not in skip:
                assert math.isclose(a[k], b[k], rel_tol=tol, abs_tol=tol), (k, a[k], b[k])
    for name in ("student", "fake_score", "disc", "student_ema"):
        for p, q in zip(getattr(tr_a, name).parameters(), getattr(tr_b, name).parameters(), strict=True):
            torch.testing.assert_close(q, p, atol=tol, rtol=tol)
    torch.testing.assert_close(tr_b.weighting.normalizer.bins, tr_a.weighting.normalizer.bins, atol=tol, rtol=tol)


@pytest.fixture
def graph_capture(monkeypatch):
    """torch.compile with the aot_eager backend (whole-graph capture and compiled autograd, no code generation);
    yields dynamo's counters, fresh."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(speed, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["networks", "steps"])
def test_compiled_step_equals_the_eager_step(graph_capture, mode):
    """compile="networks" and "steps" capture whole graphs (fullgraph: no host sync, no graph break) of the generator
    step (with micro-batches: the gradient-free logits pass and the replayed gradient pass) and of the critic
    step, and train exactly as the eager trainer does (aot_eager runs the same aten ops)."""
    settings = dict(accum_steps=2, bin_ema=0.5)
    ref = _run(**settings)
    out = _run(compile=mode, **settings)
    assert graph_capture["stats"]["unique_graphs"] >= (3 if mode == "steps" else 4)  # the compiled code ran
    _assert_same(ref, out, tol=1e-6)


@pytest.mark.timeout(300)
def test_compiled_networks_with_r1_on_ddpmpp_run_the_r1_pass_eagerly(graph_capture):
    """The cifar10 preset's recipe (DDPM++ with attention, several heads, R1, fake score placement too): with
    compile="networks" the R1 pass, whose double backward torch.compile lacks, runs the eager networks and the
    rest the compiled ones; the results are the eager trainer's."""
    cfg = tiny_ddpmpp_config(img_resolution=8, attn_resolutions=[4], num_blocks=1)
    settings = dict(r1_gamma=1.0, disc_features=("8x8", "4x4"), disc_placement="fake_score")
    ref = _run(steps=2, teacher_cfg=cfg, **settings)
    out = _run(steps=2, teacher_cfg=cfg, compile="networks", **settings)
    assert graph_capture["stats"]["unique_graphs"] >= 3
    assert "r1" in out[0][1]
    _assert_same(ref, out, tol=1e-5)


@pytest.mark.timeout(120)
def test_channels_last_folded_biases_and_fused_adamw_equal_the_eager_step():
    """channels_last (weights and inputs NHWC), fold_biases and fused_optimizer change how the step runs, not what it
    computes: float32 results equal the default trainer's up to rounding; bf16 up to bf16 rounding."""
    cfg = tiny_adm_config(img_resolution=8, model_channels=32, attn_resolutions=[4])  # with attention
    ref = _run(teacher_cfg=cfg)
    fast = dict(channels_last=True, fold_biases=True, fused_optimizer=True)
    out = _run(teacher_cfg=cfg, **fast)
    tr = out[1]
    for net in (tr.teacher, tr.student, tr.fake_score, tr.student_ema):
        convs = [m for m in net.modules() if isinstance(m, Conv2d) and m.weight is not None]
        assert convs and all(m.fold_bias for m in convs)
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not ref[1].student.model.enc["8x8_conv"].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(o.defaults["fused"] for o in (tr.opt_student, tr.opt_fake, tr.opt_disc))
    _assert_same(ref, out, tol=1e-5)
    ref16 = _run(steps=2, teacher_cfg=cfg, precision="bf16")
    out16 = _run(steps=2, teacher_cfg=cfg, precision="bf16", **fast)
    _assert_same(ref16, out16, tol=0.05)


def test_fused_foreach_and_plain_adamw_agree():
    """torch's three AdamW implementations (what fused_optimizer switches between) give the same updates."""
    torch.manual_seed(0)
    init = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(3)]
    results = {}
    for impl in ("plain", "foreach", "fused"):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = speed.adamw(params, 1e-2, fused=impl == "fused", betas=(0.9, 0.99), weight_decay=0.01,
                          **({"foreach": impl == "foreach"} if impl != "fused" else {}))
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        results[impl] = params
    for impl in ("foreach", "fused"):
        for p, q in zip(results["plain"], results[impl]):
            torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-6)
        assert not torch.equal(results[impl][0], init[0])


@pytest.mark.parametrize("settings,match", [
    (dict(compile="fast"), r"compile must be one of \('none', 'networks', 'steps'\); got 'fast'"),
    (dict(compile=True), r"compile must be one of"),
    (dict(cuda_graphs=True), r"cuda_graphs=True needs compile='networks' or 'steps'"),
    (dict(compile="steps", r1_gamma=1.0), r"compile='steps' cannot compile R1's double backward"),
    (dict(compile="networks", compile_norms=True), r"set compile_norms=False"),
    (dict(channels_last="yes"), r"channels_last must be True or False; got 'yes'"),
    (dict(fused_optimizer=1), r"fused_optimizer must be True or False"),
    (dict(fold_biases=None), r"fold_biases must be True or False"),
])
def test_bad_speed_settings_fail_clearly(settings, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**settings)


def test_cuda_graphs_on_a_cpu_is_refused_not_ignored():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = DistillConfig(compile="steps", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device; this trainer runs on 'cpu'"):
        FDistillTrainer(_teacher(), cfg, device="cpu")
    with pytest.raises(ValueError, match="compile must be one of"):
        speed.Compiler("all", False, torch.device("cpu"))


def test_compiled_steps_under_ddp_are_refused():
    """DDP's forward cannot be traced into one graph: compile="steps" with several ranks fails before any
    process-group call, pointing to compile="networks" (which wraps DDP around the compiled networks)."""
    with pytest.raises(ValueError, match=r"world_size=2\): use compile='networks' with several processes"):
        FDistillTrainer(_teacher(), DistillConfig(compile="steps"), device="cpu", rank=0, world_size=2)


def test_speed_settings_are_overridable_and_resumable():
    """--set compile=steps etc. parse from the command line; a bad value names the choices; the settings are speed
    only, so a checkpoint resumes under other ones."""
    dcfg, _ = resolve("imagenet64", {"compile": "steps", "cuda_graphs": "true", "channels_last": "on",
                                     "fused_optimizer": "1", "fold_biases": "yes"})
    assert (dcfg.compile, dcfg.cuda_graphs, dcfg.channels_last, dcfg.fused_optimizer, dcfg.fold_biases) == (
        "steps", True, True, True, True)
    with pytest.raises(ValueError, match=r"compile must be one of \('none', 'networks', 'steps'\); got 'graphs'"):
        resolve("imagenet64", {"compile": "graphs"})
    with pytest.raises(ValueError, match="compile='steps' cannot compile R1"):
        resolve("cifar10", {"compile": "steps"})
    assert dcfg.differences(resolve("imagenet64")[0].to_dict()) == {}  # recorded with the defaults
    recorded = DistillConfig().to_dict()
    for key in ("compile", "cuda_graphs", "channels_last", "fused_optimizer", "fold_biases"):
        del recorded[key]  # as written before these settings existed
    assert DistillConfig(compile="steps", channels_last=True).differences(recorded) == {}
    assert DistillConfig(lr_student=1e-3).differences(recorded) == {"lr_student": (1e-4, 1e-3)}


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", ["networks", "steps"])
def test_inductor_compiled_step_equals_the_eager_step(mode):
    """inductor's generated C++ code (minutes of compilation on a CPU): the compiled step trains as the eager one up
    to float32 rounding, with micro-batches."""
    import torch._dynamo

    torch._dynamo.reset()
    settings = dict(accum_steps=2, bin_ema=0.5)
    _assert_same(_run(**settings), _run(compile=mode, fold_biases=True, fused_optimizer=True, **settings), tol=1e-4)


@pytest.mark.gpu
@pytest.mark.timeout(900)
@pytest.mark.parametrize("settings", [
    dict(channels_last=True, fused_optimizer=True, fold_biases=True),
    dict(compile="networks", channels_last=True, fused_optimizer=True),
    dict(compile="steps", cuda_graphs=True, channels_last=True, fused_optimizer=True, fold_biases=True),
], ids=["layout", "networks", "steps-cuda-graphs-layout"])
def test_speed_settings_equal_the_eager_bf16_step_on_a_gpu(settings):
    """On the GPU in bf16 (inductor's Triton kernels, CUDA graphs): losses, gradient norms and the trained
    networks after a generator, a critic and a second generator step stay within bf16 tolerance of the eager
    trainer's, with attention and micro-batches."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_adm_config(img_resolution=16, model_channels=64, channel_mult=[1, 2], attn_resolutions=[8])

    def run(**extra) -> tuple[list[dict[str, float]], FDistillTrainer]:
        tr = FDistillTrainer(_teacher(cfg), DistillConfig(student_update_freq=2, precision="bf16", accum_steps=2,
                                                          gan_weight_gen=1e-2, **extra), device="cuda",
                             rng_mode="per_rank")
        g = torch.Generator().manual_seed(1)
        logs = []
        for _ in range(3):
            x, y = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 10, (8,), generator=g)
            logs.append(tr.step(x, y))
        return logs, tr

    _assert_same(run(), run(**settings), tol=0.05)
    if settings.get("cuda_graphs"):  # every compiled graph ran as CUDA graphs (inductor skips some silently)
        assert counters["stats"]["unique_graphs"] >= 2 and counters["inductor"]["cudagraph_skips"] == 0


def test_cli_reports_bad_speed_settings(tmp_path, capsys):
    """python -m fdistill_lab.train --set ...: exit 2 with the setting's error, before any training."""
    from fdistill_lab.train.cli import main
    from fdistill_lab.train.smoke_assets import make_smoke_assets

    assets = make_smoke_assets(tmp_path / "assets", num_images=16)
    common = ["--preset", "tiny", "--teacher", str(assets["teacher"]), "--data", str(assets["data"]), "--out",
              str(tmp_path / "run"), "--set", "fid_every=0"]
    assert main([*common, "--set", "compile=fastest"]) == 2
    assert "compile must be one of ('none', 'networks', 'steps'); got 'fastest'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*common, "--set", "compile=steps", "--set", "cuda_graphs=true"]) == 2
        assert "cuda_graphs=True needs a CUDA device" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
