"""The package's layers: a module imports only from its own layer or the layers below it.

research / bundle tooling -> pipeline -> data -> nets, losses, metrics -> spacing (the shared vocabulary). A module
importing upwards (e.g. ``nets`` from ``pipeline``) would tie the network to the spacing machinery
and let cycles creep in; the test reads every module's imports, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "custom_networks"
# rank of each layer: a module may import from layers of equal or lower rank
RANK = {"spacing": 0, "nets": 1, "losses": 1, "metrics": 1, "data": 2, "pipeline": 3, "checkpoint": 4, "bundle_tools": 4, "research": 5}


def _layer(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "custom_networks", module
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: Path = PACKAGE) -> set[str]:
    name = _module_name(path, package)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module:
                    found.add(target)
                else:
                    found.update(f"{target}.{a.name}" for a in node.names)
            elif node.module and node.module.startswith("custom_networks"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("custom_networks"))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py")


def test_every_module_belongs_to_a_layer():
    assert {_layer(_module_name(p)) for p in MODULES} == set(RANK)


def _upward(path: Path, package: Path = PACKAGE) -> list[str]:
    own = _layer(_module_name(path, package))
    return sorted(t for t in _imports(path, package) if _layer(t) and RANK[_layer(t)] > RANK[own])


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_downwards(path):
    assert not _upward(path), f"{path.relative_to(PACKAGE.parent)} imports from a higher layer: {_upward(path)}"


@pytest.mark.parametrize("layer", ["losses", "metrics"])
def test_losses_and_metrics_import_only_the_spacing_vocabulary(layer):
    """They sit beside ``nets`` without depending on it: a loss or metric works for any network."""
    modules = [p for p in MODULES if _layer(_module_name(p)) == layer]
    assert modules
    for path in modules:
        assert {_layer(t) for t in _imports(path)} <= {layer, "spacing"}, path


def test_the_checker_sees_an_upward_import(tmp_path):
    """The test itself can fail: ``nets`` importing the pipeline inside a function is reported."""
    probe = tmp_path / "custom_networks" / "nets" / "unet.py"
    probe.parent.mkdir(parents=True)
    probe.write_text((PACKAGE / "nets" / "unet.py").read_text() + "\n\ndef _late():\n    from ..pipeline.resample import x\n")
    assert _upward(probe, tmp_path / "custom_networks") == ["custom_networks.pipeline.resample"]
