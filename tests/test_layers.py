"""The package's layers (fdistill_lab/__init__.py): the method, then the labs, then the course tooling, then the
command modules. A module may import from its own layer and the layers before it, never from a later one; a lab
imports another lab only where LAB_DEPENDENCIES says so."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fdistill_lab"
METHOD = {"divergences", "ratio", "losses", "method", "edm", "mixtures", "files", "image_grid", "networks", "stats"}
LABS = {"gaussian1d", "toy", "digits", "train", "t2i"}
COURSE = {"course"}
COMMANDS = {"download", "sweep", "student", "handouts", "book"}
LAYERS = [("method", METHOD), ("labs", LABS), ("course", COURSE), ("commands", COMMANDS)]
LAB_DEPENDENCIES = {"digits": {"train"},  # notebook 04 distils digits with the image trainer of notebook 05
                    "t2i": {"train"}}  # notebook 06 runs the same trainer on Stable Diffusion latents


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool) -> set[str]:
    """Absolute names of the fdistill_lab modules (or names in them) that ``source`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found |= {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m == "fdistill_lab" or m.startswith("fdistill_lab.")}


def top(module: str) -> str | None:
    """The first-level part below fdistill_lab (``fdistill_lab.toy.trainer`` -> ``toy``); None for the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_of(part: str | None) -> int:
    if part is None or part == "__version__":
        return 0
    for i, (_, members) in enumerate(LAYERS):
        if part in members:
            return i
    raise KeyError(part)


def violations(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """``modules``: name -> (source, is_package). One message per import that goes against the layers."""
    out = []
    for name, (source, is_package) in sorted(modules.items()):
        here = top(name)
        for target in sorted(imported_modules(source, name, is_package)):
            there = top(target)
            if there is None or there == here or there == "__version__":
                continue
            try:
                mine, theirs = layer_of(here), layer_of(there)
            except KeyError as err:
                out.append(f"{name}: {err.args[0]!r} is in no layer of tests/test_layers.py")
                continue
            if theirs > mine:
                out.append(f"{name} ({LAYERS[mine][0]}) imports {target} from the later layer {LAYERS[theirs][0]}")
            elif theirs == mine and LAYERS[mine][0] == "labs" and there not in LAB_DEPENDENCIES.get(here, set()):
                out.append(f"{name} (lab {here}) imports {target} from lab {there}, which LAB_DEPENDENCIES does "
                           "not allow")
    return out


def package_modules() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(encoding="utf-8"), p.name == "__init__.py") for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    parts = {top(name) for name in package_modules()} - {None}
    unplaced = sorted(p for p in parts if not any(p in members for _, members in LAYERS))
    assert not unplaced, f"modules in no layer (place them in LAYERS here and in fdistill_lab/__init__.py): {unplaced}"


def test_no_module_imports_from_a_later_layer():
    assert violations(package_modules()) == []


@pytest.mark.parametrize(("name", "source", "message"), [
    ("fdistill_lab.losses", "from .toy import ToyTrainer", "imports fdistill_lab.toy.ToyTrainer from the later layer"),
    ("fdistill_lab.toy.trainer", "from ..course import record", "from the later layer course"),
    ("fdistill_lab.toy.trainer", "def f():\n    from ..train.trainer import FDistillTrainer",
     "from lab train, which LAB_DEPENDENCIES does not allow"),
    ("fdistill_lab.course.records", "import fdistill_lab.sweep", "from the later layer commands"),
    ("fdistill_lab.networks.adm", "from fdistill_lab.plotting import x", "'plotting' is in no layer"),
])
def test_the_check_finds_wrong_imports(name, source, message):
    """Imports that go up a layer (also inside functions), across labs, or to an unknown part are caught."""
    found = violations({name: (source, False)})
    assert len(found) == 1 and message in found[0], found


def test_allowed_imports_pass():
    ok = {"fdistill_lab.digits.teacher": ("from ..train.trainer import FDistillTrainer\nfrom .. import edm", False),
          "fdistill_lab.course.checks": ("from ..toy import trainer\nfrom ..method import x", False),
          "fdistill_lab.toy": ("from .trainer import ToyTrainer\nfrom .. import divergences", True)}
    assert violations(ok) == []
