"""``compare``: feed the same NumPy-made inputs through a JAX and a PyTorch function and check
that their outputs and their gradients with respect to the first input agree.

This is public so a user can verify their own port::

    from parity_tests import compare

    def make_inputs(rng, case):
        logits = rng.normal(size=(7, 11))
        labels = rng.integers(0, 11, size=7)
        return (logits, labels), {"smoothing": case["smoothing"]}

    report = compare(my_jax_loss, my_torch_loss, make_inputs, cases=[{"smoothing": 0.1}])
    print(report)
    assert report.passed

How a case runs, for each dtype:

* ``make_inputs(rng, case)`` returns ``(args, kwargs)`` as NumPy arrays and Python values. The
  first positional argument is the differentiated one; it is cast to the dtype under test (for
  bfloat16 it is first rounded to bf16, so both sides see exactly the same values). Other float
  arrays are passed in float64 for a float64 run and float32 otherwise; integer and boolean
  arrays keep their kind.
* Both functions run; every output is pulled back with the SAME random cotangent (so a
  ``reduction="none"`` output is checked with a non-uniform upstream gradient), giving the
  gradient with respect to the first input.
* float64 and float32: JAX against PyTorch, elementwise ``|a - b| <= atol + rtol * |b|`` on every
  output and on the gradient, NaNs in the same places.
* bfloat16: each side's bf16 result against PyTorch's float32 result on the same rounded inputs
  (the question for low precision is "as good as float32 rounded once", not "bitwise equal").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

DTYPES = ("float64", "float32", "bfloat16")

# (rtol, atol) per dtype.
#  * float64 / float32: the issue's rtol (1e-10, 1e-5); atol covers gradient entries that are
#    differences of O(1) terms (A * p_c - t_c), whose absolute rounding error is about the
#    dtype's epsilon times 1, however small the entry itself is.
#  * bfloat16: a bf16 output is a float32 value rounded once to an 8-bit significand, relative
#    error <= 2**-9. We allow 2**-7 (four such roundings): the input's rounding is shared with the
#    float32 reference, so what remains is the output's rounding plus, for PyTorch's own
#    bf16 kernels, intermediates rounded to bf16 (its log-softmax). atol 2**-9 covers gradient
#    entries near zero, where relative error is meaningless.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-5, 1e-6),
    "bfloat16": (2.0**-7, 2.0**-9),
}


@dataclasses.dataclass
class CaseResult:
    """The outcome of one case in one dtype."""

    case: dict
    dtype: str
    loss_diff: float  # max |a - b| over every output
    grad_diff: float  # max |a - b| over the gradient
    passed: bool
    error: str = ""


@dataclasses.dataclass
class Report:
    """All cases of one comparison. ``str(report)`` is a table; ``report.passed`` the verdict."""

    name: str
    results: list[CaseResult]

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(result.passed for result in self.results)

    def summary(self) -> list[dict]:
        """One row per dtype: case count, max |Δloss|, max |Δgrad|, failures, pass."""
        rows = []
        for dtype in dict.fromkeys(result.dtype for result in self.results):
            of_dtype = [result for result in self.results if result.dtype == dtype]
            rows.append(
                {
                    "twin": self.name,
                    "dtype": dtype,
                    "cases": len(of_dtype),
                    "max_loss_diff": max(result.loss_diff for result in of_dtype),
                    "max_grad_diff": max(result.grad_diff for result in of_dtype),
                    "failures": sum(not result.passed for result in of_dtype),
                    "passed": all(result.passed for result in of_dtype),
                }
            )
        return rows

    def failures(self) -> list[CaseResult]:
        return [result for result in self.results if not result.passed]

    def __str__(self) -> str:
        lines = [format_table(self.summary())]
        for failure in self.failures()[:10]:
            lines.append(
                f"  FAIL {failure.dtype} {failure.case}: |Δloss|={failure.loss_diff:.3g} "
                f"|Δgrad|={failure.grad_diff:.3g} {failure.error}"
            )
        return "\n".join(lines)


def format_table(rows: Sequence[dict]) -> str:
    """The report's table: twin, dtype, case count, max |Δloss|, max |Δgrad|, pass/fail."""
    width = max([len("twin"), *(len(row["twin"]) for row in rows)])
    header = (
        f"{'twin':<{width}} {'dtype':<9} {'cases':>5} {'max|Δloss|':>11} {'max|Δgrad|':>11}  result"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        verdict = "pass" if row["passed"] else f"FAIL ({row['failures']})"
        lines.append(
            f"{row['twin']:<{width}} {row['dtype']:<9} {row['cases']:>5} "
            f"{row['max_loss_diff']:>11.3g} {row['max_grad_diff']:>11.3g}  {verdict}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running one side


def _round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 values that the dtype under test can hold (bf16 rounding is shared)."""
    if dtype == "bfloat16":
        return np.asarray(values, ml_dtypes.bfloat16).astype(np.float64)
    return np.asarray(values, np.float64)


def _leaves(output: Any) -> list:
    return list(output) if isinstance(output, (tuple, list)) else [output]


def _to_jax(value: Any, float_dtype) -> Any:
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            return jnp.asarray(value, float_dtype)
        if np.issubdtype(value.dtype, np.integer):
            if value.dtype.itemsize < 4:  # narrow labels (uint8, int16, ...) keep their dtype
                return jnp.asarray(value)
            return jnp.asarray(value, jnp.int64 if float_dtype == jnp.float64 else jnp.int32)
        return jnp.asarray(value)
    return value


def _to_torch(value: Any, float_dtype) -> Any:
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            return torch.tensor(value, dtype=float_dtype)
        if np.issubdtype(value.dtype, np.integer):
            if value.dtype.itemsize < 4:  # narrow labels (uint8, int16, ...) keep their dtype
                return torch.from_numpy(value.copy())
            return torch.tensor(value, dtype=torch.int64)
        return torch.tensor(value)
    return value


def run_jax(
    fn: Callable, args: tuple, kwargs: dict, dtype: str, cotangents=None, *, jit: bool = False
):
    """Outputs and the gradient (pulled back with ``cotangents``) of a JAX function, in float64.

    By default ``fn`` runs eagerly. With ``jit=True`` the forward pass and the pull-back run as
    one compiled program (see :func:`_vjp_compiled`): arrays and Python floats in ``kwargs`` are
    traced arguments, every other option (strings, ints, bools, None) is static. The program is
    cached per (``fn``, static options, shapes and dtypes), so many calls that differ only in
    their values cost a compilation once and then ~0.1 ms each, where eager dispatch costs
    several ms. ``fn`` must accept traced floats (``smoothing``, ``normalizer``, ...) and the
    concrete-input checks (labels out of range raise) do not run: use it for value properties,
    not for error behaviour.
    """
    with jax.enable_x64(True):
        first = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
        others = jnp.float64 if dtype == "float64" else jnp.float32
        x = jnp.asarray(_round_to(args[0], dtype), first)
        rest = [_to_jax(value, others) for value in args[1:]]
        if jit:
            return _run_jax_compiled(fn, x, rest, kwargs, others, cotangents)
        options = {key: _to_jax(value, others) for key, value in kwargs.items()}
        # Eager on purpose: it is the path that checks concrete inputs, and compiling one
        # program per case costs more than running the few dozen primitives op by op.
        output, vjp = jax.vjp(lambda x: fn(x, *rest, **options), x)
        outputs = [np.asarray(leaf.astype(jnp.float64)) for leaf in _leaves(output)]
        if cotangents is None:
            return outputs, None
        cot = [
            jnp.asarray(c, leaf.dtype) for c, leaf in zip(cotangents, _leaves(output), strict=True)
        ]
        (grad,) = vjp(type(output)(cot) if isinstance(output, (tuple, list)) else cot[0])
        return outputs, np.asarray(grad.astype(jnp.float64))


def _is_traced_option(value: Any) -> bool:
    return isinstance(value, (np.ndarray, float)) and not isinstance(value, bool)


def _run_jax_compiled(fn, x, rest, kwargs, others, cotangents):
    """``run_jax(jit=True)``: the traced and static options split, one compiled call."""
    traced = {
        key: _to_jax(np.asarray(value), others)
        if isinstance(value, float)
        else _to_jax(value, others)
        for key, value in kwargs.items()
        if _is_traced_option(value)
    }
    static = tuple(sorted((key, value) for key, value in kwargs.items() if key not in traced))
    cot = None if cotangents is None else [np.asarray(c, np.float64) for c in cotangents]
    outputs, grad = _vjp_compiled(x, rest, traced, cot, fn=fn, static=static)
    outputs = [np.asarray(leaf) for leaf in outputs]
    return outputs, None if grad is None else np.asarray(grad)


@functools.partial(jax.jit, static_argnames=("fn", "static"))
def _vjp_compiled(x, rest, traced, cotangents, *, fn, static):
    """``fn``'s outputs (as float64) and, given cotangents, its pull-back, in one program.

    Calls ``fn`` itself, the public function under test, on traced inputs: this is the code path
    of a user's ``jax.jit(jax.grad(loss))``, not a reimplementation.
    """
    output, vjp = jax.vjp(lambda x: fn(x, *rest, **dict(static), **traced), x)
    leaves = _leaves(output)
    outputs = [leaf.astype(jnp.float64) for leaf in leaves]
    if cotangents is None:
        return outputs, None
    cot = [c.astype(leaf.dtype) for c, leaf in zip(cotangents, leaves, strict=True)]
    (grad,) = vjp(type(output)(cot) if isinstance(output, (tuple, list)) else cot[0])
    return outputs, grad.astype(jnp.float64)


def run_torch(fn: Callable, args: tuple, kwargs: dict, dtype: str, cotangents=None):
    """Outputs and the gradient (pulled back with ``cotangents``) of a torch function, float64."""
    first = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    others = torch.float64 if dtype == "float64" else torch.float32
    x = torch.tensor(_round_to(args[0], dtype)).to(first).requires_grad_(True)
    rest = [_to_torch(value, others) for value in args[1:]]
    options = {key: _to_torch(value, others) for key, value in kwargs.items()}
    output = fn(x, *rest, **options)
    leaves = _leaves(output)
    outputs = [leaf.detach().to(torch.float64).numpy() for leaf in leaves]
    if cotangents is None:
        return outputs, None
    cot = [
        torch.tensor(np.asarray(c)).to(leaf.dtype)
        for c, leaf in zip(cotangents, leaves, strict=True)
    ]
    # Outputs that carry no gradient (a count, or one detached on purpose, as T5X's z-loss)
    # contribute nothing to the pull-back.
    pairs = [(leaf, c) for leaf, c in zip(leaves, cot, strict=True) if leaf.requires_grad]
    grads = None
    if pairs:
        grads = torch.autograd.grad(
            [leaf for leaf, _ in pairs], x, [c for _, c in pairs], allow_unused=True
        )[0]
    grad = torch.zeros_like(x) if grads is None else grads
    return outputs, grad.detach().to(torch.float64).numpy()


# --------------------------------------------------------------------------------------------
# Comparing


def max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    worst = 0.0
    for left, right in zip(a, b, strict=False):
        left, right = np.broadcast_arrays(np.asarray(left), np.asarray(right))
        both_nan = np.isnan(left) & np.isnan(right)
        same_inf = np.isinf(left) & (left == right)
        diff = np.where(both_nan | same_inf, 0.0, np.abs(left - right))
        diff = np.where(np.isnan(diff), np.inf, diff)
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


def allclose(a: Sequence[np.ndarray], b: Sequence[np.ndarray], rtol: float, atol: float) -> bool:
    if len(a) != len(b):
        return False
    for left, right in zip(a, b, strict=False):
        left, right = np.asarray(left), np.asarray(right)
        if left.shape != right.shape:
            return False
        if not np.allclose(left, right, rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


def _cotangents(rng: np.random.Generator, outputs: list[np.ndarray]) -> list[np.ndarray]:
    return [rng.uniform(0.5, 1.5, size=np.shape(out)) for out in outputs]


def compare_case(jax_fn, torch_fn, args, kwargs, dtype, rtol, atol, seed=0) -> CaseResult:
    """One case in one dtype (see the module docstring for what is compared)."""
    case = {key: value for key, value in kwargs.items() if not isinstance(value, np.ndarray)}
    try:
        reference_dtype = "float32" if dtype == "bfloat16" else dtype
        rounded = (_round_to(args[0], dtype), *args[1:])
        torch_ref, _ = run_torch(torch_fn, rounded, kwargs, reference_dtype)
        cotangents = _cotangents(np.random.default_rng(seed), torch_ref)
        torch_ref, torch_ref_grad = run_torch(
            torch_fn, rounded, kwargs, reference_dtype, cotangents
        )
        jax_out, jax_grad = run_jax(jax_fn, rounded, kwargs, dtype, cotangents)
        if dtype == "bfloat16":
            torch_out, torch_grad = run_torch(torch_fn, rounded, kwargs, dtype, cotangents)
            pairs = [(jax_out, jax_grad), (torch_out, torch_grad)]
        else:
            pairs = [(jax_out, jax_grad)]
        loss_diff = max(max_abs_diff(out, torch_ref) for out, _ in pairs)
        grad_diff = max(max_abs_diff([grad], [torch_ref_grad]) for _, grad in pairs)
        passed = all(
            allclose(out, torch_ref, rtol, atol) and allclose([grad], [torch_ref_grad], rtol, atol)
            for out, grad in pairs
        )
        return CaseResult(case, dtype, loss_diff, grad_diff, passed)
    except Exception as error:  # A crash on either side is a failed case, reported as such.
        return CaseResult(
            case, dtype, math.inf, math.inf, False, f"{type(error).__name__}: {error}"
        )


def compare(
    jax_fn: Callable,
    torch_fn: Callable,
    make_inputs: Callable[[np.random.Generator, dict], tuple[tuple, dict]],
    *,
    cases: Iterable[dict] = ({},),
    dtypes: Sequence[str] = DTYPES,
    rtol: float | None = None,
    atol: float | None = None,
    tolerances: dict[str, tuple[float, float]] | None = None,
    seed: int = 0,
    name: str = "comparison",
) -> Report:
    """Compare a JAX and a PyTorch function on every case and dtype; return a :class:`Report`.

    Args:
      jax_fn, torch_fn: ``fn(x, *args, **kwargs)``; ``x`` is differentiated. Outputs may be an
        array or a tuple of arrays (every output is compared and pulled back).
      make_inputs: ``(rng, case) -> (args, kwargs)``, NumPy arrays in float64 and Python values.
      cases: the argument grid; each case is handed to ``make_inputs``.
      dtypes: any of ``"float64"``, ``"float32"``, ``"bfloat16"``.
      rtol, atol: override the tolerance of every dtype.
      tolerances: ``{dtype: (rtol, atol)}`` overriding :data:`DEFAULT_TOLERANCES` per dtype.
      seed: seeds the inputs (case ``i`` uses ``seed + i``) and the cotangents.
    """
    table = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    results = []
    for index, case in enumerate(cases):
        args, kwargs = make_inputs(np.random.default_rng(seed + index), dict(case))
        for dtype in dtypes:
            if dtype not in table:
                raise ValueError(f"compare: `dtypes` must be among {list(table)}; got {dtype!r}.")
            case_rtol, case_atol = table[dtype]
            result = compare_case(
                jax_fn,
                torch_fn,
                args,
                kwargs,
                dtype,
                case_rtol if rtol is None else rtol,
                case_atol if atol is None else atol,
                seed=seed + index,
            )
            result.case = {**case, **result.case}
            results.append(result)
    return Report(name, results)


def compare_with_oracle(
    fn: Callable,
    oracle: Callable,
    make_inputs: Callable[[np.random.Generator, dict], tuple[tuple, dict]],
    *,
    framework: str,
    cases: Iterable[dict] = ({},),
    rtol: float = DEFAULT_TOLERANCES["float64"][0],
    atol: float = DEFAULT_TOLERANCES["float64"][1],
    seed: int = 0,
    name: str = "oracle",
) -> Report:
    """Compare one framework's function with a float64 NumPy oracle, output and gradient.

    ``oracle(*args, **kwargs)`` takes the NumPy inputs and returns ``(output, vjp)`` with
    ``vjp(cotangent)`` the gradient with respect to the first input (see ``oracles.py``). An
    oracle of a function with several outputs returns them as a tuple, and its ``vjp`` takes a
    list with one cotangent per output.
    """
    run = {"jax": run_jax, "torch": run_torch}[framework]
    results = []
    for index, case in enumerate(cases):
        args, kwargs = make_inputs(np.random.default_rng(seed + index), dict(case))
        shown = {**case, **{k: v for k, v in kwargs.items() if not isinstance(v, np.ndarray)}}
        try:
            expected, vjp = oracle(*args, **kwargs)
            several = isinstance(expected, tuple)
            expected = [np.asarray(out) for out in (expected if several else [expected])]
            cotangents = _cotangents(np.random.default_rng(seed + index), expected)
            expected_grad = vjp(cotangents if several else cotangents[0])
            outputs, grad = run(fn, args, kwargs, "float64", cotangents)
            loss_diff = max_abs_diff(outputs, expected)
            grad_diff = max_abs_diff([grad], [expected_grad])
            passed = allclose(outputs, expected, rtol, atol) and allclose(
                [grad], [expected_grad], rtol, atol
            )
            results.append(CaseResult(shown, "float64", loss_diff, grad_diff, passed))
        except Exception as error:
            results.append(
                CaseResult(
                    shown, "float64", math.inf, math.inf, False, f"{type(error).__name__}: {error}"
                )
            )
    return Report(name, results)
