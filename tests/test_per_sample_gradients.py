"""Per-sample gradients, as Opacus-style code computes them: ``torch.func.vmap`` of
``torch.func.grad`` over a batch of examples, each with its own labels and ``where`` mask, the
parameters given by ``torch.func.functional_call``. Every lstorch function that takes labels must
work there and give, per example, the gradient a loop of plain ``backward`` calls gives.

Under ``vmap`` a label's value cannot be read (no data-dependent control flow), so the label
range is not checked there: an out-of-range label makes that example's loss and gradient NaN,
as under ``torch.compile``, and leaves the other examples alone.
"""

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

import lstorch
import lstorch.compat
from parity_tests.paths import vmap_without_loops

K, FEATURES, TOKENS = 6, 4, 3
CLASS_WEIGHT = torch.linspace(0.5, 2.0, K, dtype=torch.float64)


def _head():
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, K, dtype=torch.float64)


# name -> loss(logits (TOKENS, K), labels (TOKENS,), where (TOKENS,) bool)
LOSSES = {
    "smoothed_cross_entropy": lambda x, y, m: lstorch.smoothed_cross_entropy(
        x, y, smoothing=0.1, convention="others", where=m, weight=CLASS_WEIGHT, reduction="sum"
    ),
    "smoothed_cross_entropy (others_but_pad, kl, ignore_index)": lambda x, y, m: (
        lstorch.smoothed_cross_entropy(
            x, y, smoothing=0.2, convention="others_but_pad", pad_index=0, kl=True,
            ignore_index=-100, where=m, reduction="mean",
        )
    ),
    "SmoothedCrossEntropyLoss": lambda x, y, m: lstorch.SmoothedCrossEntropyLoss(
        smoothing=0.1, weight=CLASS_WEIGHT
    )(x, y, m),
    "class_mask and z_loss": lambda x, y, m: lstorch.smoothed_cross_entropy(
        x, y, smoothing=0.1, class_mask=torch.arange(K) != 0, z_loss=1e-2, where=m,
        reduction="sum",
    ),
    "label_smoothing_loss": lambda x, y, m: lstorch.label_smoothing_loss(
        x, y, classes=K, smoothing=0.1
    ),
    "kl_label_smoothing_loss": lambda x, y, m: lstorch.kl_label_smoothing_loss(
        x.log_softmax(-1), y, label_smoothing=0.1, tgt_vocab_size=K, ignore_index=0
    ),
    "compat.fairseq": lambda x, y, m: lstorch.compat.fairseq.label_smoothed_nll_loss(
        x.log_softmax(-1), y, 0.1, ignore_index=1
    )[0],
    "compat.hf": lambda x, y, m: lstorch.compat.hf.label_smoother(x[None], y[None], epsilon=0.1),
    "compat.t5x": lambda x, y, m: lstorch.compat.t5x.compute_weighted_cross_entropy(
        x, y, label_smoothing=0.1, weights=m.to(x.dtype)
    )[0],
    "compat.timm": lambda x, y, m: lstorch.compat.timm.label_smoothing_cross_entropy(
        x, y, smoothing=0.1
    ),
}  # fmt: skip


# An example is a sequence of TOKENS rows, or one row: ``(K,)`` logits, a 0-d label and where,
# as ``F.cross_entropy`` takes them (indexing a class vector with a 0-d label under vmap must
# not read it on the host).
ROWS = {"tokens": (TOKENS,), "one row": ()}


def _batch(size=4, seed=0, rows=(TOKENS,)):
    rng = np.random.default_rng(seed)
    inputs = torch.as_tensor(rng.standard_normal((size, *rows, FEATURES)))
    labels = torch.as_tensor(rng.integers(1, K, (size, *rows)))
    where = torch.as_tensor(rng.random((size, *rows)) < 0.8)
    where.view(size, -1)[:, 0] = True  # every example has a row that counts (a view: in place)
    return inputs, labels, where


def _per_sample(loss, head, inputs, labels, where):
    params = {name: p.detach() for name, p in head.named_parameters()}

    def example_loss(params, x, y, m):
        return loss(functional_call(head, params, (x,)), y, m)

    return vmap(grad(example_loss), in_dims=(None, 0, 0, 0))(params, inputs, labels, where)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name", LOSSES)
def test_vmapped_per_sample_gradients_equal_a_loop_of_backward_calls(name, rows):
    loss, head = LOSSES[name], _head()
    inputs, labels, where = _batch(rows=ROWS[rows])
    # vmap runs every op by a batching rule: an op without one (in-place scatter_ did) falls
    # back to a loop over the examples, and the block raises
    with vmap_without_loops():
        batched = _per_sample(loss, head, inputs, labels, where)
    for index in range(len(inputs)):
        head.zero_grad()
        loss(head(inputs[index]), labels[index], where[index]).backward()
        for param_name, param in head.named_parameters():
            torch.testing.assert_close(
                batched[param_name][index], param.grad, rtol=1e-12, atol=1e-14
            )


def test_an_out_of_range_label_under_vmap_is_nan_for_its_example_only():
    head = _head()
    inputs, labels, where = _batch()
    labels[2, 1] = K + 3  # out of range; outside vmap this raises
    where[2, 1] = True
    loss = LOSSES["smoothed_cross_entropy"]
    with pytest.raises(ValueError, match="out-of-range values"):
        loss(head(inputs[2]), labels[2], where[2])
    batched = _per_sample(loss, head, inputs, labels, where)
    for param_name in batched:
        per_example = batched[param_name].reshape(len(inputs), -1)
        assert torch.isnan(per_example[2]).all(), param_name
        assert torch.isfinite(per_example[[0, 1, 3]]).all(), param_name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("rows", ROWS)
def test_fused_head_per_sample_gradients_equal_a_loop_of_backward_calls(rows, compiled):
    """The fused loss takes the head's parameters itself: per example, ``(..., FEATURES)``
    hidden states and the labels' shape, one row (a 0-d label) included. Also compiled whole,
    ``torch.compile(vmap(grad(loss)))``: Dynamo inlines the Function's forward there (its
    ``backward`` skipped, pytorch#193279), and the forward ran under ``no_grad``: the
    gradient was exactly 0."""
    head = _head()
    inputs, labels, where = _batch(rows=ROWS[rows])
    params = {name: p.detach() for name, p in head.named_parameters()}

    def loss(params, h, y, m):
        return lstorch.fused_linear_smoothed_cross_entropy(
            h, params["weight"], y, bias=params["bias"], smoothing=0.1, convention="others",
            class_weight=CLASS_WEIGHT, where=m, reduction="sum",
        )  # fmt: skip

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))
    if compiled:
        torch._dynamo.reset()
        per_sample = torch.compile(per_sample, backend="eager")
    batched = per_sample(params, inputs, labels, where)
    for index in range(len(inputs)):
        head.zero_grad()
        loss(dict(head.named_parameters()), inputs[index], labels[index], where[index]).backward()
        for param_name, param in head.named_parameters():
            torch.testing.assert_close(
                batched[param_name][index], param.grad, rtol=1e-12, atol=1e-14
            )


def test_vmap_without_loops_raises_on_an_op_that_vmap_runs_per_example():
    # the guard of the test above and of the registry's torch.func.vmap path: an in-place
    # scatter_ has no batching rule, so vmap loops over the examples and the block raises
    def loss(x):
        return x.clone().scatter_(0, torch.tensor([0]), 1.0).sum()

    with pytest.raises(RuntimeError, match=r"torch\.func\.vmap looped over the examples"):
        with vmap_without_loops():
            vmap(grad(loss))(torch.ones(3, 4))
    with vmap_without_loops():  # the out-of-place scatter has one
        vmap(grad(lambda x: x.scatter(0, torch.tensor([0]), 1.0).sum()))(torch.ones(3, 4))
