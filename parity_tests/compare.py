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

How a case runs, for each dtype (``docs/compare.md`` has the long form):

* ``make_inputs(rng, case)`` returns ``(args, kwargs)`` as NumPy arrays and Python values. The
  first positional argument ``x`` is the differentiated one; it is rounded to the dtype under
  test. Other float arrays are rounded to float32 (kept in float64 for a float64 run); integer
  and boolean arrays keep their kind (:func:`rounded_inputs`). Every run sees exactly these
  values, so the rounding of the inputs is shared and is never counted as an error.
* The float64 reference: the PyTorch function (``reference="jax"``: the JAX one) run in float64
  on those rounded inputs.
* Both functions run in the dtype under test. Outputs may be an array or a pytree of arrays
  (tuple, list, NamedTuple, dict, nested); the two sides' leaves are matched by structure
  (sequences by position, dicts by key), and a difference in structure or shape fails the case
  with a sentence such as ``torch output 1 has shape (9, 1), jax (9,)``.
* Every output leaf is pulled back with the SAME random cotangent (uniform in [0.5, 1.5],
  rounded to the dtype under test), so a ``reduction="none"`` output is checked with a
  non-uniform upstream gradient; this gives each side's gradient with respect to ``x``.
* Two things are measured: **parity**, each side against the other (``loss_diff``,
  ``grad_diff``), and **accuracy**, each side against the float64 reference (``accuracy``).

What "pass" means depends on the dtype:

* float64 and float32 (parity): JAX against PyTorch elementwise, ``|jax - torch| <= atol +
  rtol * |torch|`` on every output leaf and on the gradient, NaNs in the same places, infinities
  equal (:data:`DEFAULT_TOLERANCES`). These are the dtypes in which two implementations of the
  same formula must agree to the last few bits, so they are the ones that catch a wrong formula
  (smoothing off by 1e-3, a value or a gradient off by 0.1 %).
* bfloat16 and float16 (accuracy): each side, on its own, within the rounding error budget of
  the float64 reference, elementwise (:func:`rounding_budget`). Two correct low-precision
  implementations may round at different steps and differ from each other by up to twice the
  budget; their parity is reported, not judged. The question for low precision is "as accurate
  as the dtype allows", not "bitwise equal".

``result.used`` is the worst element's share of what it is allowed (pass: ``used <= 1``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

DTYPES = ("float64", "float32", "bfloat16")
"""The dtypes ``compare`` runs by default."""

LOW_PRECISION = ("bfloat16", "float16")
"""The dtypes judged by accuracy against the float64 reference (the rounding budget)."""

SUPPORTED_DTYPES = (*DTYPES, "float16")

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
"""``u``: the largest relative error of rounding a real number to the dtype (half its epsilon)."""

ROUNDING_STEPS = 4
"""``k`` in :func:`rounding_budget`: roundings an error may accumulate through (see there)."""

# (rtol, atol) per dtype, for a check of one result against another in the same dtype: the
# parity verdict of ``compare`` in float64 and float32, ``compare_with_oracle``, and the execution
# paths (``parity_tests.paths``).
#  * float64 / float32: rtol 1e-10 and 1e-5, the parity the project promises; atol covers
#    gradient entries that are differences of O(1) terms (A * p_c - t_c), whose absolute rounding
#    error is about the dtype's epsilon times 1, however small the entry itself is.
#  * bfloat16 (the execution paths only; ``compare`` judges bf16 by the rounding budget): a bf16
#    output is a float32 value rounded once to an 8-bit significand, relative error <= 2**-9. We
#    allow 2**-7 (four such roundings); atol 2**-9 covers gradient entries near zero, where
#    relative error is meaningless.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-5, 1e-6),
    "bfloat16": (2.0**-7, 2.0**-9),
}


@dataclasses.dataclass
class CaseResult:
    """The outcome of one case in one dtype.

    ``loss_diff``, ``grad_diff``: parity, max |jax - torch| over every output leaf and over the
    gradient (in a ``compare_with_oracle`` report: the side against the oracle).
    ``accuracy``: ``{side: (max |output - reference|, max |gradient - reference|)}`` against the
    float64 reference on the same rounded inputs (empty in an oracle report).
    ``used``: the worst element's share of what the verdict allows (pass: <= 1).
    ``error``: why the case failed, in words ("" when it passed).
    """

    case: dict
    dtype: str
    loss_diff: float
    grad_diff: float
    passed: bool
    error: str = ""
    accuracy: dict = dataclasses.field(default_factory=dict)
    used: float = math.nan


@dataclasses.dataclass
class Report:
    """All cases of one comparison. ``str(report)`` is a table; ``report.passed`` the verdict."""

    name: str
    results: list[CaseResult]

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(result.passed for result in self.results)

    def summary(self) -> list[dict]:
        """One row per dtype: case count, parity (max |Δloss|, max |Δgrad|), each side's largest
        error against the float64 reference, the largest share of the allowance used, failures,
        pass."""
        rows = []
        for dtype in dict.fromkeys(result.dtype for result in self.results):
            of_dtype = [result for result in self.results if result.dtype == dtype]
            row = {
                "twin": self.name,
                "dtype": dtype,
                "cases": len(of_dtype),
                "max_loss_diff": max(result.loss_diff for result in of_dtype),
                "max_grad_diff": max(result.grad_diff for result in of_dtype),
            }
            for side in ("jax", "torch"):
                errors = [result.accuracy[side] for result in of_dtype if side in result.accuracy]
                row[f"{side}_loss_error"] = max((e[0] for e in errors), default=math.nan)
                row[f"{side}_grad_error"] = max((e[1] for e in errors), default=math.nan)
            used = [result.used for result in of_dtype if not math.isnan(result.used)]
            row["used"] = max(used, default=math.nan)
            row["failures"] = sum(not result.passed for result in of_dtype)
            row["passed"] = all(result.passed for result in of_dtype)
            rows.append(row)
        return rows

    def failures(self) -> list[CaseResult]:
        return [result for result in self.results if not result.passed]

    def __str__(self) -> str:
        lines = [format_table(self.summary())]
        for failure in self.failures()[:10]:
            lines.append(f"  FAIL {failure.dtype} {failure.case}: {failure.error}")
        return "\n".join(lines)


def _number(value: float, width: int) -> str:
    return f"{'-':>{width}}" if value is None or math.isnan(value) else f"{value:>{width}.3g}"


def format_table(rows: Sequence[dict]) -> str:
    """The report's table: twin, dtype, case count, parity (max |jax - torch| of the outputs and
    of the gradient), each side's largest error against the float64 reference, the largest
    share of the allowance used, pass/fail; a legend below."""
    width = max([len("twin"), *(len(row["twin"]) for row in rows)])
    header = (
        f"{'twin':<{width}} {'dtype':<9} {'cases':>5} {'max|Δloss|':>11} {'max|Δgrad|':>11} "
        f"{'jax err':>9} {'jax Δg':>9} {'torch err':>9} {'torch Δg':>9} {'used':>6}  result"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        verdict = "pass" if row["passed"] else f"FAIL ({row['failures']})"
        lines.append(
            f"{row['twin']:<{width}} {row['dtype']:<9} {row['cases']:>5} "
            f"{_number(row['max_loss_diff'], 11)} {_number(row['max_grad_diff'], 11)} "
            f"{_number(row.get('jax_loss_error'), 9)} {_number(row.get('jax_grad_error'), 9)} "
            f"{_number(row.get('torch_loss_error'), 9)} {_number(row.get('torch_grad_error'), 9)} "
            f"{_number(row.get('used'), 6)}  {verdict}"
        )
    lines.append("max|Δloss|, max|Δgrad|: parity, |jax - torch| (oracle rows: |side - oracle|)")
    lines.append(
        "err, Δg: accuracy, |side - float64 reference| of the outputs, of the gradient; "
        "used: the worst element's share of its allowance (pass <= 1)"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Inputs


def round_to(values: Any, dtype: str) -> np.ndarray:
    """The float64 values that an array of ``dtype`` holds: ``values`` rounded to ``dtype``
    (to nearest, ties to even) and widened back to float64 exactly."""
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"round_to: `dtype` must be one of {list(UNIT_ROUNDOFF)}; got {dtype!r}.")
    numpy_dtype = {
        "float64": np.float64,
        "float32": np.float32,
        "bfloat16": ml_dtypes.bfloat16,
        "float16": np.float16,
    }[dtype]
    return np.asarray(values, np.float64).astype(numpy_dtype).astype(np.float64)


def _rounded(value: Any, dtype: str) -> Any:
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return round_to(value, dtype)
    return value


def rounded_inputs(args: tuple, kwargs: dict, dtype: str) -> tuple[tuple, dict]:
    """``(args, kwargs)`` as the float64 values that a run in ``dtype`` sees: the first argument
    rounded to ``dtype``; other float arrays, positional or keyword, rounded to float32 (left in
    float64 for a float64 run); everything else unchanged. Casting these to the run's dtypes is
    exact, so the float64 reference and both sides compute from the same numbers."""
    others = "float64" if dtype == "float64" else "float32"
    first = round_to(args[0], dtype)
    rest = tuple(_rounded(value, others) for value in args[1:])
    return (first, *rest), {key: _rounded(value, others) for key, value in kwargs.items()}


def jax_precision(dtype: str):
    """The JAX configuration a side runs under in a ``dtype`` row: ``jax_enable_x64`` on for
    float64, and off, JAX's default, for float32 and bfloat16, as users run those. Under x64 a
    constant made without a dtype (``jnp.ones(())``, ``jnp.array(1.0)``) is float64 and would
    quietly promote a float32 port's computation, so a port wrong in float32 would pass."""
    return jax.enable_x64(dtype == "float64")


def _to_device(value: Any, dtype) -> jax.Array:
    """``value`` as a JAX array of ``dtype``, cast by NumPy on the host before it is placed.

    ``jnp.asarray(value, dtype)`` of a NumPy array of another dtype casts on the device, and
    ``jnp.asarray(value)`` stages it as an identity; each is an eager program compiled per shape
    and dtype: several hundred a test run, each compiled (about 0.1 s on a CPU) where no
    compilation cache holds it. ``jax.device_put`` only copies. The harness's values are
    already rounded to the dtype they are cast to (:func:`rounded_inputs`), or are cast from a
    wider float to float32 by round-to-nearest-even, as XLA casts: the arrays are the same."""
    return jax.device_put(np.asarray(value).astype(np.dtype(dtype), copy=False))


def _to_float64(value: Any) -> np.ndarray:
    """A JAX (or NumPy) array as float64 NumPy values, widened on the host (exact: every float
    dtype widens to float64 without rounding; see :func:`_to_device` for why not on device)."""
    return np.asarray(value).astype(np.float64)


def _to_jax(value: Any, float_dtype) -> Any:
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            return _to_device(value, float_dtype)
        if np.issubdtype(value.dtype, np.integer):
            if value.dtype.itemsize < 4:  # narrow labels (uint8, int16, ...) keep their dtype
                return _to_device(value, value.dtype)
            return _to_device(value, jnp.int64 if float_dtype == jnp.float64 else jnp.int32)
        return _to_device(value, value.dtype)
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


_JAX_DTYPES = {
    "float64": jnp.float64,
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
_TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# --------------------------------------------------------------------------------------------
# Outputs as pytrees


def flatten_output(output: Any) -> list[tuple[tuple, Any]]:
    """The leaves of an output with their paths, in a fixed order.

    A tuple, list or NamedTuple is a node whose children are taken by position, a dict one whose
    children are taken by key (in the order of ``repr(key)``), ``None`` holds no leaf, and
    anything else (an array, a tensor, a number) is a leaf. A path is the tuple of positions and
    keys from the root: ``()`` for a lone array, ``(1,)`` for the second output of a tuple,
    ``("loss",)`` for a dict's entry.
    """
    if output is None:
        return []
    if isinstance(output, dict):
        children = [(key, output[key]) for key in sorted(output, key=repr)]
    elif isinstance(output, (tuple, list)):
        children = list(enumerate(output))
    else:
        return [((), output)]
    return [((key, *path), leaf) for key, child in children for path, leaf in flatten_output(child)]


def output_leaves(output: Any) -> list:
    """The leaves of :func:`flatten_output`, without their paths."""
    return [leaf for _, leaf in flatten_output(output)]


def unflatten_output(like: Any, leaves: Sequence) -> Any:
    """``like``'s structure with its leaves replaced by ``leaves`` (in :func:`flatten_output`
    order): the same tuple, list, NamedTuple or dict types, dict keys in their original order."""
    remaining = iter(leaves)

    def build(node):
        if node is None:
            return None
        if isinstance(node, dict):
            built = {key: build(node[key]) for key in sorted(node, key=repr)}
            return type(node)((key, built[key]) for key in node)
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # a NamedTuple
            return type(node)(*(build(child) for child in node))
        if isinstance(node, (tuple, list)):
            return type(node)(build(child) for child in node)
        return next(remaining)

    return build(like)


def output_label(path: tuple) -> str:
    """How a report names the leaf at ``path``: ``output``, ``output 1``, ``output 'loss'``,
    ``output [1]['z']``."""
    if not path:
        return "output"
    if len(path) == 1:
        return f"output {path[0]!r}"
    return "output " + "".join(f"[{key!r}]" for key in path)


def _kind(node: Any) -> str:
    if node is None:
        return "none"
    if isinstance(node, dict):
        return "dict"
    if isinstance(node, (tuple, list)):
        return "sequence"
    return "leaf"


def _shape(leaf: Any) -> tuple:
    return tuple(int(size) for size in getattr(leaf, "shape", np.shape(leaf)))


def _what(node: Any) -> str:
    kind = _kind(node)
    if kind == "none":
        return "None"
    if kind == "dict":
        return f"a dict with keys {sorted(node, key=repr)}"
    if kind == "sequence":
        named = f"NamedTuple {type(node).__name__}" if hasattr(node, "_fields") else None
        return f"a {named or type(node).__name__} of {len(node)}"
    return f"an array of shape {_shape(node)}"


def describe_mismatch(left: Any, right: Any, names: tuple[str, str] = ("torch", "jax")) -> str:
    """How two outputs differ in structure or shape, in words ("" when their leaves match).

    Sequences (tuple, list, NamedTuple) are matched by position, dicts by key; e.g. ``"torch
    returns 2 outputs, jax 3"``, ``"torch output 1 has shape (9, 1), jax (9,)"``, ``"dict keys
    differ: only torch has ['z_loss'], only jax has ['aux']"``.
    """
    problems: list[str] = []
    _mismatch(left, right, (), names, problems)
    return "; ".join(problems)


def _mismatch(left, right, path, names, problems) -> None:
    first, second = names
    label = output_label(path)
    kinds = _kind(left), _kind(right)
    if kinds[0] != kinds[1]:
        if path:
            problems.append(f"{first} {label} is {_what(left)}, {second} {_what(right)}")
        else:
            problems.append(f"{first} returns {_what(left)}, {second} {_what(right)}")
        return
    if kinds[0] == "sequence":
        if len(left) != len(right):
            if path:
                problems.append(f"{first} {label} holds {len(left)} entries, {second} {len(right)}")
            else:
                problems.append(f"{first} returns {len(left)} outputs, {second} {len(right)}")
            return
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            _mismatch(a, b, (*path, index), names, problems)
    elif kinds[0] == "dict":
        only_left = sorted(set(left) - set(right), key=repr)
        only_right = sorted(set(right) - set(left), key=repr)
        if only_left or only_right:
            where = f"{label}: " if path else ""
            sides = [
                f"only {name} has {keys}"
                for name, keys in zip(names, (only_left, only_right), strict=True)
                if keys
            ]
            problems.append(f"{where}dict keys differ: {', '.join(sides)}")
        for key in sorted(set(left) & set(right), key=repr):
            _mismatch(left[key], right[key], (*path, key), names, problems)
    elif kinds[0] == "leaf" and _shape(left) != _shape(right):
        problems.append(f"{first} {label} has shape {_shape(left)}, {second} {_shape(right)}")


# --------------------------------------------------------------------------------------------
# Running one side: a forward pass, then a pull-back of the cotangents


@dataclasses.dataclass
class _Forward:
    """One side's forward pass: the output as returned, its leaves in float64 (in
    :func:`flatten_output` order), and ``pull(cotangents) -> gradient`` (float64)."""

    output: Any
    values: list[np.ndarray]
    pull: Callable[[Sequence[np.ndarray]], np.ndarray]


def _check_cotangents(caller: str, output: Any, cotangents: Sequence) -> None:
    flat = flatten_output(output)
    if len(cotangents) != len(flat):
        raise ValueError(
            f"{caller}: `fn` returns {len(flat)} output arrays; {len(cotangents)} cotangents given."
        )
    for (path, leaf), cotangent in zip(flat, cotangents, strict=True):
        if _shape(leaf) != np.shape(cotangent):
            raise ValueError(
                f"{caller}: {output_label(path)} has shape {_shape(leaf)}, its cotangent "
                f"{np.shape(cotangent)}."
            )


def _jax_cotangent(cotangent, leaf):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        if isinstance(cotangent, np.ndarray):  # concrete: cast on the host
            return _to_device(cotangent, leaf.dtype)
        return jnp.asarray(cotangent, leaf.dtype)
    return np.zeros(np.shape(leaf), jax.dtypes.float0)  # an integer output has no gradient


def _forward_jax(fn: Callable, args: tuple, kwargs: dict, dtype: str) -> _Forward:
    """``fn`` run eagerly in ``dtype`` under ``jax.vjp`` (the path that checks concrete inputs)."""
    with jax_precision(dtype):
        others = jnp.float64 if dtype == "float64" else jnp.float32
        x = _to_device(round_to(args[0], dtype), _JAX_DTYPES[dtype])
        rest = [_to_jax(value, others) for value in args[1:]]
        options = {key: _to_jax(value, others) for key, value in kwargs.items()}
        output, vjp = jax.vjp(lambda x: fn(x, *rest, **options), x)
        leaves = output_leaves(output)
        values = [_to_float64(leaf) for leaf in leaves]

    def pull(cotangents):
        with jax_precision(dtype):
            cot = [
                _jax_cotangent(c, jnp.asarray(leaf))
                for c, leaf in zip(cotangents, leaves, strict=True)
            ]
            (grad,) = vjp(unflatten_output(output, cot))
            return _to_float64(grad)

    return _Forward(output, values, pull)


def _forward_torch(fn: Callable, args: tuple, kwargs: dict, dtype: str) -> _Forward:
    """``fn`` run in ``dtype`` with autograd recording."""
    others = torch.float64 if dtype == "float64" else torch.float32
    x = torch.tensor(round_to(args[0], dtype)).to(_TORCH_DTYPES[dtype]).requires_grad_(True)
    rest = [_to_torch(value, others) for value in args[1:]]
    options = {key: _to_torch(value, others) for key, value in kwargs.items()}
    output = fn(x, *rest, **options)
    leaves = output_leaves(output)
    values = [
        leaf.detach().to(torch.float64).cpu().numpy()
        if isinstance(leaf, torch.Tensor)
        else np.asarray(leaf, np.float64)
        for leaf in leaves
    ]

    def pull(cotangents):
        # Outputs that carry no gradient (a count, or one detached on purpose, as T5X's z-loss)
        # contribute nothing to the pull-back.
        pairs = [
            (leaf, torch.tensor(np.asarray(c)).to(leaf.dtype))
            for leaf, c in zip(leaves, cotangents, strict=True)
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad
        ]
        grad = None
        if pairs:
            grad = torch.autograd.grad(
                [leaf for leaf, _ in pairs], x, [c for _, c in pairs], allow_unused=True
            )[0]
        grad = torch.zeros_like(x) if grad is None else grad
        return grad.detach().to(torch.float64).cpu().numpy()

    return _Forward(output, values, pull)


def run_jax(
    fn: Callable, args: tuple, kwargs: dict, dtype: str, cotangents=None, *, jit: bool = False
):
    """Outputs (a list of float64 arrays, the leaves in :func:`flatten_output` order) and the
    gradient (pulled back with ``cotangents``, one per leaf; None without them) of a JAX
    function.

    By default ``fn`` runs eagerly. With ``jit=True`` the forward pass and the pull-back run as
    one compiled program (see :func:`_vjp_compiled`): arrays and Python floats in ``kwargs`` are
    traced arguments, every other option (strings, ints, bools, None) is static. The program is
    cached per (``fn``, static options, shapes and dtypes), so many calls that differ only in
    their values cost a compilation once and then ~0.1 ms each, where eager dispatch costs
    several ms. ``fn`` must accept traced floats (``smoothing``, ``normalizer``, ...) and the
    concrete-input checks (labels out of range raise) do not run: use it for value properties,
    not for error behaviour.
    """
    if jit:
        with jax_precision(dtype):
            others = jnp.float64 if dtype == "float64" else jnp.float32
            x = _to_device(round_to(args[0], dtype), _JAX_DTYPES[dtype])
            rest = [_to_jax(value, others) for value in args[1:]]
            return _run_jax_compiled(fn, x, rest, kwargs, others, cotangents)
    # Eager on purpose: it is the path that checks concrete inputs, and compiling one program
    # per case costs more than running the few dozen primitives op by op.
    forward = _forward_jax(fn, args, kwargs, dtype)
    if cotangents is None:
        return forward.values, None
    _check_cotangents("run_jax", forward.output, cotangents)
    return forward.values, forward.pull(cotangents)


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
    leaves = output_leaves(output)
    outputs = [leaf.astype(jnp.float64) for leaf in leaves]
    if cotangents is None:
        return outputs, None
    _check_cotangents("run_jax", output, cotangents)
    cot = [_jax_cotangent(c, leaf) for c, leaf in zip(cotangents, leaves, strict=True)]
    (grad,) = vjp(unflatten_output(output, cot))
    return outputs, grad.astype(jnp.float64)


def run_torch(fn: Callable, args: tuple, kwargs: dict, dtype: str, cotangents=None):
    """Outputs (a list of float64 arrays, the leaves in :func:`flatten_output` order) and the
    gradient (pulled back with ``cotangents``, one per leaf; None without them) of a torch
    function."""
    forward = _forward_torch(fn, args, kwargs, dtype)
    if cotangents is None:
        return forward.values, None
    _check_cotangents("run_torch", forward.output, cotangents)
    return forward.values, forward.pull(cotangents)


_FORWARDS = {"jax": _forward_jax, "torch": _forward_torch}


# --------------------------------------------------------------------------------------------
# Comparing


def _differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| elementwise, 0 where both are NaN or both the same infinity, inf where one is
    NaN and the other not."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    same = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    return np.where(np.isnan(diff), np.inf, diff)


def max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    worst = 0.0
    for left, right in zip(a, b, strict=False):
        worst = max(worst, float(_differences(left, right).max(initial=0.0)))
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


def rounding_budget(
    reference: np.ndarray, dtype: str, scale: float, *, gradient: bool = False
) -> np.ndarray:
    """The error a correct ``dtype`` implementation may make, elementwise, around ``reference``
    (its float64 value on the same rounded inputs). ``compare``'s low-precision verdict.

    With ``u`` the dtype's unit roundoff (:data:`UNIT_ROUNDOFF`: 2**-8 for bfloat16, 2**-11 for
    float16), ``k`` = :data:`ROUNDING_STEPS` = 4 and ``S = 1 + max |x|`` (``scale``: the largest
    magnitude of the rounded differentiated input):

    * an output: ``k u (|r| + S)``;
    * the gradient: ``k u (|g| + S G)``, with ``G`` the largest |entry| of the reference
      gradient.

    Derivation, for a loss of the softmax family (``lse(x) - sum_c t_c x_c`` and its kin) on
    inputs that both sides share exactly (the rounding of the inputs is not an error):

    * Every intermediate value of a row (a logit, a shifted logit, a log-sum-exp, a
      log-probability) has magnitude up to about ``S``, and each rounding of one costs at most
      ``u`` times that. A careful implementation (shift by the row's max, accumulate in float32)
      makes errors relative to each quantity; a plain one in the low-precision dtype (PyTorch's
      own bf16 ``log_softmax``: ``x - (max + log sum)``) makes an absolute error of ``u S`` in
      every log-probability. A loss value is a few such quantities added and rounded once more,
      so its error is at most ``k u (|loss| + S)``: ``k`` counts the roundings an error passes
      through (the output's own, the exponential's or the logarithm's argument, the sum, the
      subtraction).
    * A gradient entry is ``cotangent * normaliser * (p_c - t_c)``. ``p_c = exp(z_c)`` inherits
      the absolute error ``u S`` of ``z_c`` as a relative one, so the entry's error is at most
      ``u S`` times ``cotangent * normaliser * p_c``, which the largest gradient entry ``G``
      bounds (the cotangent and the normaliser are shared by the entries of a row, and ``p_c <=
      1``); the target ``t_c`` or the entry itself rounded costs ``u |g|``.

    ``S`` is taken over the whole input, not per row (``compare`` does not know which axis holds
    a row's classes): the largest row's scale, so never tighter than a per-row budget. What it
    does not cover:

    * A gradient that is small everywhere because every row is nearly fit (``p ~ t``) while the
      logits are large: ``G`` shrinks with the gradient, but an absolute log-probability error
      does not. PyTorch's own bf16 ``F.cross_entropy`` on one well-fit row of logits ~5 is 0.007
      off a gradient of 0.012.
    * A ``"sum"`` over rows whose losses are far below ``S / k``: the error grows with the number
      of rows, the value does not.

    Widen the verdict with ``compare(..., tolerances={"bfloat16": (rtol, atol)})`` there.
    """
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(
            f"rounding_budget: `dtype` must be one of {list(UNIT_ROUNDOFF)}; got {dtype!r}."
        )
    magnitude = np.abs(np.asarray(reference, np.float64))
    magnitude = np.where(np.isfinite(magnitude), magnitude, 0.0)
    if gradient:
        extra = scale * float(magnitude.max(initial=0.0))
    else:
        extra = scale
    return ROUNDING_STEPS * UNIT_ROUNDOFF[dtype] * (magnitude + extra)


def _input_scale(x: np.ndarray) -> float:
    magnitude = np.abs(np.asarray(x, np.float64))
    return 1.0 + float(magnitude[np.isfinite(magnitude)].max(initial=0.0))


@dataclasses.dataclass
class _Worst:
    """The element that uses the largest share of its allowance."""

    share: float = 0.0
    text: str = ""

    def update(self, label, got, expected, allowed, got_name, expected_name, rule):
        """Take the elements of ``got`` against ``expected`` (``allowed``: the error each may
        have); keep the worst, described in words."""
        got, expected = np.broadcast_arrays(
            np.asarray(got, np.float64), np.asarray(expected, np.float64)
        )
        allowed = np.broadcast_to(allowed, got.shape)
        diff = _differences(got, expected)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(diff == 0, 0.0, diff / allowed)
        share = np.where(np.isnan(share), np.inf, share)
        if share.size == 0 or float(share.max()) <= self.share:
            return
        index = np.unravel_index(int(np.argmax(share)), share.shape)
        at = f" at {tuple(int(i) for i in index)}" if share.ndim else ""
        self.share = float(share[index])
        self.text = (
            f"{label}{at}: {got_name} {got[index]:.6g}, {expected_name} {expected[index]:.6g}, "
            f"|Δ| {diff[index]:.3g} > allowed {allowed[index]:.3g}{rule}"
        )


def compare_case(
    jax_fn: Callable,
    torch_fn: Callable,
    args: tuple,
    kwargs: dict,
    dtype: str,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    *,
    reference: str = "torch",
) -> CaseResult:
    """One case in one dtype (see the module docstring for what is compared and judged).

    ``rtol``, ``atol``: float64 and float32, the parity tolerance (None: that of
    :data:`DEFAULT_TOLERANCES`); a low-precision dtype, a widening of the rounding budget (an
    element passes within either; None: no widening). ``reference``: the side run in float64 as
    the reference, ``"torch"`` or ``"jax"``.
    """
    case = {key: value for key, value in kwargs.items() if not isinstance(value, np.ndarray)}
    functions = {"jax": jax_fn, "torch": torch_fn}
    stage = f"the float64 reference ({reference}_fn in float64 on the rounded inputs)"
    try:
        inputs = rounded_inputs(args, kwargs, dtype)
        expected = _FORWARDS[reference](functions[reference], *inputs, "float64")
        cotangents = [
            round_to(c, dtype) for c in _cotangents(np.random.default_rng(seed), expected.values)
        ]
        expected_grad = expected.pull(cotangents)
        runs = {}
        for side in ("jax", "torch"):
            if dtype == "float64" and side == reference:
                runs[side] = (expected.values, expected_grad)
                continue
            stage = f"{side}_fn in {dtype}"
            forward = _FORWARDS[side](functions[side], *inputs, dtype)
            mismatch = describe_mismatch(expected.output, forward.output, (reference, side))
            if mismatch:
                return CaseResult(case, dtype, math.inf, math.inf, False, mismatch)
            runs[side] = (forward.values, forward.pull(cotangents))
    except Exception as error:  # A crash on either side is a failed case, reported as such.
        return CaseResult(
            case, dtype, math.inf, math.inf, False, f"{stage}: {type(error).__name__}: {error}"
        )
    (jax_out, jax_grad), (torch_out, torch_grad) = runs["jax"], runs["torch"]
    accuracy = {
        side: (max_abs_diff(out, expected.values), max_abs_diff([grad], [expected_grad]))
        for side, (out, grad) in runs.items()
    }
    labels = [output_label(path) for path, _ in flatten_output(expected.output)]
    worst = _Worst()
    if dtype in LOW_PRECISION:
        scale = _input_scale(inputs[0][0])
        widen_rtol, widen_atol = rtol or 0.0, atol or 0.0
        rule = f" (rounding budget, S = {scale:.3g})"
        if rtol or atol:
            rule = (
                f" (rounding budget, S = {scale:.3g}, or rtol {widen_rtol:g}, atol {widen_atol:g})"
            )
        for side, (out, grad) in runs.items():
            leaves = [*zip(labels, out, expected.values, strict=True)]
            leaves.append(("gradient", grad, expected_grad))
            for label, got, ref in leaves:
                budget = rounding_budget(ref, dtype, scale, gradient=label == "gradient")
                allowed = np.maximum(budget, widen_atol + widen_rtol * np.abs(ref))
                worst.update(f"{side} {label}", got, ref, allowed, side, "float64 reference", rule)
    else:
        default_rtol, default_atol = DEFAULT_TOLERANCES[dtype]
        rtol = default_rtol if rtol is None else rtol
        atol = default_atol if atol is None else atol
        rule = f" (rtol {rtol:g}, atol {atol:g})"
        pairs = [*zip(labels, jax_out, torch_out, strict=True)]
        for label, got, other in [*pairs, ("gradient", jax_grad, torch_grad)]:
            allowed = atol + rtol * np.abs(np.asarray(other, np.float64))
            worst.update(label, got, other, allowed, "jax", "torch", rule)
    passed = worst.share <= 1.0
    return CaseResult(
        case,
        dtype,
        max_abs_diff(jax_out, torch_out),
        max_abs_diff([jax_grad], [torch_grad]),
        passed,
        "" if passed else worst.text,
        accuracy,
        worst.share,
    )


def _cotangents(rng: np.random.Generator, outputs: list[np.ndarray]) -> list[np.ndarray]:
    return [rng.uniform(0.5, 1.5, size=np.shape(out)) for out in outputs]


def _check_tolerance(fn: str, name: str, value: Any, *, optional: bool = False) -> None:
    """A tolerance is a finite number >= 0 (None where ``optional``): a negative or NaN one
    would fail every element, or pass none, for a reason that is not the functions'."""
    if value is None and optional:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (0 <= value < math.inf)
    ):
        raise ValueError(f"{fn}: `{name}` must be a finite number >= 0; got {value!r}.")


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
    reference: str = "torch",
) -> Report:
    """Compare a JAX and a PyTorch function on every case and dtype; return a :class:`Report`.

    A case passes in float64 and float32 when JAX and PyTorch agree elementwise, ``|jax - torch|
    <= atol + rtol |torch|``, on every output and on the gradient (parity); in bfloat16 and
    float16 when each side is within :func:`rounding_budget` of the float64 reference on the
    same rounded inputs (accuracy). Both are measured and reported in every dtype.

    Args:
      jax_fn: ``fn(x, *args, **kwargs)``; ``x`` is differentiated. Outputs may be an array or
        a pytree of arrays (tuple, list, NamedTuple, dict); every leaf is compared and pulled
        back, matched between the sides by position or key.
      torch_fn: the PyTorch function, called and pulled back the same way.
      make_inputs: ``(rng, case) -> (args, kwargs)``, NumPy arrays in float64 and Python values.
      cases: the argument grid; each case is handed to ``make_inputs``.
      dtypes: any of ``"float64"``, ``"float32"``, ``"bfloat16"``, ``"float16"``.
      rtol: overrides the relative tolerance of every dtype: the parity tolerance in float64
        and float32; in bfloat16 and float16 a widening of the rounding budget (an element
        passes within either).
      atol: the same for the absolute tolerance.
      tolerances: ``{dtype: (rtol, atol)}``, the same per dtype (defaults:
        :data:`DEFAULT_TOLERANCES` for float64 and float32, no widening for low precision).
      seed: seeds the inputs (case ``i`` uses ``seed + i``) and the cotangents.
      reference: the function run in float64 on the rounded inputs as the reference, ``"torch"``
        (default: the framework a port usually starts from) or ``"jax"``.
    """
    if reference not in _FORWARDS:
        raise ValueError(f"compare: `reference` must be 'torch' or 'jax'; got {reference!r}.")
    if isinstance(dtypes, str):
        raise ValueError(
            f"compare: `dtypes` must be a sequence of dtype names, e.g. ({dtypes!r},); got the "
            f"string {dtypes!r}."
        )
    for dtype in dtypes:
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"compare: `dtypes` must be among {list(SUPPORTED_DTYPES)}; got {dtype!r}."
            )
    _check_tolerance("compare", "rtol", rtol, optional=True)
    _check_tolerance("compare", "atol", atol, optional=True)
    for dtype, pair in (tolerances or {}).items():
        if dtype not in SUPPORTED_DTYPES:  # a misspelt key would be ignored
            raise ValueError(
                f"compare: `tolerances` keys must be among {list(SUPPORTED_DTYPES)}; got {dtype!r}."
            )
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(
                f"compare: `tolerances[{dtype!r}]` must be a pair (rtol, atol); got {pair!r}."
            )
        _check_tolerance("compare", f"tolerances[{dtype!r}]", pair[0])
        _check_tolerance("compare", f"tolerances[{dtype!r}]", pair[1])
    table = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    results = []
    for index, case in enumerate(cases):
        args, kwargs = make_inputs(np.random.default_rng(seed + index), dict(case))
        for dtype in dtypes:
            given = (tolerances or {}).get(dtype)
            case_rtol, case_atol = table[dtype] if dtype not in LOW_PRECISION else (None, None)
            if dtype in LOW_PRECISION and given is not None:
                case_rtol, case_atol = given
            result = compare_case(
                jax_fn,
                torch_fn,
                args,
                kwargs,
                dtype,
                case_rtol if rtol is None else rtol,
                case_atol if atol is None else atol,
                seed=seed + index,
                reference=reference,
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
    if framework not in _FORWARDS:
        raise ValueError(
            f"compare_with_oracle: `framework` must be 'jax' or 'torch'; got {framework!r}."
        )
    _check_tolerance("compare_with_oracle", "rtol", rtol)
    _check_tolerance("compare_with_oracle", "atol", atol)
    results = []
    for index, case in enumerate(cases):
        args, kwargs = make_inputs(np.random.default_rng(seed + index), dict(case))
        shown = {**case, **{k: v for k, v in kwargs.items() if not isinstance(v, np.ndarray)}}
        stage = "the oracle"
        try:
            expected, vjp = oracle(*args, **kwargs)
            several = isinstance(expected, tuple)
            expected_leaves = [np.asarray(out) for out in output_leaves(expected)]
            cotangents = _cotangents(np.random.default_rng(seed + index), expected_leaves)
            expected_grad = vjp(cotangents if several else cotangents[0])
            stage = f"{framework} in float64"
            forward = _FORWARDS[framework](fn, args, kwargs, "float64")
            mismatch = describe_mismatch(expected, forward.output, ("oracle", framework))
            if mismatch:
                results.append(CaseResult(shown, "float64", math.inf, math.inf, False, mismatch))
                continue
            outputs, grad = forward.values, forward.pull(cotangents)
        except Exception as error:
            message = f"{stage}: {type(error).__name__}: {error}"
            results.append(CaseResult(shown, "float64", math.inf, math.inf, False, message))
            continue
        worst = _Worst()
        labels = [output_label(path) for path, _ in flatten_output(expected)]
        pairs = [*zip(labels, outputs, expected_leaves, strict=True)]
        rule = f" (rtol {rtol:g}, atol {atol:g})"
        for label, got, want in [*pairs, ("gradient", grad, expected_grad)]:
            allowed = atol + rtol * np.abs(np.asarray(want, np.float64))
            worst.update(label, got, want, allowed, framework, "oracle", rule)
        passed = worst.share <= 1.0
        results.append(
            CaseResult(
                shown,
                "float64",
                max_abs_diff(outputs, expected_leaves),
                max_abs_diff([grad], [expected_grad]),
                passed,
                "" if passed else worst.text,
                used=worst.share,
            )
        )
    return Report(name, results)
