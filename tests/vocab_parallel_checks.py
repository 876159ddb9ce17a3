"""The checks of tests/test_vocab_parallel.py: ``python vocab_parallel_checks.py``.

Forks 4 gloo processes on CPU (MASTER_ADDR=127.0.0.1, a free port; forked after torch and
lstorch are imported, so that no rank imports them again). Each check runs over the whole world
(4 ranks) and over pairs of ranks (two groups of 2, side by side), every rank holding its slice
of the same vocabulary:

* ``dense``: ``vocab_parallel_smoothed_cross_entropy`` with class weights;
* ``fused``: ``vocab_parallel_fused_linear_smoothed_cross_entropy`` (with and without class
  weights and bias, several chunks per rank);
* ``megatron``: ``lstorch.compat.megatron.vocab_parallel_cross_entropy`` (pairs only: the
  example of its docstring, and random logits);
* ``dtensor``: ``lstorch.smoothed_cross_entropy`` of a DTensor sharded on the class axis;
* ``dtensor options``: the same with the options the vocabulary-parallel loss takes;
* ``options``: both losses with ``where``, ``normalizer``, ``kl``, ``class_mask``, ``z_loss``
  and ``return_z_loss`` (``d z_loss`` too);
* ``log probs``: the dense loss with ``from_log_probs=True`` on each rank's slice of the
  log-probabilities (its derivatives to second order and forward mode too);
* ``transforms``: both losses with ``softcap``, ``logit_scale`` and ``return_stats`` (the
  argmax's ties across ranks included);
* ``compiled``: a training step under ``torch.compile`` that calls each loss and
  ``.backward()`` (on the first pair of ranks only);
* ``higher order`` (class weights: double backward and forward mode; the fused head's double
  backward against ``F.cross_entropy`` too), ``autocast`` (the fused
  head under bf16 autocast) and ``errors`` (the messages of bad calls).

Each result is compared on the rank with the single-process loss and gradients (the dense
``lstorch.smoothed_cross_entropy`` of the full logits, and ``F.cross_entropy`` where torch has
the same loss). Every collective is counted by wrapping ``torch.distributed``'s functions:
its kind, bytes and group size, in forward and backward separately. Rank files are collected
and one JSON object is printed.
"""

import json
import os
import pathlib
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 4
ROWS, LOCAL_VOCAB, FEATURES = 6, 5, 4
IGNORE = -100

# The collectives that could move data; each is wrapped to record (kind, bytes).
WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
           "reduce_scatter_tensor", "all_to_all_single", "send", "recv")  # fmt: skip
FUNCTIONAL = ("all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_to_all_single")


class Counter:
    """Records every collective a rank runs while ``active``."""

    def __init__(self):
        self.calls = []
        self.active = False

    def wrap(self, module, name, prefix=""):
        original = getattr(module, name)

        def counted(tensor, *args, **kwargs):
            if self.active:
                size = tensor.numel() * tensor.element_size() if torch.is_tensor(tensor) else -1
                self.calls.append([prefix + name, size])
            return original(tensor, *args, **kwargs)

        setattr(module, name, counted)

    def measure(self, fn):
        """``(fn(), the collectives it ran)``."""
        self.calls, self.active = [], True
        try:
            result = fn()
        finally:
            self.active = False
        return result, self.calls


def install_counter() -> Counter:
    import torch.distributed._functional_collectives as funcol

    counter = Counter()
    for name in WRAPPED:
        counter.wrap(dist, name)
    for name in FUNCTIONAL:
        counter.wrap(funcol, name, prefix="functional.")
    return counter


def diff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def scale(a) -> float:
    return max(1.0, float(a.detach().double().abs().max()))


def hexbytes(tensor) -> str:
    return tensor.detach().contiguous().numpy().tobytes().hex()


def data(seed, world, dtype):
    """The same full-vocabulary data on every rank."""
    generator = torch.Generator().manual_seed(seed)
    vocab = world * LOCAL_VOCAB
    logits = 3 * torch.randn(ROWS, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (ROWS,), generator=generator)
    labels[torch.rand(ROWS, generator=generator) < 0.3] = IGNORE
    labels[0] = 1  # a counted row
    class_weight = torch.rand(vocab, generator=generator, dtype=torch.float64) + 0.5
    cotangent = torch.rand(ROWS, generator=generator, dtype=torch.float64) + 0.5
    hidden = torch.randn(ROWS, FEATURES, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, FEATURES, generator=generator, dtype=torch.float64)
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64)
    tensors = (logits, labels, class_weight, cotangent, hidden, weight, bias)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


DENSE_CASES = [  # convention, pad_index, reduction, smoothing
    ("uniform", None, "mean", 0.1),
    ("others", None, "none", 0.2),
    ("others_but_pad", 3, "sum", 0.3),
]
FUSED_CASES = [  # convention, pad_index, reduction, smoothing, class weights, bias
    ("uniform", None, "mean", 0.1, True, True),
    ("others", None, "none", 0.2, False, True),
    ("others_but_pad", 3, "sum", 0.3, True, False),
]


def cotangent_for(loss, cotangent):
    return cotangent.to(loss.dtype) if loss.ndim else torch.tensor(1.0, dtype=loss.dtype)


def dense_checks(counter, group, world, rank, tag):
    import lstorch
    from lstorch.distributed import vocab_parallel_smoothed_cross_entropy

    results = []
    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    for index, (convention, pad_index, reduction, smoothing) in enumerate(DENSE_CASES):
        for dtype in (torch.float64, torch.float32):
            logits, labels, class_weight, cotangent, *_ = data(index, world, dtype)
            options = dict(convention=convention, pad_index=pad_index, ignore_index=IGNORE,
                           reduction=reduction)  # fmt: skip
            full = logits.clone().requires_grad_(True)
            dense_eps = torch.tensor(smoothing, dtype=dtype, requires_grad=True)
            dense = lstorch.smoothed_cross_entropy(
                full, labels, smoothing=dense_eps, weight=class_weight, **options
            )
            cot = cotangent_for(dense, cotangent)
            dense_grad, dense_eps_grad = torch.autograd.grad(dense, (full, dense_eps), cot)
            local = logits[:, mine].clone().requires_grad_(True)
            eps = torch.tensor(smoothing, dtype=dtype, requires_grad=True)
            loss, forward = counter.measure(
                lambda local=local, eps=eps, labels=labels, class_weight=class_weight,
                options=options: vocab_parallel_smoothed_cross_entropy(
                    local, labels, group=group, smoothing=eps, weight=class_weight[mine],
                    **options,
                )
            )  # fmt: skip
            (grad, eps_grad), backward = counter.measure(
                lambda loss=loss, local=local, eps=eps, cot=cot: torch.autograd.grad(
                    loss, (local, eps), cot
                )
            )
            torch_diff = 0.0
            if convention == "uniform":  # torch's own loss, where it has this one
                torch_loss = F.cross_entropy(
                    logits, labels, weight=class_weight, ignore_index=IGNORE,
                    label_smoothing=smoothing, reduction=reduction,
                )  # fmt: skip
                torch_diff = diff(loss, torch_loss)
            results.append(
                dict(
                    check="dense", group=tag, world=world, dtype=str(dtype)[6:],
                    case=f"{convention}/{reduction}/{smoothing}", rows=ROWS,
                    loss_bytes=hexbytes(loss),
                    loss_diff=diff(loss, dense), loss_scale=scale(dense), torch_diff=torch_diff,
                    grad_diff=diff(grad, dense_grad[:, mine]), grad_scale=scale(dense_grad),
                    eps_grad_diff=diff(eps_grad, dense_eps_grad),
                    eps_grad_scale=scale(dense_eps_grad),
                    forward=forward, backward=backward,
                )
            )  # fmt: skip
    return results


def fused_checks(counter, group, world, rank, tag):
    import lstorch
    from lstorch.distributed import vocab_parallel_fused_linear_smoothed_cross_entropy

    results = []
    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    for index, case in enumerate(FUSED_CASES):
        convention, pad_index, reduction, smoothing, weighted, with_bias = case
        for dtype in (torch.float64, torch.float32):
            _, labels, class_weight, cotangent, hidden, weight, bias = data(index, world, dtype)
            options = dict(convention=convention, pad_index=pad_index, ignore_index=IGNORE,
                           reduction=reduction)  # fmt: skip
            full = [hidden.clone(), weight.clone(), bias.clone()]
            for tensor in full:
                tensor.requires_grad_(True)
            dense_eps = torch.tensor(smoothing, dtype=dtype, requires_grad=True)
            dense = lstorch.smoothed_cross_entropy(
                F.linear(full[0], full[1], full[2] if with_bias else None), labels,
                smoothing=dense_eps, weight=class_weight if weighted else None, **options,
            )  # fmt: skip
            cot = cotangent_for(dense, cotangent)
            dense_grads = torch.autograd.grad(dense, (*full, dense_eps), cot, allow_unused=True)
            ours = [hidden.clone(), weight[mine].clone(), bias[mine].clone()]
            for tensor in ours:
                tensor.requires_grad_(True)
            eps = torch.tensor(smoothing, dtype=dtype, requires_grad=True)

            def call(ours=ours, eps=eps, labels=labels, class_weight=class_weight,
                     weighted=weighted, with_bias=with_bias, options=options):  # fmt: skip
                return vocab_parallel_fused_linear_smoothed_cross_entropy(
                    ours[0], ours[1], labels, bias_shard=ours[2] if with_bias else None,
                    group=group, smoothing=eps, chunk_size=2,
                    class_weight=class_weight[mine] if weighted else None, **options,
                )  # fmt: skip

            loss, forward = counter.measure(call)
            grads, backward = counter.measure(
                lambda loss=loss, ours=ours, eps=eps, cot=cot: torch.autograd.grad(
                    loss, (*ours, eps), cot, allow_unused=True
                )
            )
            d_hidden, d_weight, d_bias, d_eps = grads
            expected_bias = dense_grads[2][mine] if with_bias else None
            twin = {}
            if dtype == torch.float64 and not weighted:  # for the JAX twin, in the test
                twin = dict(
                    hidden=hidden.tolist(), weight=weight.tolist(), bias=bias.tolist(),
                    labels=labels.tolist(), cotangent=cot.tolist(), options=options,
                    smoothing=smoothing, loss=loss.tolist(), d_hidden=d_hidden.tolist(),
                    d_weight=d_weight.tolist(), d_bias=d_bias.tolist(),
                )  # fmt: skip
            results.append(
                dict(
                    check="fused", group=tag, world=world, dtype=str(dtype)[6:],
                    case=f"{convention}/{reduction}/{smoothing}/weighted={weighted}"
                    f"/bias={with_bias}", rows=ROWS, features=FEATURES,
                    loss_bytes=hexbytes(loss), d_hidden_bytes=hexbytes(d_hidden),
                    loss_diff=diff(loss, dense), loss_scale=scale(dense),
                    grad_diff=max(diff(d_hidden, dense_grads[0]),
                                  diff(d_weight, dense_grads[1][mine]),
                                  diff(d_bias, expected_bias) if with_bias else 0.0),
                    bias_grad_none=d_bias is None,
                    grad_scale=max(scale(g) for g in dense_grads[:3] if g is not None),
                    eps_grad_diff=diff(d_eps, dense_grads[3]),
                    eps_grad_scale=scale(dense_grads[3]),
                    forward=forward, backward=backward, twin=twin,
                )
            )  # fmt: skip
    return results


Z_CASE = dict(smoothing=0.3, convention="others_but_pad", pad_index=3, reduction="sum")
OPTION_CASES = [  # name, the options (both losses), a z-loss weight that requires grad
    ("where/normalizer", dict(smoothing=0.1, reduction="mean", normalizer=7.0), False),
    ("kl", dict(smoothing=0.2, convention="others", reduction="none", kl=True), False),
    ("z_loss", dict(Z_CASE, return_z_loss=True), True),
    ("kl/z_loss", dict(smoothing=0.1, reduction="none", kl=True, z_loss=0.02), False),
    # the full (K,) mask on every rank; classes 2, 3 (the pad) and 7 masked
    (
        "class_mask",
        dict(
            smoothing=0.2,
            convention="others_but_pad",
            pad_index=3,
            reduction="none",
            class_mask=True,
        ),
        False,
    ),
    (
        "class_mask/weight/z_loss",
        dict(
            smoothing=0.3,
            convention="others",
            reduction="mean",
            class_mask=True,
            weight=True,
            kl=False,
            z_loss=0.1,
            return_z_loss=True,
        ),
        True,
    ),
    # The pad's logit at -inf (a model that masks its pad): the dense loss leaves it out of the
    # support sum on the rank that holds it (summed and subtracted, every row was NaN). The
    # fused head's logits come from F.linear, so its case runs with a finite pad.
    (
        "pad_minus_inf",
        dict(smoothing=0.2, convention="others_but_pad", pad_index=3, reduction="none",
             pad_minus_inf=True),
        False,
    ),
]  # fmt: skip
MASKED = [2, 3, 7]


def option_checks(counter, group, world, rank, tag):
    """``where``, ``normalizer``, ``kl``, ``z_loss`` and ``return_z_loss`` in both
    vocabulary-parallel losses, against ``lstorch.smoothed_cross_entropy`` of the full logits
    (of ``F.linear`` of the full weight for the fused head): the loss, the z-part, every
    gradient (``d z_loss`` too where it requires grad)."""
    import lstorch
    from lstorch.distributed import (
        vocab_parallel_fused_linear_smoothed_cross_entropy,
        vocab_parallel_smoothed_cross_entropy,
    )

    results = []
    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    for index, (name, options, z_grad) in enumerate(OPTION_CASES):
        dtype = torch.float64
        logits, labels, class_weight, cotangent, hidden, weight, bias = data(
            10 + index, world, dtype
        )
        where = torch.ones(ROWS, dtype=torch.bool)
        where[1] = False  # a row that would count, left out by `where`
        options = dict(options, ignore_index=IGNORE, where=where)
        if options.pop("pad_minus_inf", False):
            logits = logits.clone()
            logits[:, options["pad_index"]] = -torch.inf
        if options.get("class_mask"):
            mask = torch.ones(world * LOCAL_VOCAB, dtype=torch.bool)
            mask[MASKED] = False
            labels = torch.where((labels != IGNORE) & ~mask[labels.clamp(0)], 0, labels)
            options["class_mask"] = mask
            # Masked classes' logits at -inf, as a vocabulary cut off that way holds them: out
            # of the softmax and the support, never a -inf * 0 in a sum.
            logits = logits.masked_fill(~mask, -torch.inf)
        full_weight = class_weight if options.pop("weight", False) else None
        if z_grad:
            options["z_loss"] = torch.tensor(0.05, dtype=dtype, requires_grad=True)
        extra = [options["z_loss"]] if z_grad else []

        def total(out):  # the loss, plus the z-part alone (its own cotangent reaches backward)
            return out[0] + 0.5 * out[1] if isinstance(out, tuple) else out

        for kind in ("dense", "fused"):
            full = [logits.clone()] if kind == "dense" else [hidden.clone(), weight.clone(),
                                                              bias.clone()]  # fmt: skip
            for tensor in full:
                tensor.requires_grad_(True)
            x = full[0] if kind == "dense" else F.linear(*full)
            expected = lstorch.smoothed_cross_entropy(x, labels, weight=full_weight, **options)
            cot = cotangent_for(total(expected), cotangent)
            expected_grads = torch.autograd.grad(total(expected), full + extra, cot)
            if kind == "dense":
                ours = [logits[:, mine].clone()]
                expected_mine = [expected_grads[0][:, mine]]
            else:
                ours = [hidden.clone(), weight[mine].clone(), bias[mine].clone()]
                expected_mine = [expected_grads[0], expected_grads[1][mine],
                                 expected_grads[2][mine]]  # fmt: skip
            for tensor in ours:
                tensor.requires_grad_(True)

            local_weight = None if full_weight is None else full_weight[mine]

            def call(ours=ours, kind=kind, labels=labels, options=options, w=local_weight):
                if kind == "dense":
                    return vocab_parallel_smoothed_cross_entropy(
                        ours[0], labels, group=group, weight=w, **options
                    )
                return vocab_parallel_fused_linear_smoothed_cross_entropy(
                    ours[0], ours[1], labels, bias_shard=ours[2], group=group, chunk_size=2,
                    class_weight=w, **options,
                )  # fmt: skip

            out, forward = counter.measure(call)
            grads, backward = counter.measure(
                lambda out=out, ours=ours, cot=cot, extra=extra: torch.autograd.grad(
                    total(out), ours + extra, cot
                )
            )
            z_diff = diff(out[1], expected[1]) if isinstance(out, tuple) else 0.0
            replicated = [grads[0]] if kind == "fused" else []
            replicated += list(grads[len(ours) :])
            out_z = out[1].reshape(-1) if isinstance(out, tuple) else torch.zeros(0, dtype=dtype)
            expected_all = expected_mine + list(expected_grads[len(full) :])  # and d z_loss
            results.append(
                dict(
                    check="options", group=tag, world=world, dtype="float64",
                    case=f"{kind}/{name}", rows=ROWS, features=FEATURES,
                    loss_bytes=hexbytes(total(out)),
                    # what every rank gets whole: d hidden (fused), d z_loss, the z-part
                    grad_bytes=hexbytes(torch.cat([g.reshape(-1) for g in [*replicated, out_z]])),
                    weighted=full_weight is not None or "class_mask" in options,
                    asked_z=bool(options.get("return_z_loss")),
                    returned_z=isinstance(out, tuple), expected_z=isinstance(expected, tuple),
                    loss_diff=diff(total(out), total(expected)) + z_diff,
                    loss_scale=scale(total(expected)),
                    grad_diff=max(diff(a, b) for a, b in zip(grads, expected_all, strict=True)),
                    grad_scale=max(scale(g) for g in expected_grads),
                    forward=forward, backward=backward,
                )
            )  # fmt: skip
    return results


LOG_PROB_CASES = [  # name, the options (weight, class_mask, where: built from the data)
    ("uniform/mean", dict(smoothing=0.1, reduction="mean")),
    ("others/kl/none", dict(smoothing=0.2, convention="others", kl=True, reduction="none")),
    ("others_but_pad/weight/sum", dict(smoothing=0.3, convention="others_but_pad", pad_index=3,
                                       reduction="sum", weight=True)),
    ("class_mask/weight/where/normalizer", dict(smoothing=0.2, convention="others",
                                                reduction="mean", class_mask=True, weight=True,
                                                where=True, normalizer=7.0)),
]  # fmt: skip


def log_prob_checks(counter, group, world, rank, tag):
    """``vocab_parallel_smoothed_cross_entropy(..., from_log_probs=True)`` on this rank's slice
    of ``log_softmax`` over the whole vocabulary (masked classes at ``-inf`` with a class mask),
    against ``lstorch.smoothed_cross_entropy(..., from_log_probs=True)`` of the whole
    log-probabilities, in float64 and float32: the loss, this rank's slice of the gradient,
    ``d smoothing``, the forward-mode tangent (each rank holding its slice of it), and the
    double backward's derivative in the cotangent (each rank's share, summed over the group),
    with the collectives of the plain call."""
    import torch.autograd.forward_ad as fwAD

    import lstorch
    from lstorch.distributed import vocab_parallel_smoothed_cross_entropy

    results = []
    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    vocab = world * LOCAL_VOCAB
    for index, (name, case_options) in enumerate(LOG_PROB_CASES):
        for dtype in (torch.float64, torch.float32):
            logits, labels, class_weight, cotangent, *_ = data(70 + index, world, dtype)
            options = dict(case_options, ignore_index=IGNORE, from_log_probs=True)
            smoothing = options.pop("smoothing")
            full_weight = class_weight if options.pop("weight", False) else None
            if options.pop("where", False):
                options["where"] = torch.arange(ROWS) != 1  # a row that would count, left out
            if options.get("class_mask"):
                labels = _with_class_mask(options, labels, vocab, MASKED)
                logits = logits.masked_fill(~options["class_mask"], -torch.inf)
            log_probs = torch.log_softmax(logits, dim=-1)  # over the whole vocabulary
            tangent = torch.randn(log_probs.shape, generator=torch.Generator().manual_seed(index),
                                  dtype=torch.float64).to(dtype)  # fmt: skip

            def loss_of(x, eps, weight, labels=labels, options=options, parallel=False):
                if parallel:
                    return vocab_parallel_smoothed_cross_entropy(
                        x, labels, group=group, smoothing=eps, weight=weight, **options
                    )
                return lstorch.smoothed_cross_entropy(
                    x, labels, smoothing=eps, weight=weight, **options
                )

            full = log_probs.clone().requires_grad_(True)
            dense_eps = torch.tensor(smoothing, dtype=dtype, requires_grad=True)
            dense = loss_of(full, dense_eps, full_weight)
            dense_cot = cotangent_for(dense, cotangent).requires_grad_(True)
            dense_grad, dense_eps_grad = torch.autograd.grad(
                dense, (full, dense_eps), dense_cot, create_graph=True
            )
            (dense_second,) = torch.autograd.grad((dense_grad * tangent).sum(), dense_cot)
            local = log_probs[:, mine].clone().requires_grad_(True)
            eps = torch.tensor(smoothing, dtype=dtype, requires_grad=True)
            local_weight = None if full_weight is None else full_weight[mine]
            loss, forward = counter.measure(
                lambda local=local, eps=eps, w=local_weight: loss_of(local, eps, w, parallel=True)
            )
            cot = cotangent_for(loss, cotangent).requires_grad_(True)
            (grad, eps_grad), backward = counter.measure(
                lambda loss=loss, local=local, eps=eps, cot=cot: torch.autograd.grad(
                    loss, (local, eps), cot, create_graph=True
                )
            )
            (second,) = torch.autograd.grad((grad * tangent[:, mine]).sum(), cot)
            dist.all_reduce(second, group=group)  # each rank's classes' share of it
            with fwAD.dual_level():
                ours_jvp = fwAD.unpack_dual(loss_of(
                    fwAD.make_dual(log_probs[:, mine], tangent[:, mine]), smoothing,
                    local_weight, parallel=True,
                )).tangent  # fmt: skip
                dense_jvp = fwAD.unpack_dual(
                    loss_of(fwAD.make_dual(log_probs, tangent), smoothing, full_weight)
                ).tangent
            results.append(
                dict(
                    check="log probs", group=tag, world=world, dtype=str(dtype)[6:], case=name,
                    rows=ROWS, weighted=full_weight is not None or "class_mask" in options,
                    loss_bytes=hexbytes(loss),
                    loss_diff=diff(loss, dense), loss_scale=scale(dense),
                    grad_diff=max(diff(grad, dense_grad[:, mine]), diff(second, dense_second)),
                    grad_scale=max(scale(dense_grad), scale(dense_second)),
                    eps_grad_diff=diff(eps_grad, dense_eps_grad),
                    eps_grad_scale=scale(dense_eps_grad),
                    jvp_diff=diff(ours_jvp, dense_jvp), jvp_scale=scale(dense_jvp),
                    forward=forward, backward=backward,
                )
            )  # fmt: skip
    return results


TRANSFORM_CASES = [  # name, the options (both losses)
    ("softcap", dict(smoothing=0.1, reduction="mean", softcap=2.0)),
    ("logit_scale", dict(smoothing=0.2, convention="others", reduction="none", logit_scale=0.7)),
    (
        "softcap/logit_scale/weight/z_loss",
        dict(
            smoothing=0.1, reduction="sum", softcap=3.0, logit_scale=1.3, z_loss=0.01, weight=True
        ),
    ),
    ("return_stats", dict(smoothing=0.1, reduction="none", return_stats=True)),
    (
        "return_stats/softcap/weight",
        dict(smoothing=0.2, reduction="mean", softcap=2.0, weight=True, return_stats=True),
    ),
    (
        "return_stats/class_mask/return_z_loss",
        dict(
            smoothing=0.2,
            convention="others",
            reduction="none",
            class_mask=True,
            z_loss=0.05,
            return_z_loss=True,
            return_stats=True,
        ),
    ),
]


def transform_checks(counter, group, world, rank, tag):
    """``softcap``, ``logit_scale`` and ``return_stats`` in both vocabulary-parallel losses,
    against ``lstorch.smoothed_cross_entropy`` of the full logits (of ``F.linear`` of the full
    weight for the fused head) with the same options: the loss (and z-part), every gradient,
    and the stats (``lse``, ``entropy``, ``correct``). Rows 3-5 are argmax cases: all logits
    equal (the first class wins), two equal maxima on the first and the last rank with the
    label on the later one (not correct: torch's first-max rule), and the label at the argmax."""
    import lstorch
    from lstorch.distributed import (
        vocab_parallel_fused_linear_smoothed_cross_entropy,
        vocab_parallel_smoothed_cross_entropy,
    )

    results = []
    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    vocab = world * LOCAL_VOCAB
    for index, (name, options) in enumerate(TRANSFORM_CASES):
        dtype = torch.float64
        logits, labels, class_weight, cotangent, hidden, weight, bias = data(
            30 + index, world, dtype
        )
        options = dict(options, ignore_index=IGNORE)
        mask = torch.ones(vocab, dtype=torch.bool)
        if options.get("class_mask"):
            mask[MASKED] = False
            options["class_mask"] = mask
        allowed = [c for c in range(vocab) if mask[c]]
        logits[3] = 0.0  # every logit equal: the first allowed class is the argmax
        logits[4] = 0.0
        logits[4, [allowed[0], allowed[-1]]] = 5.0  # a tie across ranks: the first wins
        labels[3], labels[4] = allowed[0], allowed[-1]
        labels = torch.where((labels != IGNORE) & ~mask[labels.clamp(0)], allowed[1], labels)
        full_weight = class_weight if options.pop("weight", False) else None

        def parts(out, options=options):  # (the loss plus half the z-part, the stats or None)
            if not isinstance(out, tuple):
                return out, None
            stats = out[-1] if options.get("return_stats") else None
            values = out[:-1] if stats is not None else out
            loss = values[0] + 0.5 * values[1] if len(values) == 2 else values[0]
            return loss, stats

        for kind in ("dense", "fused"):
            full = [logits.clone()] if kind == "dense" else [hidden.clone(), weight.clone(),
                                                              bias.clone()]  # fmt: skip
            for tensor in full:
                tensor.requires_grad_(True)
            x = full[0] if kind == "dense" else F.linear(*full)
            label_rows = labels.clone()
            label_rows[5] = x.detach()[5].masked_fill(~mask, -torch.inf).argmax()  # correct
            expected = lstorch.smoothed_cross_entropy(x, label_rows, weight=full_weight, **options)
            expected_loss, expected_stats = parts(expected)
            cot = cotangent_for(expected_loss, cotangent)
            expected_grads = torch.autograd.grad(expected_loss, full, cot)
            if kind == "dense":
                ours = [logits[:, mine].clone()]
                expected_mine = [expected_grads[0][:, mine]]
            else:
                ours = [hidden.clone(), weight[mine].clone(), bias[mine].clone()]
                expected_mine = [expected_grads[0], expected_grads[1][mine],
                                 expected_grads[2][mine]]  # fmt: skip
            for tensor in ours:
                tensor.requires_grad_(True)
            local_weight = None if full_weight is None else full_weight[mine]

            def call(ours=ours, kind=kind, labels=label_rows, w=local_weight, options=options):
                if kind == "dense":
                    return vocab_parallel_smoothed_cross_entropy(
                        ours[0], labels, group=group, weight=w, **options
                    )
                return vocab_parallel_fused_linear_smoothed_cross_entropy(
                    ours[0], ours[1], labels, bias_shard=ours[2], group=group, chunk_size=2,
                    class_weight=w, **options,
                )  # fmt: skip

            out, forward = counter.measure(call)
            loss, stats = parts(out)
            grads, backward = counter.measure(
                lambda loss=loss, ours=ours, cot=cot: torch.autograd.grad(loss, ours, cot)
            )
            stats_diff, stats_bytes, correct = 0.0, "", None
            if expected_stats is not None:
                stats_diff = max(diff(stats.lse, expected_stats.lse),
                                 diff(stats.entropy, expected_stats.entropy))  # fmt: skip
                stats_bytes = hexbytes(torch.stack([stats.lse, stats.entropy]))
                stats_bytes += hexbytes(stats.correct)
                correct = [stats.correct.tolist(), expected_stats.correct.tolist()]
            results.append(
                dict(
                    check="transforms", group=tag, world=world, dtype="float64",
                    case=f"{kind}/{name}", rows=ROWS, features=FEATURES,
                    loss_bytes=hexbytes(loss) + stats_bytes,
                    d_hidden_bytes=hexbytes(grads[0]) if kind == "fused" else "",
                    weighted=full_weight is not None or "class_mask" in options,
                    stats=expected_stats is not None, returned_stats=stats is not None,
                    correct=correct,
                    loss_diff=diff(loss, expected_loss) + stats_diff,
                    loss_scale=scale(expected_loss),
                    grad_diff=max(diff(a, b) for a, b in zip(grads, expected_mine, strict=True)),
                    grad_scale=max(scale(g) for g in expected_grads),
                    forward=forward, backward=backward,
                )
            )  # fmt: skip
    return results


def higher_order_checks(counter, group, world, rank, tag):
    """With class weights: the Hessian-vector product by double backward (this rank's slice)
    and the loss's tangent by forward-mode dual numbers (each rank holding its slice of the
    tangent), against the dense loss's, in float64."""
    import torch.autograd.forward_ad as fwAD

    import lstorch
    from lstorch.distributed import vocab_parallel_smoothed_cross_entropy

    results = []
    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    for index, (convention, pad_index, reduction, smoothing) in enumerate(DENSE_CASES):
        logits, labels, class_weight, cotangent, *_ = data(20 + index, world, torch.float64)
        vector = torch.randn(logits.shape, generator=torch.Generator().manual_seed(index),
                             dtype=torch.float64)  # fmt: skip
        options = dict(convention=convention, pad_index=pad_index, ignore_index=IGNORE,
                       reduction=reduction, smoothing=smoothing)  # fmt: skip

        def ours(x, options=options, labels=labels, class_weight=class_weight):
            return vocab_parallel_smoothed_cross_entropy(
                x, labels, group=group, weight=class_weight[mine], **options
            )

        def dense(x, options=options, labels=labels, class_weight=class_weight):
            return lstorch.smoothed_cross_entropy(x, labels, weight=class_weight, **options)

        def hvp(loss_fn, x, v, cotangent=cotangent):
            loss = loss_fn(x)
            cot = cotangent_for(loss, cotangent)
            (grad,) = torch.autograd.grad(loss, x, cot, create_graph=True)
            (result,) = torch.autograd.grad((grad * v).sum(), x)
            return result

        local = logits[:, mine].clone().requires_grad_(True)
        full = logits.clone().requires_grad_(True)
        ours_hvp = hvp(ours, local, vector[:, mine])
        dense_hvp = hvp(dense, full, vector)[:, mine]
        with fwAD.dual_level():
            ours_jvp = fwAD.unpack_dual(ours(fwAD.make_dual(logits[:, mine], vector[:, mine])))
            dense_jvp = fwAD.unpack_dual(dense(fwAD.make_dual(logits, vector)))
        results.append(
            dict(
                check="higher order", group=tag, world=world, dtype="float64",
                case=f"{convention}/{reduction}/{smoothing}/weighted=True",
                loss_bytes=hexbytes(ours_jvp.primal),
                hvp_diff=diff(ours_hvp, dense_hvp), hvp_scale=scale(dense_hvp),
                jvp_diff=diff(ours_jvp.tangent, dense_jvp.tangent),
                jvp_scale=scale(dense_jvp.tangent),
            )
        )  # fmt: skip
    return results + fused_higher_order_checks(group, world, rank, tag)


FUSED_HIGHER_ORDER_CASES = [
    *FUSED_CASES,
    ("uniform", None, "mean", 0.1, True, True, dict(z_loss=0.01, softcap=3.0, chunk_size=2)),
]


def fused_higher_order_checks(group, world, rank, tag):
    """The fused head's Hessian-vector product by double backward, of the hidden states (every
    rank's terms, all-reduced) and of this rank's rows of the weight and bias (the other ranks'
    terms through the lse): against ``F.cross_entropy`` of the full logits where torch has the
    loss (the uniform convention without a z-loss or softcap), and against
    ``lstorch.smoothed_cross_entropy`` of them for every case, in float64."""
    import lstorch
    from lstorch.distributed import vocab_parallel_fused_linear_smoothed_cross_entropy

    results = []
    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    for index, case in enumerate(FUSED_HIGHER_ORDER_CASES):
        convention, pad_index, reduction, smoothing, weighted, with_bias, *more = case
        more = more[0] if more else {}
        _, labels, class_weight, cotangent, hidden, weight, bias = data(
            40 + index, world, torch.float64
        )
        generator = torch.Generator().manual_seed(index)
        vectors = [torch.randn(t.shape, generator=generator, dtype=torch.float64)
                   for t in (hidden, weight, bias)]  # fmt: skip
        full_weight = class_weight if weighted else None
        extra = {name: value for name, value in more.items() if name != "chunk_size"}
        options = dict(convention=convention, pad_index=pad_index, ignore_index=IGNORE,
                       reduction=reduction, smoothing=smoothing, **extra)  # fmt: skip
        # chunks of 3 are ragged within each rank's 5 classes
        fused_options = dict(options, chunk_size=more.get("chunk_size", 3))

        def ours(h, w, b=None, options=fused_options, labels=labels, full_weight=full_weight):
            return vocab_parallel_fused_linear_smoothed_cross_entropy(
                h, w, labels, bias_shard=b, group=group,
                class_weight=None if full_weight is None else full_weight[mine], **options,
            )  # fmt: skip

        def dense(h, w, b=None, options=options, labels=labels, full_weight=full_weight):
            logits = h @ w.T + (0.0 if b is None else b)
            return lstorch.smoothed_cross_entropy(logits, labels, weight=full_weight, **options)

        def torchs(h, w, b=None, options=options, labels=labels, full_weight=full_weight):
            logits = h @ w.T + (0.0 if b is None else b)
            return F.cross_entropy(
                logits, labels, weight=full_weight, ignore_index=IGNORE,
                reduction=options["reduction"], label_smoothing=options["smoothing"],
            )  # fmt: skip

        def hvp(loss_fn, inputs, vs, cotangent=cotangent):
            inputs = [t.clone().requires_grad_(True) for t in inputs]
            loss = loss_fn(*inputs)
            grads = torch.autograd.grad(loss, inputs, cotangent_for(loss, cotangent),
                                        create_graph=True)  # fmt: skip
            product = sum((g * v).sum() for g, v in zip(grads, vs, strict=True))
            return torch.autograd.grad(product, inputs), loss

        count = 3 if with_bias else 2
        full_inputs, full_vectors = (hidden, weight, bias)[:count], vectors[:count]
        local_inputs = [hidden] + [t[mine] for t in full_inputs[1:]]
        local_vectors = [vectors[0]] + [v[mine] for v in full_vectors[1:]]
        try:
            ours_hvp, loss = hvp(ours, local_inputs, local_vectors)
        except NotImplementedError as error:  # reported by the test, not a crash of every rank
            results.append(dict(check="fused higher order", group=tag, world=world,
                                dtype="float64", case=str(case), error=str(error)))  # fmt: skip
            continue

        def mine_of(products):
            return [products[0]] + [p[mine] for p in products[1:]]

        dense_hvp = mine_of(hvp(dense, full_inputs, full_vectors)[0])

        def scalar(h, inputs=local_inputs, cotangent=cotangent):  # torch.func wants a scalar
            loss = ours(h, *inputs[1:])
            return (loss * cotangent_for(loss, cotangent)).sum()

        # torch.func.grad of torch.func.grad: the (hidden, hidden) block's product
        func_hvp = torch.func.grad(lambda h, v=vectors[0]: (torch.func.grad(scalar)(h) * v).sum())(
            hidden
        )
        hidden_only = [vectors[0]] + [torch.zeros_like(v) for v in full_vectors[1:]]
        dense_hidden_hvp = hvp(dense, full_inputs, hidden_only)[0][0]
        result = dict(
            check="fused higher order", group=tag, world=world, dtype="float64",
            case=f"{convention}/{reduction}/{smoothing}/weighted={weighted}/bias={with_bias}"
                 f"/{sorted(more)}",
            loss_bytes=hexbytes(loss),
            hvp_diff=max(diff(a, b) for a, b in zip(ours_hvp, dense_hvp, strict=True)),
            hvp_scale=max(scale(b) for b in dense_hvp),
            hvp_bytes=[hexbytes(ours_hvp[0])],
            func_hvp_diff=diff(func_hvp, dense_hidden_hvp),
            func_hvp_scale=scale(dense_hidden_hvp),
        )  # fmt: skip
        if convention == "uniform" and not extra:
            torch_hvp = mine_of(hvp(torchs, full_inputs, full_vectors)[0])
            result.update(
                torch_hvp_diff=max(diff(a, b) for a, b in zip(ours_hvp, torch_hvp, strict=True)),
                torch_hvp_scale=max(scale(b) for b in torch_hvp),
            )  # fmt: skip
        results.append(result)
    return results


def autocast_checks(counter, group, world, rank, tag):
    """The losses under ``torch.autocast`` (bf16 on the CPU). The dense loss computes as
    outside the region; the fused head rounds as the single-process fused loss does, in both
    passes, against ``lstorch.fused_linear_smoothed_cross_entropy`` of the whole weight under
    the same autocast."""
    import lstorch
    from lstorch.distributed import (
        vocab_parallel_fused_linear_smoothed_cross_entropy,
        vocab_parallel_smoothed_cross_entropy,
    )

    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    logits, labels, class_weight, cotangent, hidden, weight, bias = data(30, world, torch.float32)
    results = []
    # The dense loss, forward and backward inside the region (the CPU runs the backward in the
    # caller's autocast state), against the same call outside it and the single process's: its
    # class-weighted support sum is a matrix product, which autocast would run in bf16.
    dense = dict(smoothing=0.1, convention="others", ignore_index=IGNORE)
    runs = []
    for enabled in (True, False):
        local = logits[:, mine].clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            rows = vocab_parallel_smoothed_cross_entropy(
                local, labels, group=group, weight=class_weight[mine], **dense
            )
            (grad,) = torch.autograd.grad(rows, local, cotangent)
        runs.append((rows, grad))
    whole = logits.clone().requires_grad_(True)
    expected = lstorch.smoothed_cross_entropy(whole, labels, weight=class_weight, **dense)
    (expected_grad,) = torch.autograd.grad(expected, whole, cotangent)
    (rows, grad), (plain_rows, plain_grad) = runs
    results.append(
        dict(
            check="autocast dense", group=tag, world=world, dtype="float32",
            case="dense/bf16 autocast", loss_bytes=hexbytes(rows),
            same_as_outside=hexbytes(rows) == hexbytes(plain_rows)
            and hexbytes(grad) == hexbytes(plain_grad),
            loss_diff=diff(rows, expected), loss_scale=scale(expected),
            grad_diff=diff(grad, expected_grad[:, mine]), grad_scale=scale(expected_grad),
            dtypes=[str(rows.dtype), str(grad.dtype)],
        )
    )  # fmt: skip
    full = [hidden.clone(), weight.clone(), bias.clone()]
    ours = [hidden.clone(), weight[mine].clone(), bias[mine].clone()]
    for tensor in full + ours:
        tensor.requires_grad_(True)
    options = dict(smoothing=0.1, ignore_index=IGNORE, chunk_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = lstorch.fused_linear_smoothed_cross_entropy(
            full[0], full[1], labels, bias=full[2], **options
        )
        loss = vocab_parallel_fused_linear_smoothed_cross_entropy(
            ours[0], ours[1], labels, bias_shard=ours[2], group=group, **options
        )
    expected_grads = torch.autograd.grad(expected, full)
    grads = torch.autograd.grad(loss, ours)
    results.append(
        dict(
            check="autocast", group=tag, world=world, dtype="float32",
            case="fused/bf16 autocast", loss_bytes=hexbytes(loss),
            loss_diff=diff(loss, expected), loss_scale=scale(expected),
            grad_diff=max(diff(grads[0], expected_grads[0]),
                          diff(grads[1], expected_grads[1][mine]),
                          diff(grads[2], expected_grads[2][mine])),
            grad_scale=max(scale(g) for g in expected_grads),
            grad_dtypes=[str(g.dtype) for g in grads],
        )
    )  # fmt: skip
    return results


# kind, the options (return_stats reads its local max after the all-reduce), and the upstream
# gradient the step's .backward() sends: a 0-d grad_outputs into a scaled sum of the mean loss
# and its z-part, and random per-row cotangents into the unreduced loss.
COMPILED_CASES = [
    ("dense", dict(smoothing=0.1, convention="others", reduction="mean", z_loss=0.01,
                   return_z_loss=True, return_stats=True), "0-d grad_outputs"),
    ("fused", dict(smoothing=0.2, reduction="none", return_stats=True, chunk_size=2), "random"),
]  # fmt: skip
ZERO_DIM_GRAD = 0.375  # exact in float32


def compiled_checks(counter, group, world, rank, tag):
    """A training step compiled by ``torch.compile`` (Inductor, the default backend) that
    calls each vocabulary-parallel loss and ``.backward()`` (with the case's upstream gradient),
    against the same step run eagerly and the single-process loss of the whole logits: the
    loss, the z-part, the stats (lse, entropy, and ``correct`` on rows whose label is the
    argmax), every gradient. Half the rows' labels are their argmax, so that ``correct`` has
    rows of both kinds."""
    import lstorch
    from lstorch.distributed import (
        vocab_parallel_fused_linear_smoothed_cross_entropy,
        vocab_parallel_smoothed_cross_entropy,
    )

    results = []
    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    for index, (kind, options, upstream) in enumerate(COMPILED_CASES):
        logits, labels, _, cotangent, hidden, weight, bias = data(90 + index, world, torch.float32)
        if kind == "fused":
            logits = F.linear(hidden, weight, bias)
        labels = torch.where(torch.arange(ROWS) % 2 == 0, logits.argmax(-1), labels)
        options = dict(options, ignore_index=IGNORE)

        def step(*tensors, kind=kind, labels=labels, options=options, upstream=upstream,
                 cotangent=cotangent):  # fmt: skip
            if kind == "dense":
                out = vocab_parallel_smoothed_cross_entropy(
                    tensors[0], labels, group=group, **options
                )
            else:
                out = vocab_parallel_fused_linear_smoothed_cross_entropy(
                    tensors[0], tensors[1], labels, bias_shard=tensors[2], group=group,
                    **options,
                )  # fmt: skip
            if upstream == "random":
                out[0].backward(cotangent)
            else:
                total = out[0] + 0.5 * out[1] if options.get("return_z_loss") else out[0]
                total.backward(torch.tensor(ZERO_DIM_GRAD))
            return out

        def inputs(kind=kind, logits=logits, hidden=hidden, weight=weight, bias=bias):
            tensors = [logits[:, mine]] if kind == "dense" else [hidden, weight[mine], bias[mine]]
            return [tensor.clone().requires_grad_(True) for tensor in tensors]

        eager_inputs, compiled_inputs = inputs(), inputs()
        eager = step(*eager_inputs)
        compiled = torch.compile(step)(*compiled_inputs)
        single = dict(options)
        single.pop("chunk_size", None)
        expected = lstorch.smoothed_cross_entropy(logits, labels, **single)
        *values, stats = compiled
        *eager_values, eager_stats = eager
        *expected_values, expected_stats = expected
        results.append(
            dict(
                check="compiled", group=tag, world=world, dtype="float32", case=kind,
                correct=[stats.correct.tolist(), eager_stats.correct.tolist(),
                         expected_stats.correct.tolist()],
                loss_diff=max(
                    diff(a, b) for a, b in zip([*values, stats.lse, stats.entropy],
                                               [*eager_values, eager_stats.lse,
                                                eager_stats.entropy], strict=True)
                ),
                loss_scale=max(scale(v) for v in [*eager_values, eager_stats.lse]),
                expected_diff=max(
                    diff(a, b) for a, b in zip([*values, stats.lse, stats.entropy],
                                               [*expected_values, expected_stats.lse,
                                                expected_stats.entropy], strict=True)
                ),
                grad_diff=max(diff(a.grad, b.grad)
                              for a, b in zip(compiled_inputs, eager_inputs, strict=True)),
                grad_scale=max(scale(a.grad) for a in eager_inputs),
            )
        )  # fmt: skip
    return results


# The example of lstorch.compat.megatron.vocab_parallel_cross_entropy's docstring.
MEGATRON_EXAMPLE = [2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.25]


def megatron_checks(counter, group, world, rank, tag):
    from lstorch.compat.megatron import vocab_parallel_cross_entropy

    results = []
    if world == 2:  # the docstring's example, a 2-rank one
        example = torch.tensor([MEGATRON_EXAMPLE], dtype=torch.float64)
        local_vocab = example.shape[-1] // world
        local = example[:, rank * local_vocab : (rank + 1) * local_vocab]
        loss, forward = counter.measure(
            lambda: vocab_parallel_cross_entropy(local, torch.tensor([0]), 0.1, group)
        )
        results.append(
            dict(check="megatron", group=tag, world=world, case="docstring example",
                 loss=loss.tolist(), loss_bytes=hexbytes(loss), forward=forward)
        )  # fmt: skip
    generator = torch.Generator().manual_seed(7)
    logits = 3 * torch.randn(3, 2, world * LOCAL_VOCAB, generator=generator, dtype=torch.float64)
    target = torch.randint(0, world * LOCAL_VOCAB, (3, 2), generator=generator)
    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    local = logits[..., mine].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target, 0.2, tp_group=group)
    (grad,) = torch.autograd.grad(loss.sum(), local)
    results.append(
        dict(check="megatron", group=tag, world=world, case="random", logits=logits.tolist(),
             target=target.tolist(), loss=loss.tolist(), grad=grad.tolist(),
             loss_bytes=hexbytes(loss))
    )  # fmt: skip
    return results


def dtensor_checks(counter, mesh, world, rank, tag):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import lstorch

    results = []
    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    for index, (convention, pad_index, reduction, smoothing) in enumerate(DENSE_CASES):
        logits, labels, class_weight, cotangent, *_ = data(10 + index, world, torch.float32)
        options = dict(smoothing=smoothing, convention=convention, pad_index=pad_index,
                       ignore_index=IGNORE, reduction=reduction)  # fmt: skip
        weighted = index != 1
        weight = class_weight if weighted else None
        full = logits.clone().requires_grad_(True)
        dense = lstorch.smoothed_cross_entropy(full, labels, weight=weight, **options)
        cot = cotangent_for(dense, cotangent)
        (dense_grad,) = torch.autograd.grad(dense, full, cot)
        sharded = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_(True)
        replicated_labels = distribute_tensor(labels, mesh, [Replicate()])
        loss, forward = counter.measure(
            lambda sharded=sharded, labels=replicated_labels, weight=weight, options=options:
            lstorch.smoothed_cross_entropy(sharded, labels, weight=weight, **options)
        )  # fmt: skip
        is_replicated = isinstance(loss, DTensor) and loss.placements == (Replicate(),)
        cot_dtensor = distribute_tensor(cot, mesh, [Replicate()])
        _, backward = counter.measure(lambda loss=loss, cot=cot_dtensor: loss.backward(cot))
        grad = sharded.grad
        grad_placements = str(grad.placements)
        local_loss = loss.to_local()
        results.append(
            dict(
                check="dtensor", group=tag, world=world, dtype="float32",
                case=f"{convention}/{reduction}/{smoothing}/weighted={weighted}", rows=ROWS,
                replicated=is_replicated, grad_placements=grad_placements,
                loss_bytes=hexbytes(local_loss),
                loss_diff=diff(local_loss, dense), loss_scale=scale(dense),
                grad_diff=diff(grad.to_local(), dense_grad[:, mine]),
                grad_scale=scale(dense_grad), forward=forward, backward=backward,
            )
        )  # fmt: skip
    return results


DTENSOR_OPTION_CASES = [  # name, the options; where, class_mask and z_loss given as DTensors
    (
        "where/normalizer/kl/class_mask/z_loss",
        dict(smoothing=0.2, convention="others", reduction="mean", normalizer=7.0, kl=True,
             class_mask=True, z_loss=0.05, return_z_loss=True),
    ),
    (
        "softcap/logit_scale/weight/return_stats",
        dict(smoothing=0.1, reduction="none", softcap=2.0, logit_scale=0.8, weight=True,
             return_stats=True),
    ),
    # the log-probabilities over the whole vocabulary, sharded as the logits are
    (
        "from_log_probs/kl/class_mask",
        dict(smoothing=0.2, convention="others", reduction="none", kl=True, class_mask=True,
             from_log_probs=True),
    ),
]  # fmt: skip


def _with_class_mask(options, labels, vocab, masked):
    """``options["class_mask"]`` masking the classes ``masked``; the labels of counted rows that
    fall on them moved to class 0 (a masked label is an error)."""
    mask = torch.ones(vocab, dtype=torch.bool)
    mask[masked] = False
    options["class_mask"] = mask
    return torch.where((labels != IGNORE) & ~mask[labels.clamp(0)], 0, labels)


def _single_process(logits, labels, weight, options, cotangent):
    """``lstorch.smoothed_cross_entropy`` on the full logits: (its outputs as a tuple, the
    loss's cotangent, the logits' gradient)."""
    import lstorch

    full = logits.clone().requires_grad_(True)
    expected = lstorch.smoothed_cross_entropy(full, labels, weight=weight, **options)
    expected = expected if isinstance(expected, tuple) else (expected,)
    cot = cotangent_for(expected[0], cotangent)
    (expected_grad,) = torch.autograd.grad(expected[0], full, cot)
    return expected, cot, expected_grad


def _compared(outputs, expected) -> dict:
    """The outputs against the expected ones: the float ones' largest difference and scale,
    whether the boolean ones (``RowStats.correct``) are equal."""
    pairs = list(zip(outputs, expected, strict=True))
    floats = [(a, b) for a, b in pairs if a.is_floating_point()]
    return dict(
        bools_equal=all(torch.equal(a, b) for a, b in pairs if not a.is_floating_point()),
        loss_diff=max(diff(a, b) for a, b in floats),
        loss_scale=max(scale(b) for _, b in floats),
    )


def dtensor_option_checks(counter, mesh, world, rank, tag):
    """``lstorch.smoothed_cross_entropy`` of a DTensor sharded on the class axis with the
    options the vocabulary-parallel loss takes (``where`` and ``class_mask`` as replicated
    DTensors, ``z_loss`` as a 0-d one), against the same call on the full logits: every
    output a replicated DTensor, the loss, the z-part, the stats and the gradient."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import lstorch

    results = []
    mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    vocab = world * LOCAL_VOCAB
    for index, (name, options) in enumerate(DTENSOR_OPTION_CASES):
        dtype = torch.float64
        logits, labels, class_weight, cotangent, *_ = data(50 + index, world, dtype)
        options = dict(options, ignore_index=IGNORE)
        weight = class_weight if options.pop("weight", False) else None
        where = torch.ones(ROWS, dtype=torch.bool)
        where[1] = False
        options["where"] = where
        if options.get("class_mask"):
            labels = _with_class_mask(options, labels, vocab, MASKED)
        if options.get("from_log_probs"):  # the masked classes' log-probabilities: -inf
            mask = options.get("class_mask", torch.ones(vocab, dtype=torch.bool))
            logits = torch.log_softmax(logits.masked_fill(~mask, -torch.inf), dim=-1)
        expected, cot, expected_grad = _single_process(logits, labels, weight, options, cotangent)
        sharded = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_(True)
        dtensor_options = dict(options)
        for option in ("where", "class_mask", "z_loss"):
            if option in dtensor_options:
                value = dtensor_options[option]
                value = torch.tensor(value, dtype=dtype) if isinstance(value, float) else value
                dtensor_options[option] = distribute_tensor(value, mesh, [Replicate()])
        out, forward = counter.measure(
            lambda sharded=sharded, labels=labels, weight=weight, options=dtensor_options:
            lstorch.smoothed_cross_entropy(sharded, labels, weight=weight, **options)
        )  # fmt: skip
        out = out if isinstance(out, tuple) else (out,)
        flat_out = [*out[:-1], *out[-1]] if options.get("return_stats") else list(out)
        flat_expected = (
            [*expected[:-1], *expected[-1]] if options.get("return_stats") else list(expected)
        )
        replicated = all(
            isinstance(value, DTensor) and value.placements == (Replicate(),) for value in flat_out
        )
        local = [value.to_local() for value in flat_out]
        cot_dtensor = distribute_tensor(cot, mesh, [Replicate()])
        _, backward = counter.measure(lambda loss=out[0], cot=cot_dtensor: loss.backward(cot))
        results.append(
            dict(
                check="dtensor options", group=tag, world=world, dtype="float64", case=name,
                rows=ROWS, replicated=replicated, outputs=len(flat_out),
                expected_outputs=len(flat_expected), **_compared(local, flat_expected),
                weighted=weight is not None or "class_mask" in options,
                stats=bool(options.get("return_stats")),
                loss_bytes="".join(hexbytes(value) for value in local),
                grad_diff=diff(sharded.grad.to_local(), expected_grad[:, mine]),
                grad_scale=scale(expected_grad), forward=forward, backward=backward,
            )
        )  # fmt: skip
    return results


UNEVEN_CASES = [  # name, the options: a DTensor vocabulary that does not divide by the mesh
    ("weight/mean", dict(smoothing=0.1, reduction="mean", weight=True)),
    ("others_but_pad, the pad in the smallest shard/sum",
     dict(smoothing=0.3, convention="others_but_pad", pad_index=-1, reduction="sum")),
    ("class_mask/z_loss/return_z_loss/return_stats",
     dict(smoothing=0.2, convention="others", reduction="none", class_mask=True, z_loss=0.05,
          return_z_loss=True, return_stats=True)),
    ("softcap/logit_scale/kl/mean", dict(smoothing=0.1, reduction="mean", softcap=2.0,
                                         logit_scale=0.8, kl=True)),
]  # fmt: skip


def dtensor_uneven_checks(counter, mesh, world, rank, tag):
    """A DTensor whose K does not divide by the mesh (K = world * 5 - 3: shards of 5, 5, 5 and 2
    classes on 4 ranks, of 4 and 3 on 2), as torch's Shard splits it (torch.chunk), with a
    label in the last class: against ``lstorch.smoothed_cross_entropy`` on the full logits."""
    from torch.distributed.tensor import Shard, distribute_tensor

    import lstorch

    results = []
    vocab = world * LOCAL_VOCAB - 3
    chunk = -(-vocab // world)
    mine = slice(rank * chunk, min((rank + 1) * chunk, vocab))
    for index, (name, options) in enumerate(UNEVEN_CASES):
        logits, labels, class_weight, cotangent, *_ = data(70 + index, world, torch.float64)
        logits, class_weight = logits[:, :vocab], class_weight[:vocab]
        labels = torch.where(labels >= vocab, labels - 3, labels)
        labels[1] = vocab - 1  # a label in the last rank's shard
        options = dict(options, ignore_index=IGNORE)
        weight = class_weight if options.pop("weight", False) else None
        if options.get("pad_index") == -1:
            options["pad_index"] = vocab - 1
            labels[2] = vocab - 2
        if options.get("class_mask"):
            labels = _with_class_mask(options, labels, vocab, [2, vocab - 2])
        expected, cot, expected_grad = _single_process(logits, labels, weight, options, cotangent)
        sharded = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_(True)
        out, forward = counter.measure(
            lambda sharded=sharded, labels=labels, weight=weight, options=options:
            lstorch.smoothed_cross_entropy(sharded, labels, weight=weight, **options)
        )  # fmt: skip
        out = out if isinstance(out, tuple) else (out,)
        stats = bool(options.get("return_stats"))
        flat_out = [*out[:-1], *out[-1]] if stats else list(out)
        flat_expected = [*expected[:-1], *expected[-1]] if stats else list(expected)
        local = [value.to_local() for value in flat_out]
        out[0].to_local().backward(cot)
        results.append(
            dict(
                check="dtensor uneven", group=tag, world=world, dtype="float64", case=name,
                rows=ROWS, local_classes=sharded.to_local().shape[-1],
                **_compared(local, flat_expected),
                weighted=weight is not None or "class_mask" in options, stats=stats,
                grad_diff=diff(sharded.grad.to_local(), expected_grad[:, mine]),
                grad_scale=scale(expected_grad), forward=forward,
            )
        )  # fmt: skip
    return results


def _compiled_grad(loss, x):
    torch._dynamo.reset()
    return torch.compile(torch.func.grad(loss), backend="eager")(x.clone())


def error_checks(mesh, world):
    """The messages of bad calls (every rank makes each, so no collective is left waiting)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import lstorch
    from lstorch.distributed import (
        vocab_parallel_fused_linear_smoothed_cross_entropy,
        vocab_parallel_smoothed_cross_entropy,
    )

    logits, labels, class_weight, _, hidden, weight, _ = data(0, world, torch.float32)
    local = logits[:, :LOCAL_VOCAB]
    sharded = distribute_tensor(logits, mesh, [Shard(-1)])
    uneven = LOCAL_VOCAB + (dist.get_rank() == 0)  # rank 0 holds one class more
    # Rank 0 holds one class fewer, and a label is the last class: on rank 0 alone it is out
    # of range of K = world * V_local, and so are pad_index and class_mask's (K,) shape.
    fewer, last = LOCAL_VOCAB - (dist.get_rank() == 0), world * LOCAL_VOCAB - 1
    top = torch.where(torch.arange(len(labels)) == 1, last, labels)
    calls = {
        "dense uneven shards": lambda: vocab_parallel_smoothed_cross_entropy(
            logits[:, :uneven], labels, ignore_index=IGNORE
        ),
        "fused uneven shards": lambda: vocab_parallel_fused_linear_smoothed_cross_entropy(
            hidden, weight[:uneven], labels, ignore_index=IGNORE
        ),
        "dense uneven shards, a label past the smaller": lambda: (
            vocab_parallel_smoothed_cross_entropy(logits[:, :fewer], top, ignore_index=IGNORE)
        ),
        "fused uneven shards, a label past the smaller": lambda: (
            vocab_parallel_fused_linear_smoothed_cross_entropy(
                hidden, weight[:fewer], top, ignore_index=IGNORE
            )
        ),
        "dense uneven shards, pad_index past the smaller": lambda: (
            vocab_parallel_smoothed_cross_entropy(
                logits[:, :fewer],
                labels,
                smoothing=0.1,
                convention="others_but_pad",
                pad_index=last,
            )
        ),
        "dense uneven shards, the full class_mask": lambda: vocab_parallel_smoothed_cross_entropy(
            logits[:, :fewer],
            labels,
            ignore_index=IGNORE,
            class_mask=torch.ones(world * LOCAL_VOCAB, dtype=torch.bool),
        ),
        "dense weight shape": lambda: vocab_parallel_smoothed_cross_entropy(
            local, labels, weight=class_weight, ignore_index=IGNORE
        ),
        "fused class_weight shape": lambda: vocab_parallel_fused_linear_smoothed_cross_entropy(
            hidden, weight[:LOCAL_VOCAB], labels, class_weight=class_weight, ignore_index=IGNORE
        ),
        "fused weight_shard shape": lambda: vocab_parallel_fused_linear_smoothed_cross_entropy(
            hidden, weight[:LOCAL_VOCAB, :2], labels, ignore_index=IGNORE
        ),
        "dense class_mask shape": lambda: vocab_parallel_smoothed_cross_entropy(
            local, labels, class_mask=torch.ones(LOCAL_VOCAB, dtype=torch.bool)
        ),
        "fused masked label": lambda: vocab_parallel_fused_linear_smoothed_cross_entropy(
            hidden,
            weight[:LOCAL_VOCAB],
            labels,
            class_mask=torch.arange(world * LOCAL_VOCAB) != 1,
            ignore_index=IGNORE,
        ),
        "dtensor inplace_backward": lambda: lstorch.smoothed_cross_entropy(
            sharded, labels, ignore_index=IGNORE, smoothing=0.1, inplace_backward=True
        ),
        "dense from_log_probs z_loss": lambda: vocab_parallel_smoothed_cross_entropy(
            local, labels, ignore_index=IGNORE, from_log_probs=True, z_loss=0.1
        ),
        "fused softcap": lambda: vocab_parallel_fused_linear_smoothed_cross_entropy(
            hidden, weight[:LOCAL_VOCAB], labels, ignore_index=IGNORE, softcap=0.0
        ),
        "dense return_stats": lambda: vocab_parallel_smoothed_cross_entropy(
            local, labels, ignore_index=IGNORE, return_stats="yes"
        ),
        # the full (K,) weight, checked on every rank before any rank takes its slice
        "dtensor weight of K + 2 classes": lambda: lstorch.smoothed_cross_entropy(
            sharded, labels, ignore_index=IGNORE,
            weight=distribute_tensor(torch.ones(world * LOCAL_VOCAB + 2), mesh, [Replicate()]),
        ),
        "dtensor weight of K - 1 classes, sharded": lambda: lstorch.smoothed_cross_entropy(
            sharded, labels, ignore_index=IGNORE,
            weight=distribute_tensor(torch.ones(world * LOCAL_VOCAB - 1), mesh, [Shard(0)]),
        ),
        "dense 0-d local_logits": lambda: vocab_parallel_smoothed_cross_entropy(
            torch.tensor(1.0), torch.tensor(0)
        ),
        "dense group 'tp'": lambda: vocab_parallel_smoothed_cross_entropy(
            local, labels, group="tp"
        ),
        # K = 5 over 4 ranks, split as torch's Shard splits it: 2, 2, 1 and 0 classes
        "dtensor a rank without a class": lambda: lstorch.smoothed_cross_entropy(
            distribute_tensor(logits[:, : world + 1], mesh, [Shard(-1)]), labels % (world + 1)
        ),
        "dtensor replicated logits": lambda: lstorch.smoothed_cross_entropy(
            distribute_tensor(logits, mesh, [Replicate()]), labels, ignore_index=IGNORE
        ),
        # torch.compile tracing torch.func.grad skips the Function's backward (pytorch#193279):
        # the dense loss's gradient lacked the other ranks' part, the fused one's was 0.
        "dense compiled func.grad": lambda: _compiled_grad(
            lambda x: vocab_parallel_smoothed_cross_entropy(
                x, labels, ignore_index=IGNORE, reduction="mean"),
            local,
        ),
        "fused compiled func.grad": lambda: _compiled_grad(
            lambda w: vocab_parallel_fused_linear_smoothed_cross_entropy(
                hidden, w, labels, ignore_index=IGNORE, reduction="mean"),
            weight[:LOCAL_VOCAB],
        ),
        "fused forward mode": lambda: torch.func.jvp(
            lambda h: vocab_parallel_fused_linear_smoothed_cross_entropy(
                h, weight[:LOCAL_VOCAB], labels, ignore_index=IGNORE),
            (hidden,), (torch.ones_like(hidden),),
        ),
    }  # fmt: skip
    results = []
    for name, call in calls.items():
        try:
            call()
            message = None
        except (ValueError, TypeError, NotImplementedError) as error:
            message = f"{type(error).__name__}: {error}"
        results.append(dict(check="errors", case=name, world=world, message=message))
    # Where the host reads no value (check_labels=False; on an accelerator, the default),
    # uneven shards give NaN rows.
    rows = vocab_parallel_smoothed_cross_entropy(
        logits[:, :uneven], labels, ignore_index=IGNORE, check_labels=False
    )
    counted = labels != IGNORE
    results.append(
        dict(check="uneven unread", case="dense", world=world, counted=int(counted.sum()),
             counted_nan=bool(rows[counted].isnan().all()), ignored_zero=bool(
                 (rows[~counted] == 0).all()))
    )  # fmt: skip
    return results


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    pair, _ = dist.new_subgroups(group_size=2)
    world_mesh = init_device_mesh("cpu", (world,))
    pair_mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("data", "vocab"))
    pair_mesh = pair_mesh["vocab"]
    started = time.perf_counter()
    # torch.compile (seconds of Dynamo and Inductor per case and rank): on the first pair only,
    # and before the counter wraps torch.distributed's functions: Dynamo would trace the
    # wrappers (a Python list they append to) instead of the collectives themselves.
    results = []
    if rank < 2:
        results += compiled_checks(None, pair, 2, rank, "pair0")
    counter = install_counter()
    for group, size, tag in ((None, world, "world"), (pair, 2, f"pair{rank // 2}")):
        pair_rank = dist.get_rank(group)
        for checks in (dense_checks, fused_checks, megatron_checks, higher_order_checks,
                       autocast_checks, option_checks, log_prob_checks,
                       transform_checks):  # fmt: skip
            results += checks(counter, group, size, pair_rank, tag)
    results += dtensor_checks(counter, world_mesh, world, rank, "world")
    results += dtensor_checks(counter, pair_mesh, 2, rank % 2, f"pair{rank // 2}")
    results += dtensor_option_checks(counter, world_mesh, world, rank, "world")
    results += dtensor_option_checks(counter, pair_mesh, 2, rank % 2, f"pair{rank // 2}")
    results += dtensor_uneven_checks(counter, world_mesh, world, rank, "world")
    results += dtensor_uneven_checks(counter, pair_mesh, 2, rank % 2, f"pair{rank // 2}")
    results += error_checks(world_mesh, world)
    print(f"rank {rank}: checks {time.perf_counter() - started:.1f} s", file=sys.stderr)
    pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    import torch.distributed.tensor  # noqa: F401  (imported once, before the ranks fork)

    import lstorch.compat.megatron
    import lstorch.distributed  # noqa: F401  (and torch._dynamo, which it imports)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        # fork: the ranks inherit the imported torch (spawn would import it 4 times over)
        mp.start_processes(worker, args=(WORLD, port, out_dir), nprocs=WORLD, start_method="fork")
        ranks = [
            json.loads(pathlib.Path(out_dir, f"rank{rank}.json").read_text())
            for rank in range(WORLD)
        ]
    print(json.dumps({"world": WORLD, "ranks": ranks}))


if __name__ == "__main__":
    sys.exit(main())
