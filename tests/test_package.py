"""The package as its users meet it: the names the README and docs teach, imports that
only go down the layers, and a wheel that works outside the repository."""

import ast
import glob
import importlib
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from helpers import idx_flags, write_idx_dataset

import cnnflat_jax
from cnnflat_jax.data import idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "cnnflat_jax")

# Lower layers first: a module may import its own layer and those before it.
LAYERS = ("errors", "paths", "nn", "data", "train", "config", "configs", "run", "tools")


def readme_names() -> tuple[set[str], set[str]]:
    """``(names imported from cnnflat_jax, dotted cnnflat_jax.X[.Y] references)`` in the README
    and the documentation's pages."""
    pages = glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    text = ""
    for page in [os.path.join(ROOT, "README.md"), *pages]:
        with open(page) as f:
            text += f.read()
    imported = {
        name.strip()
        for names in re.findall(r"from cnnflat_jax import ([\w, ]+)", text)
        for name in names.split(",")
        if name.strip()
    }
    dotted = set(re.findall(r"\bcnnflat_jax(?:\.\w+)+", text))
    return imported, dotted


def test_every_name_the_readme_uses_imports():
    imported, dotted = readme_names()
    assert {"ops", "interop"} <= imported and "cnnflat_jax.export" in dotted
    for name in imported | set(cnnflat_jax.__all__):
        assert getattr(cnnflat_jax, name) is not None, name
    for reference in dotted:  # cnnflat_jax.MODULE[.NAME] or cnnflat_jax.NAME
        target = cnnflat_jax
        for attribute in reference.split(".")[1:]:
            target = getattr(target, attribute)


@pytest.mark.parametrize("command", ["export", "predict", "explain", "array_records"])
def test_each_readme_command_is_a_module_with_a_main(command):
    module = importlib.import_module(f"cnnflat_jax.{command}")
    assert callable(module.main)
    result = subprocess.run(
        [sys.executable, "-m", f"cnnflat_jax.{command}", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "Traceback" not in result.stderr
    assert f"python -m cnnflat_jax.{command}" in result.stdout + result.stderr  # The usage.


def layer_of(path: str) -> str | None:
    """The layer of a module in the package, or None for the public top-level modules."""
    relative = os.path.relpath(path, PACKAGE)
    head = relative.split(os.sep)[0].removesuffix(".py")
    return head if head in LAYERS else None


def our_imports(path: str) -> set[str]:
    """The cnnflat_jax modules ``path`` imports, at the top or inside functions."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cnnflat_jax")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnnflat_jax"):
            if node.module == "cnnflat_jax":
                found |= {f"cnnflat_jax.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def test_imports_only_go_down_the_layers():
    checked = 0
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(folder, name)
            layer = layer_of(path)
            if not name.endswith(".py") or layer is None:
                continue
            allowed = LAYERS[: LAYERS.index(layer) + 1]
            for module in our_imports(path):
                target = module.split(".")[1]
                assert target in allowed, f"{os.path.relpath(path, ROOT)} imports {module}"
            checked += 1
    assert checked >= 30


def test_nn_imports_nothing_of_ours_but_nn():
    for name in os.listdir(os.path.join(PACKAGE, "nn")):
        if name.endswith(".py"):
            imports = our_imports(os.path.join(PACKAGE, "nn", name))
            assert all(m.startswith("cnnflat_jax.nn") for m in imports), (name, imports)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from the repository."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), ROOT],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (built,) = dist.glob("cnnflat_jax-*.whl")
    return built


def test_a_wheel_installs_only_cnnflat_jax_and_works_outside_the_repository(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"cnnflat_jax"}
    assert "cnnflat_jax/nn/ops.py" in archive.namelist()
    assert "cnnflat_jax/configs/default.py" in archive.namelist()  # The shipped configs.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import importlib.util, cnnflat_jax\n"
        "from cnnflat_jax import config, ops, models\n"
        "assert importlib.util.find_spec('configs') is None\n"
        "c = config.defaults(); config.check(c)\n"
        "print(cnnflat_jax.__file__, c.model.name, models.CNN.__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(str(tmp_path / "site" / "cnnflat_jax"))
    assert result.stdout.split()[1:] == ["cnn", "CNN"]


def test_the_installed_commands_train_export_and_predict_outside_the_repository(wheel, tmp_path):
    """The wheel in a fresh venv (its dependencies seen from this one's site-packages, where
    cnnflat_jax is only an editable link that the venv does not follow), used from a
    directory outside the repository by its console scripts and a shipped config's name."""
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    (site,) = fresh.glob("lib/python*/site-packages")
    (site / "dependencies.pth").write_text("\n".join(sysconfig_paths()) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python"), "install",
         "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    data = write_idx_dataset(elsewhere / "data")

    def command(name, *args):
        return subprocess.run(
            [str(fresh / "bin" / name), *map(str, args)],
            cwd=elsewhere, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    flags = idx_flags(data)
    assert flags[:2] == ["--config", "configs/smoke.py"]  # Which file, here by its name:
    result = command("cnnflat-train", "--config", "smoke", *flags[2:], "--workdir", "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "outputs in run" in result.stderr
    located = subprocess.run(
        [str(fresh / "bin" / "python"), "-c", "import cnnflat_jax; print(cnnflat_jax.__file__)"],
        cwd=elsewhere, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert located.stdout.startswith(str(site))  # The installed copy, not the repository's.
    assert command("cnnflat-export", "--workdir", "run").returncode == 0
    images = idx.read_idx(str(data / "t10k-images-idx3-ubyte"), ndim=3)[:4]
    np.save(elsewhere / "four.npy", images)
    result = command("cnnflat-predict", "--workdir", "run", "four.npy")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [
        f"four.npy[{i}]" for i in range(4)
    ]
    for name in ("cnnflat-array-records", "cnnflat-explain", "cnnflat-tpu-check"):
        result = command(name, "--help")  # absl's help: the usage, then exit 1.
        assert "Traceback" not in result.stderr and "USAGE:" in result.stdout, name


def sysconfig_paths() -> list[str]:
    """This interpreter's site-packages folders."""
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]
