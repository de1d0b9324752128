"""The documentation site as CI builds it: offline, warnings as errors, the API
reference generated from the public modules' docstrings; the ops' doctests; and
a README that stays a front page whose links lead into the site."""

import doctest
import os
import re
import subprocess
import sys

from cnnflat_jax import nnx_models
from cnnflat_jax.nn import models, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_site_builds_offline_with_warnings_as_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs",
         str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    api = (tmp_path / "api.html").read_text()
    public = [  # Every public function and class (the constants need no page of their own).
        f"cnnflat_jax.{module.__name__.rsplit('.', 1)[1]}.{name}"
        for module in (ops, models, nnx_models)
        for name in module.__all__
        if callable(getattr(module, name))
    ]
    public += ["cnnflat_jax.nn.ops.CONV_LOWERINGS", "cnnflat_jax.run.trained_run.load_run"]
    for name in public:
        assert f'id="{name}"' in api, name
    # The docstrings themselves, Google-style sections rendered by napoleon:
    # conv2d's math and its doctest example.
    conv2d = api.split('id="cnnflat_jax.ops.conv2d"')[1].split('id="cnnflat_jax.ops.relu"')[0]
    assert "Parameters" in conv2d and "&gt;&gt;&gt;" in conv2d and "HWIO" in conv2d
    assert "TypeAliasForwardRef" not in api  # conf.py's names for the aliases.
    for page in ("quickstart", "guide/pictures", "guide/cloud_tpu", "nnx", "flatten", "results"):
        assert (tmp_path / f"{page}.html").is_file(), page


def test_every_public_op_has_a_doctest_and_they_pass():
    tests = doctest.DocTestFinder().find(ops)
    with_examples = {test.name.rsplit(".", 1)[1] for test in tests if test.examples}
    assert {name for name in ops.__all__ if callable(getattr(ops, name))} <= with_examples
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_the_readme_is_a_front_page_whose_links_resolve():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 250
    # The two commands of a fresh machine: the main job and the tests.
    assert "bash .ci/setup && .venv/bin/python train.py --config configs/default.py" in readme
    assert "bash .ci/setup && .venv/bin/python -m pytest" in readme
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert {"docs/api.md", "docs/quickstart.md", "docs/results.md"} <= set(local)
    for link in local:
        assert os.path.exists(os.path.join(ROOT, link)), link
