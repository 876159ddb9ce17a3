"""The README's table of bad inputs is what the code raises today, in both frameworks."""

import jax.numpy as jnp
import pytest
import torch

import lsjax
import lstorch
from tests.bad_inputs import CASES, normalise, raised, readme_block, table


def test_readme_error_table_is_current():
    assert readme_block() == table(), "run `python -m tests.bad_inputs --write` and commit"


@pytest.mark.parametrize(("description", "run"), CASES, ids=[c[0] for c in CASES])
def test_torch_raises_the_same_error_with_the_same_words(description, run):
    jax_kind, jax_message = raised(run, lsjax, jnp.asarray)
    torch_kind, torch_message = raised(run, lstorch, torch.as_tensor)
    assert torch_kind == jax_kind
    assert normalise(torch_message) == normalise(jax_message)


def test_ci_runs_the_readmes_test_command():
    """``.ci/run`` must run the README's test command, word for word."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    ci_command = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command.startswith("python -m pip install") and "pytest" in ci_command
    assert f"\n{ci_command}\n" in (root / "README.md").read_text()
