"""The README and the docs pages say what the code does: the error table is what the code raises
today in both frameworks, the quickstarts run, the links lead somewhere, and CI runs the
README's test command and builds the docs strictly."""

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lsjax
import lstorch
from parity_tests import paths, registry
from tests.bad_inputs import CASES, normalise, page_block, raised, table

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HOME = ROOT / "docs" / "index.md"
# The README is read in one screen: at most this many lines, the quickstarts in the first 60.
README_MAX_LINES = 150
QUICKSTARTS_WITHIN = 60


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the closing fence, code) of every ```python block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.M | re.S):
        blocks.append((text[: match.end()].count("\n") + 1, match.group(1)))
    return blocks


def test_error_table_is_current():
    assert page_block() == table(), "run `python -m tests.bad_inputs --write` and commit"


@pytest.mark.parametrize(("description", "run"), CASES, ids=[c[0] for c in CASES])
def test_torch_raises_the_same_error_with_the_same_words(description, run):
    jax_kind, jax_message = raised(run, lsjax, jnp.asarray)
    torch_kind, torch_message = raised(run, lstorch, torch.as_tensor)
    assert torch_kind == jax_kind
    assert normalise(torch_message) == normalise(jax_message)


def test_ci_runs_the_readmes_test_command():
    """``.ci/run`` must run the README's test command, word for word."""
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command.startswith("python -m pip install") and "pytest" in ci_command
    assert f"\n{ci_command}\n" in README.read_text()


def test_ci_builds_the_docs_strictly():
    """Before the tests, ``.ci/run`` builds the docs site with ``--strict``, so a broken link or
    a docstring that does not match its signature fails CI."""
    lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    build = [line for line in lines[:-1] if "mkdocs build" in line]
    assert build and all("--strict" in line for line in build)
    assert any('".[docs]"' in line for line in lines[: lines.index(build[0]) + 1])


def test_readme_fits_one_screen_with_both_quickstarts():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    blocks = python_blocks(text)
    assert [("lsjax" in code, "lstorch" in code) for _, code in blocks[:2]] == [
        (True, False),
        (False, True),
    ]
    assert all(end <= QUICKSTARTS_WITHIN for end, _ in blocks[:2])


def test_docs_home_shows_the_readmes_quickstarts():
    home = [code for _, code in python_blocks(HOME.read_text())]
    assert home and home == [code for _, code in python_blocks(README.read_text())]


def test_readme_jax_quickstart_trains():
    """The JAX block runs as written, given ``batches``, and its steps lower the loss."""
    code = python_blocks(README.read_text())[0][1]
    key_x, key_y = jax.random.split(jax.random.key(0))
    images = jax.random.normal(key_x, (32, 64))
    labels = jax.random.randint(key_y, (32,), 0, 10)
    namespace = {"batches": [(images, labels)] * 5}
    exec(compile(code, "README.md (JAX quickstart)", "exec"), namespace)
    # Independent check: the loss of the trained parameters, from optax's own smoothed route.
    params = namespace["params"]
    logits = np.asarray(images @ params["w"] + params["b"], np.float64)
    target = np.eye(10)[np.asarray(labels)] * 0.9 + 0.1 / 10
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    trained = float(np.mean(-(target * log_probs).sum(-1)))
    assert math.isfinite(float(namespace["loss"]))
    assert trained < math.log(10)  # zero parameters give log(10) for every row


def test_readme_torch_quickstart_trains():
    """The PyTorch block runs as written, given ``batches``, and its steps lower the loss."""
    code = python_blocks(README.read_text())[1][1]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(32, 64, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    namespace = {"batches": [(images, labels)] * 5}
    torch.manual_seed(0)
    exec(compile(code, "README.md (PyTorch quickstart)", "exec"), namespace)
    model = namespace["model"]
    with torch.no_grad():
        before = float(namespace["loss"])  # the loss of the last step, before its update
        after = float(torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1))
    assert math.isfinite(before) and after < before


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading (and Python-Markdown's, for these headings)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", [README, HOME], ids=lambda path: path.name)
def test_relative_links_resolve(page):
    """Every relative link of the README (and of the docs home) names a file that exists and,
    with ``#anchor``, a heading of it; mkdocs checks the rest of the docs pages."""
    text = page.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} leads nowhere"
        if anchor and target.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", target.read_text(), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no #{anchor} in {path}"


def test_testing_page_counts_the_registrys_case_runs():
    """``docs/testing.md`` says how many cases a twin's grid holds and how many case runs each
    profile gives the twin rows: the ``ci`` pairwise cover's and every case in every dtype. A
    twin added to the registry changes them, and this page with them."""
    page = (ROOT / "docs" / "testing.md").read_text()
    sizes = [len(twin.cases) for twin in registry.TWINS]
    grids = re.search(r"(\d+) to (\d+) cases a twin", page)
    assert grids, "docs/testing.md lost the sizes of the twins' grids"
    assert (int(grids[1]), int(grids[2])) == (min(sizes), max(sizes))
    cover = sum(len(paths.twin_cover(twin)) for twin in registry.TWINS)
    every = sum(len(twin.cases) * len(paths.DTYPES) for twin in registry.TWINS)
    counts = r"one more option: (\d+) case runs \| every case in every dtype: (\d+) case runs"
    row = re.search(counts, page)
    assert row, "docs/testing.md lost its row of the twin rows' case runs"
    assert (int(row[1]), int(row[2])) == (cover, every)
