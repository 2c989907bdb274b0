"""The product apart from its lab: the serving package `eftmesh` imports nothing of the lab
(tools/lab, distribution eftmesh-lab, import package `eftmesh_lab`) nor what only the lab uses,
its pyproject lists none of the lab's packages, and the images never copy the lab."""

from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import eftmesh

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "tools" / "lab"

# Modules only the lab may bring in: itself (the demo family's data and training code included)
# and plotting. tqdm is the lab's dependency too, but huggingface_hub imports it.
LAB_ONLY_MODULES = ("eftmesh_lab", "matplotlib")
# Distributions only the lab needs: tools/lab/pyproject.toml's own dependencies. (gguf is the
# runtime's `real-models` extra: eftmesh serves .gguf files.)
LAB_ONLY_PACKAGES = {"eftmesh-lab", "matplotlib", "tqdm"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _runtime_modules() -> list[str]:
    names = ["eftmesh"]
    for m in pkgutil.walk_packages(eftmesh.__path__, "eftmesh."):
        if m.name.endswith(".__main__"):
            continue  # running it starts a service
        names.append(m.name)
    return names


def test_the_runtime_package_holds_no_lab_module() -> None:
    names = _runtime_modules()
    assert "eftmesh.cli" in names and "eftmesh.combiner.server" in names  # the walk found the package
    moved = [n for n in names if re.search(r"\.(demo|bench\w*|loadtest)(\.|$)", n)]
    assert not moved, f"lab modules in the serving package: {moved}"


def test_importing_every_runtime_module_imports_nothing_of_the_lab() -> None:
    # A fresh interpreter: this one has the lab's tests (and so the lab) imported already.
    code = (
        "import importlib, json, sys\n"
        f"for n in {_runtime_modules()!r}:\n"
        "    importlib.import_module(n)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {LAB_ONLY_MODULES!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_the_runtime_pyproject_lists_no_lab_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = {_name(r) for r in project["dependencies"]}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        assert not LAB_ONLY_PACKAGES & {_name(r) for r in reqs}, f"extra {extra!r} lists lab packages"
    assert not LAB_ONLY_PACKAGES & listed
    assert all(not s.startswith("eftmesh_lab") for s in project["scripts"].values())


def test_the_lab_is_a_distribution_of_its_own_on_top_of_eftmesh() -> None:
    lab = tomllib.loads((LAB / "pyproject.toml").read_text())
    project = lab["project"]
    assert project["name"] == "eftmesh-lab"
    deps = {_name(r) for r in project["dependencies"]}
    assert "eftmesh" in deps and "matplotlib" in deps
    assert project["scripts"]["eftmesh-load"] == "eftmesh_lab.loadtest:main"
    assert (LAB / "eftmesh_lab" / "__init__.py").is_file()


def _dockerfile_copies() -> list[list[str]]:
    """The source arguments of every COPY that reads the build context (not --from a stage)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    copies = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]):
            continue
        copies.append(args[:-1])
    return copies


def test_the_images_never_copy_the_lab() -> None:
    copies = _dockerfile_copies()
    sources = [s.rstrip("/") for srcs in copies for s in srcs]
    assert "services" in sources  # the parse found the package's COPY
    for s in sources:
        assert s not in (".", "tools") and not s.startswith("tools/"), f"the Dockerfile copies {s!r}"
    text = (ROOT / "Dockerfile").read_text()
    assert "eftmesh_lab" not in re.sub(r"#.*", "", text) and "eftmesh-lab" not in re.sub(r"#.*", "", text)
    # The requirements stage reads only the runtime's pyproject.toml, whose extras hold no lab package.
    extras = re.search(r"^ARG EXTRAS=(.*)$", text, re.M)
    assert extras is not None
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in filter(None, extras.group(1).strip().split(",")):
        assert not LAB_ONLY_PACKAGES & {_name(r) for r in project["optional-dependencies"][extra]}
