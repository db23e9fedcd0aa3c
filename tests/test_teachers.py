"""Safe EDM pickle loading: synthetic pickles written here in EDM's format (shared/reference/edm/
pickle_format.md), golden outputs after loading, the cache, and refusal of malicious pickles."""

from __future__ import annotations

import collections
import copyreg
import io
import math
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch

from fdistill_lab.networks import EDMPrecond
from fdistill_lab.train import teachers
from fdistill_lab.train.edm_pickle import EDMPickleError, UnsafePickleError

HOOKS_TORCH2 = ["_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook", "_forward_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
                "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"]
HOOKS_TORCH1 = ["_backward_hooks", "_is_full_backward_hook", "_forward_hooks", "_forward_pre_hooks",
                "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"]
EDM_GLOBALS = {"torch_utils.persistence _reconstruct_persistent_obj", "torch.nn.modules.container ModuleDict",
               "collections OrderedDict", "torch._utils _rebuild_parameter", "torch._utils _rebuild_tensor_v2",
               "torch.storage _load_from_bytes", "numpy dtype"}


# ------------------------------------------------------------------ a writer of EDM-format pickles


def _persistence_sentinel(meta):  # pragma: no cover - written by name only, never called
    raise AssertionError("must not be called")


class _EDMWriter(pickle._Pickler):
    """Pure-Python pickler that writes selected objects under other global names (STACK_GLOBAL)."""

    def __init__(self, file, renames):
        super().__init__(file, protocol=4)
        self.renames = renames

    def save(self, obj, save_persistent_id=True):
        for o, (mod, qual) in self.renames:
            if obj is o:
                memo = self.memo.get(id(obj))
                if memo is not None:
                    self.write(self.get(memo[0]))
                    return
                self.save(mod)
                self.save(qual)
                self.write(pickle.STACK_GLOBAL)
                self.memoize(obj)
                return
        super().save(obj, save_persistent_id)


class _Persistent:
    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (_persistence_sentinel, (self.meta,))


class _ModuleDict:
    def __init__(self, state):
        self.state = state

    @property
    def __class__(self):  # the pickler checks that NEWOBJ's class is the object's class
        return torch.nn.ModuleDict

    def __reduce__(self):
        return (copyreg.__newobj__, (torch.nn.ModuleDict,), self.state)


def _class_name(path: str) -> str:
    last = path.split(".")[-1]
    if last.startswith("norm") or last.endswith("_norm"):
        return "GroupNorm"
    if last in ("affine",) or last.startswith("map_"):
        return "PositionalEmbedding" if last == "map_noise" else "Linear"
    if "block" in last or last.endswith(("_down", "_up")) or "_in" in last:
        return "UNetBlock"
    return "Conv2d"


def _write_edm_pickle(path: Path, fx: dict, *, numpy_module: str = "numpy._core.multiarray",
                      mapping=dict, hooks=HOOKS_TORCH2, module_src: str = "# placeholder, not EDM source\n",
                      state_dict: dict | None = None) -> None:
    """Build the EDM record tree from a fixture's state_dict names and config and pickle it."""
    sd = state_dict if state_dict is not None else fx["state_dict"]
    song = fx["config"]["model_type"] == "SongUNet"
    nodes: dict[str, dict] = {}

    def node(p: str) -> dict:
        if p not in nodes:
            nodes[p] = {"params": mapping(), "buffers": mapping(), "children": []}
            if p:
                parent, _, leaf = p.rpartition(".")
                node(parent)["children"].append(leaf)
        return nodes[p]

    node("")
    node("model")
    node("model.map_noise")  # tensor-free child, present in EDM's module tree
    for key, t in sd.items():
        mod, _, leaf = key.rpartition(".")
        n = node(mod)
        tensor = t.detach().clone()
        if leaf == "resample_filter":
            n["buffers"][leaf] = tensor
        else:
            n["params"][leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    for p, n in nodes.items():  # EDM keeps None placeholders in the param/buffer dicts
        if _class_name(p) == "Conv2d" and p.split(".")[-1] not in ("", "model", "enc", "dec"):
            n["buffers"].setdefault("resample_filter", None)
    sqrt_half = np.float64(math.sqrt(0.5))

    def build(p: str):
        n = nodes[p]
        children = mapping((c, build(f"{p}.{c}" if p else c)) for c in n["children"])
        state = {"training": False, "_parameters": n["params"], "_buffers": n["buffers"],
                 "_non_persistent_buffers_set": set()}
        for h in hooks:
            state[h] = None if h == "_is_full_backward_hook" else collections.OrderedDict()
        state["_modules"] = children
        leaf = p.split(".")[-1]
        if leaf in ("enc", "dec"):
            return _ModuleDict(state)
        if p == "":
            cls = "EDMPrecond"
            cfg = fx["config"]
            state.update(img_resolution=cfg["img_resolution"], img_channels=cfg["img_channels"],
                         label_dim=cfg["label_dim"], use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                         sigma_data=0.5)
            kwargs = dict(cfg)
        elif p == "model":
            cls = fx["config"]["model_type"]
            state["label_dropout"] = 0
            kwargs = dict(fx["config_resolved"][cls])
        else:
            cls = _class_name(p)
            kwargs = {}
            if cls == "UNetBlock":
                state.update(skip_scale=sqrt_half if song else 1, adaptive_scale=not song)
                kwargs = {"init": {"init_mode": "xavier_uniform", "init_weight": np.float64(math.sqrt(1 / 3))}}
        state["_init_args"] = ()
        state["_init_kwargs"] = kwargs
        return _Persistent({"type": "class", "version": 6, "module_src": module_src, "class_name": cls,
                            "state": state})

    loss = _Persistent({"type": "class", "version": 6, "module_src": "# loss placeholder\n",
                        "class_name": "EDMLoss",
                        "state": {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5, "_init_args": (),
                                  "_init_kwargs": {}}})
    top = {"ema": build(""), "loss_fn": loss, "augment_pipe": None,
           "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "x.zip"}}
    buf = io.BytesIO()
    renames = [(_persistence_sentinel, ("torch_utils.persistence", "_reconstruct_persistent_obj")),
               (np._core.multiarray.scalar, (numpy_module, "scalar"))]
    _EDMWriter(buf, renames).dump(top)
    path.write_bytes(buf.getvalue())


def _globals_in(path: Path) -> set[str]:
    """Globals named in a pickle stream (module and name strings may come from the memo)."""
    out, strings, memo, top = set(), [], {}, None
    for op, arg, _ in pickletools.genops(path.read_bytes()):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            top = arg
            strings.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET"):
            top = memo.get(arg)
            strings.append(top)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = top
        elif op.name == "STACK_GLOBAL":
            out.add(f"{strings[-2]} {strings[-1]}")
            top = None
        elif op.name == "GLOBAL":
            out.add(arg)
        else:
            top = None
    return out


def _fixture(edm_fixtures: Path, name: str) -> dict:
    return torch.load(edm_fixtures / name, weights_only=True)


# ------------------------------------------------------------------ loading


VARIANTS = [
    ("adm_tiny.pt", "numpy._core.multiarray", dict, HOOKS_TORCH2),
    ("ddpmpp_tiny.pt", "numpy.core.multiarray", collections.OrderedDict, HOOKS_TORCH1),
    ("ddpmpp_tiny.pt", "numpy._core.multiarray", dict, HOOKS_TORCH2),
]


@pytest.mark.parametrize("fixture,numpy_module,mapping,hooks", VARIANTS)
def test_synthetic_edm_pickle_loads_and_matches_golden(tmp_path, edm_fixtures, fixture, numpy_module, mapping,
                                                         hooks):
    fx = _fixture(edm_fixtures, fixture)
    pkl = tmp_path / "net.pkl"
    _write_edm_pickle(pkl, fx, numpy_module=numpy_module, mapping=mapping, hooks=hooks)
    assert _globals_in(pkl) == EDM_GLOBALS | {f"{numpy_module} scalar"}  # the writer is faithful

    net = teachers.load_edm(pkl, cache_dir=tmp_path / "cache")
    assert isinstance(net, EDMPrecond) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    assert net.model_type == fx["config"]["model_type"] and net.label_dim == 10
    sd = net.state_dict()
    assert list(sd) == list(fx["state_dict"])
    assert all(torch.equal(sd[k], v) for k, v in fx["state_dict"].items())
    inp = fx["inputs"]
    kw = {"augment_labels": inp["augment_labels"]} if "augment_labels" in inp else {}
    with torch.no_grad():
        out = net(inp["x"], inp["sigma"], inp["class_labels"], **kw)
    torch.testing.assert_close(out, fx["outputs"], atol=5e-6, rtol=0)


def test_cache_is_used_and_invalidated(tmp_path, edm_fixtures, monkeypatch):
    fx = _fixture(edm_fixtures, "adm_tiny.pt")
    pkl = tmp_path / "net.pkl"
    _write_edm_pickle(pkl, fx)
    cache_dir = tmp_path / "cache"
    net1 = teachers.load_edm(pkl, cache_dir=cache_dir, dropout=None)
    cached = list(cache_dir.glob("*.pt"))
    assert len(cached) == 1
    blob = torch.load(cached[0], weights_only=True)  # plain, weights-only loadable
    assert blob["config"]["model_type"] == "DhariwalUNet"

    def boom(path):
        raise AssertionError("pickle re-read although the cache is valid")

    monkeypatch.setattr(teachers, "convert_edm_pickle", boom)
    net2 = teachers.load_edm(pkl, cache_dir=cache_dir, dropout=None)
    assert all(torch.equal(a, b) for a, b in zip(net1.state_dict().values(), net2.state_dict().values()))
    net3 = teachers.load_edm(cached[0])  # the cache file itself is loadable
    assert list(net3.state_dict()) == list(fx["state_dict"])

    # a changed pickle invalidates the cache
    sd = {k: v.clone() for k, v in fx["state_dict"].items()}
    sd["model.out_conv.bias"] += 1.0
    _write_edm_pickle(pkl, fx, state_dict=sd)
    with pytest.raises(AssertionError, match="re-read"):
        teachers.load_edm(pkl, cache_dir=cache_dir)
    monkeypatch.undo()
    net4 = teachers.load_edm(pkl, cache_dir=cache_dir)
    assert torch.equal(net4.state_dict()["model.out_conv.bias"], sd["model.out_conv.bias"])


def _other_snapshot(fx: dict) -> dict:
    """The fixture's weights with one bias shifted: another snapshot of the same network (same pickle size)."""
    sd = {k: v.clone() for k, v in fx["state_dict"].items()}
    sd["model.out_conv.bias"] += 1.0
    return sd


@pytest.mark.parametrize("how", ["in_place", "renamed_over"])
def test_cache_is_validated_by_content_not_size_and_mtime(tmp_path, edm_fixtures, how):
    """A pickle replaced by another snapshot of the same size with its old mtime restored (cp -p, rsync -t,
    unpacking an archive) must give the new weights, not the cached old ones."""
    fx = _fixture(edm_fixtures, "adm_tiny.pt")
    pkl, cache_dir = tmp_path / "net.pkl", tmp_path / "cache"
    _write_edm_pickle(pkl, fx)
    teachers.load_edm(pkl, cache_dir=cache_dir)
    old = pkl.stat()
    sd = _other_snapshot(fx)
    new = tmp_path / "new.pkl"
    _write_edm_pickle(new, fx, state_dict=sd)
    assert new.stat().st_size == old.st_size and new.read_bytes() != pkl.read_bytes()
    if how == "in_place":  # same inode, as cp -p over an existing file
        pkl.write_bytes(new.read_bytes())
        os.utime(pkl, ns=(old.st_atime_ns, old.st_mtime_ns))
    else:  # a new inode renamed over it, as rsync -t does
        os.utime(new, ns=(old.st_atime_ns, old.st_mtime_ns))
        os.replace(new, pkl)
    assert (pkl.stat().st_size, pkl.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    net = teachers.load_edm(pkl, cache_dir=cache_dir)
    assert torch.equal(net.state_dict()["model.out_conv.bias"], sd["model.out_conv.bias"])
    again = teachers.load_edm(pkl, cache_dir=cache_dir)  # and the rebuilt cache holds the new weights
    assert torch.equal(again.state_dict()["model.out_conv.bias"], sd["model.out_conv.bias"])


def test_unchanged_pickle_is_not_rehashed_and_a_touched_one_once(tmp_path, edm_fixtures, monkeypatch):
    fx = _fixture(edm_fixtures, "adm_tiny.pt")
    pkl, cache_dir = tmp_path / "net.pkl", tmp_path / "cache"
    _write_edm_pickle(pkl, fx)
    teachers.load_edm(pkl, cache_dir=cache_dir)
    hashed, real_hash = [], teachers.sha256_file
    monkeypatch.setattr(teachers, "sha256_file", lambda p: hashed.append(p) or real_hash(p))

    def boom(path):
        raise AssertionError("pickle re-read although the cache is valid")

    monkeypatch.setattr(teachers, "convert_edm_pickle", boom)
    teachers.load_edm(pkl, cache_dir=cache_dir)
    assert hashed == []  # nothing about the file changed: the stored sha256 is trusted
    os.utime(pkl, ns=(pkl.stat().st_atime_ns, pkl.stat().st_mtime_ns + 10**9))  # touched, same content
    net = teachers.load_edm(pkl, cache_dir=cache_dir)
    assert hashed == [pkl]  # hashed once, found equal: the cache is served (and its key refreshed)
    teachers.load_edm(pkl, cache_dir=cache_dir)
    assert hashed == [pkl]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in fx["state_dict"].items())


@pytest.mark.parametrize("damage", ["truncated", "missing_tensor"])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, edm_fixtures, monkeypatch, damage):
    fx = _fixture(edm_fixtures, "adm_tiny.pt")
    pkl, cache_dir = tmp_path / "net.pkl", tmp_path / "cache"
    _write_edm_pickle(pkl, fx)
    teachers.load_edm(pkl, cache_dir=cache_dir)
    (cache,) = cache_dir.glob("*.pt")
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    else:  # readable, and recorded for this very pickle, but a tensor short
        blob = torch.load(cache, weights_only=True)
        blob["state_dict"].pop("model.out_conv.bias")
        torch.save(blob, cache)
    with pytest.warns(UserWarning, match=f"damaged EDM cache .*{cache.name}"):
        net = teachers.load_edm(pkl, cache_dir=cache_dir)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in fx["state_dict"].items())

    def boom(path):
        raise AssertionError("pickle re-read although the cache was rebuilt")

    monkeypatch.setattr(teachers, "convert_edm_pickle", boom)
    again = teachers.load_edm(pkl, cache_dir=cache_dir)  # the rebuilt cache is complete
    assert all(torch.equal(again.state_dict()[k], v) for k, v in fx["state_dict"].items())
    if damage == "truncated":  # named directly, a damaged cache cannot be rebuilt: a clear error
        cache.write_bytes(cache.read_bytes()[:100])
        with pytest.raises(EDMPickleError, match="damaged EDM cache file"):
            teachers.load_edm(cache)


def test_torch_with_weights_only_bypasses_is_refused(tmp_path, edm_fixtures, monkeypatch):
    fx = _fixture(edm_fixtures, "adm_tiny.pt")
    pkl = tmp_path / "net.pkl"
    _write_edm_pickle(pkl, fx)
    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    with pytest.raises(RuntimeError, match=r"torch 2\.9\.1.*CVE-2025-32434.*torch>=2\.10"):
        teachers.load_edm(pkl, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_and_wrong_files(tmp_path, edm_fixtures):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        teachers.load_edm(tmp_path / "nope.pkl", use_cache=False)
    zipped = tmp_path / "weights.pkl"
    torch.save({"a": torch.ones(2)}, zipped)
    with pytest.raises(EDMPickleError, match="zip archive"):
        teachers.load_edm(zipped, use_cache=False)
    no_ema = tmp_path / "no_ema.pkl"
    no_ema.write_bytes(pickle.dumps({"G_ema": 1}, protocol=4))
    with pytest.raises(EDMPickleError, match="'ema'"):
        teachers.load_edm(no_ema, use_cache=False)
    fx = _fixture(edm_fixtures, "adm_tiny.pt")
    bad = tmp_path / "bad.pkl"
    sd = dict(fx["state_dict"])
    sd.pop("model.out_conv.bias")
    _write_edm_pickle(bad, fx, state_dict=sd)
    with pytest.raises(EDMPickleError, match="out_conv.bias"):
        teachers.load_edm(bad, use_cache=False)


# ------------------------------------------------------------------ malicious pickles


class _ExecPayload:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class _SystemPayload:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


def test_exec_payload_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    payload = pickle.dumps({"ema": _ExecPayload(_marker_code(marker))}, protocol=4)
    pickle.loads(payload)  # sanity: the payload is live with a normal unpickler
    assert marker.exists()
    marker.unlink()
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="builtins.exec"):
        teachers.load_edm(bad, use_cache=False)
    assert not marker.exists()


def test_os_system_payload_is_refused(tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps([_SystemPayload(f"touch {marker}")], protocol=4))
    with pytest.raises(UnsafePickleError, match="system"):
        teachers.load_edm(bad, use_cache=False)
    assert not marker.exists()


def test_stored_module_source_never_runs(tmp_path, edm_fixtures):
    marker = tmp_path / "marker"
    fx = _fixture(edm_fixtures, "adm_tiny.pt")
    pkl = tmp_path / "src.pkl"
    _write_edm_pickle(pkl, fx, module_src=_marker_code(marker) + "\n")
    assert _marker_code(marker).encode() in pkl.read_bytes()
    net = teachers.load_edm(pkl, use_cache=False)
    assert list(net.state_dict()) == list(fx["state_dict"])
    assert not marker.exists()


def test_code_inside_a_storage_blob_is_refused(tmp_path):
    marker = tmp_path / "marker"
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    evil_blob = magic + pickle.dumps(_ExecPayload(_marker_code(marker)), protocol=2)

    class _Storage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (evil_blob,))

    bad = tmp_path / "blob.pkl"
    bad.write_bytes(pickle.dumps({"ema": _Storage()}, protocol=4))
    with pytest.raises(UnsafePickleError, match="storage blob"):
        teachers.load_edm(bad, use_cache=False)
    assert not marker.exists()


def test_non_numeric_numpy_dtype_is_refused(tmp_path):
    bad = tmp_path / "dtype.pkl"
    bad.write_bytes(pickle.dumps({"ema": np.dtype("O")}, protocol=4))
    with pytest.raises(UnsafePickleError, match="numeric"):
        teachers.load_edm(bad, use_cache=False)


def _build_on_global(module: str, name: str, attr: str, slot_state: bool) -> bytes:
    """A pickle that loads an allowlisted global and BUILDs attribute ``attr`` onto the global itself."""

    def text(s: str) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode()

    state = pickle.EMPTY_DICT + text(attr) + pickle.EMPTY_TUPLE + pickle.SETITEM
    if slot_state:  # (None, {attr: ()}): setattr(global, attr, ())
        state = pickle.NONE + state + pickle.TUPLE2
    return b"\x80\x04" + text(module) + text(name) + pickle.STACK_GLOBAL + state + pickle.BUILD + pickle.STOP


@pytest.mark.parametrize("slot_state", [True, False])
@pytest.mark.parametrize("module,name", [("torch._utils", "_rebuild_parameter"), ("dnnlib.util", "EasyDict"),
                                         ("torch.nn.modules.container", "ModuleDict")])
def test_build_cannot_mutate_allowlisted_globals(tmp_path, edm_fixtures, module, name, slot_state):
    """A crafted file must not change the reader for later loads in the same process."""
    from fdistill_lab.train import edm_pickle

    bad = tmp_path / "build.pkl"
    bad.write_bytes(_build_on_global(module, name, "__new__" if name == "ModuleDict" else "__defaults__",
                                     slot_state))
    with pytest.raises(EDMPickleError, match="build.pkl: refusing to set attribute" if slot_state else "build.pkl"):
        edm_pickle.read_edm_pickle(bad)
    fx = _fixture(edm_fixtures, "adm_tiny.pt")
    pkl = tmp_path / "good.pkl"
    _write_edm_pickle(pkl, fx)
    assert list(teachers.load_edm(pkl, use_cache=False).state_dict()) == list(fx["state_dict"])


def test_refusal_messages_name_the_file_and_never_advise_unsafe_loading(tmp_path):
    blob = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(_SystemPayload("true"), protocol=2)

    class _Storage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (blob,))

    bad = tmp_path / "blob.pkl"
    bad.write_bytes(pickle.dumps({"ema": _Storage()}, protocol=4))
    with pytest.raises(UnsafePickleError, match="blob.pkl: refusing a tensor storage blob") as err:
        teachers.load_edm(bad, use_cache=False)
    assert "weights_only" not in str(err.value)
    no_ema = tmp_path / "no_ema.pkl"
    no_ema.write_bytes(pickle.dumps({"G_ema": 1}, protocol=4))
    with pytest.raises(EDMPickleError, match="no key 'ema'.*G_ema"):
        teachers.load_edm(no_ema, use_cache=False)
