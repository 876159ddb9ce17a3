"""lsjax never imports torch and lstorch never imports jax, so each installs and imports alone."""

import subprocess
import sys

import pytest

BLOCK = (
    "import sys; sys.modules[{blocked!r}] = None; import {package}, {package}.compat; print('ok')"
)


@pytest.mark.parametrize(("package", "blocked"), [("lsjax", "torch"), ("lstorch", "jax")])
def test_imports_without_the_other_framework(package, blocked):
    # sys.modules[name] = None makes any import of that framework raise ImportError.
    code = BLOCK.format(package=package, blocked=blocked)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
