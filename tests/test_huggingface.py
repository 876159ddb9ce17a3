"""lstorch.integrations.huggingface in a transformers Trainer.

Oracles: the Trainer's own ``label_smoothing_factor`` path (``LabelSmoother``, step by step),
the Trainer without gradient accumulation (for the accumulated update), and the dense loss on
the materialised logits (for the fused one). The model is a tiny GPT-2 built from a config with
random weights: nothing is downloaded.
"""

import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: never the network
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
# transformers' classes are read from the module where they are used (transformers.Trainer,
# ...): importing the Trainer and GPT-2 costs seconds, which each pytest worker would pay when
# it collects this file, whichever worker runs these tests.

from lstorch.integrations.huggingface import (  # noqa: E402
    compute_loss_func,
    fused_causal_lm_loss,
)
from tests.check_scripts import ROOT  # noqa: E402

VOCAB, TIME = 64, 12


def tiny_gpt2(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).to(dtype)


def token_rows(rows=8, seed=0):
    """Rows of ids with labels = ids, a different number of leading tokens ignored in each (a
    prompt mask), so that micro-batches count different numbers of tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, TIME), generator=generator)
    labels = ids.clone()
    for row in range(rows):
        labels[row, : (3 * row) % (TIME - 1)] = -100
    return [{"input_ids": ids[row], "labels": labels[row]} for row in range(rows)]


def trainer_for(
    tmp_path, model, *, batch, accumulation=1, steps, smoothing=0.0, trainer=None, **kwargs
):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        # Plain SGD with no clipping, decay or schedule: the update is the gradient itself, so a
        # wrong scale of the loss shows (Adam would normalise it away).
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        label_smoothing_factor=smoothing,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = trainer or transformers.Trainer
    return trainer(model=model, args=args, train_dataset=token_rows(), **kwargs)


class Recorded:
    """A loss function that records each call's loss and ``num_items_in_batch``."""

    def __init__(self, loss_fn):
        self.loss_fn, self.calls = loss_fn, []

    def __call__(self, outputs, labels, *args, num_items_in_batch=None, **kwargs):
        loss = self.loss_fn(outputs, labels, *args, num_items_in_batch=num_items_in_batch, **kwargs)
        self.calls.append(
            (loss.item(), None if num_items_in_batch is None else int(num_items_in_batch))
        )
        return loss


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_parameters(got, expected, rtol, atol):
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


def test_equals_the_trainers_label_smoother_at_every_step(tmp_path):
    ours = Recorded(compute_loss_func(smoothing=0.1))
    model = tiny_gpt2()
    trainer_for(tmp_path / "ours", model, batch=2, steps=3, compute_loss_func=ours).train()

    hf_model = tiny_gpt2()
    hf = trainer_for(tmp_path / "hf", hf_model, batch=2, steps=3, smoothing=0.1)
    # The Trainer calls its LabelSmoother with shift_labels=True for a causal LM.
    hf.label_smoother = Recorded(hf.label_smoother)
    hf.train()

    assert len(ours.calls) == len(hf.label_smoother.calls) == 3
    for step, ((loss, count), (hf_loss, hf_count)) in enumerate(
        zip(ours.calls, hf.label_smoother.calls, strict=True)
    ):
        assert count == hf_count, step  # the same token count reached both
        assert loss == pytest.approx(hf_loss, rel=1e-5), step
    assert_same_parameters(parameters(model), parameters(hf_model), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_gives_the_unaccumulated_update(tmp_path):
    options = dict(smoothing=0.1, convention="others", z_loss=1e-3)
    whole = tiny_gpt2()
    trainer_for(
        tmp_path / "whole", whole, batch=4, steps=2, compute_loss_func=compute_loss_func(**options)
    ).train()
    accumulated = tiny_gpt2()
    recorded = Recorded(compute_loss_func(**options))
    trainer_for(
        tmp_path / "accumulated",
        accumulated,
        batch=2,
        accumulation=2,
        steps=2,
        compute_loss_func=recorded,
    ).train()
    # Each micro-batch was divided by its whole batch's token count, which differs from its own.
    assert len(recorded.calls) == 4
    assert recorded.calls[0][1] == recorded.calls[1][1]
    assert_same_parameters(parameters(accumulated), parameters(whole), rtol=1e-5, atol=1e-6)

    # The check can fail: a loss that means over each micro-batch instead gives another update.
    def per_micro_batch(outputs, labels, num_items_in_batch=None):
        return compute_loss_func(**options)(outputs, labels, None)

    naive = tiny_gpt2()
    trainer_for(
        tmp_path / "naive",
        naive,
        batch=2,
        accumulation=2,
        steps=2,
        compute_loss_func=per_micro_batch,
    ).train()
    with pytest.raises(AssertionError):
        assert_same_parameters(parameters(naive), parameters(whole), rtol=1e-3, atol=1e-4)


def _batch(rows=3):
    data = token_rows(rows, seed=1)
    ids = torch.stack([row["input_ids"] for row in data])
    labels = torch.stack([row["labels"] for row in data])
    attention_mask = torch.ones_like(ids)
    attention_mask[0, -3:] = 0  # right padding on one row, its labels ignored too
    labels[0, -3:] = -100
    return ids, labels, attention_mask


@pytest.mark.parametrize(
    ("options", "num_items_in_batch"),
    [
        (dict(smoothing=0.1), None),
        (dict(smoothing=0.2, convention="others", chunk_size=24), 40),
        (dict(smoothing=0.3, convention="others_but_pad", pad_index=5), torch.tensor(17)),
        (dict(smoothing=0.1, kl=True, z_loss=1e-3, chunk_size=24), 40),
    ],
)
def test_fused_equals_the_dense_loss(options, num_items_in_batch):
    ids, labels, attention_mask = _batch()
    dense_model, fused_model = tiny_gpt2(dtype=torch.float64), tiny_gpt2(dtype=torch.float64)
    dense_options = {k: v for k, v in options.items() if k != "chunk_size"}
    dense = compute_loss_func(**dense_options)(
        dense_model(ids, attention_mask=attention_mask), labels, num_items_in_batch
    )
    fused = fused_causal_lm_loss(
        fused_model,
        ids,
        labels,
        attention_mask=attention_mask,
        num_items_in_batch=num_items_in_batch,
        **options,
    )
    dense.backward()
    fused.backward()
    torch.testing.assert_close(fused, dense, rtol=1e-12, atol=0)
    dense_grads = {n: p.grad for n, p in dense_model.named_parameters()}
    fused_grads = {n: p.grad for n, p in fused_model.named_parameters()}
    assert_same_parameters(fused_grads, dense_grads, rtol=1e-10, atol=1e-13)


def test_the_fused_trainer_accumulates_as_the_dense_one(tmp_path, monkeypatch):
    """examples/hf_trainer.py's Trainer (docs/language_models.md's): the fused loss in
    training; with micro-batches of 2 accumulated twice, the update of the dense Trainer's
    batches of 4."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import hf_trainer

    dense = tiny_gpt2()
    trainer_for(
        tmp_path / "dense",
        dense,
        batch=4,
        steps=2,
        compute_loss_func=compute_loss_func(smoothing=0.1),
    ).train()
    fused = tiny_gpt2()
    trainer_for(
        tmp_path / "fused",
        fused,
        batch=2,
        accumulation=2,
        steps=2,
        trainer=hf_trainer.FusedLossTrainer,
        loss_options={"smoothing": 0.1},
        compute_loss_func=compute_loss_func(smoothing=0.1),
    ).train()
    assert_same_parameters(parameters(fused), parameters(dense), rtol=1e-5, atol=1e-6)


def test_options_the_trainer_fixes_and_unknown_ones_raise():
    with pytest.raises(TypeError, match=r"compute_loss_func: `reduction` is set here"):
        compute_loss_func(reduction="sum")
    with pytest.raises(TypeError, match=r"compute_loss_func: `normalizer` is set here"):
        compute_loss_func(normalizer=10)
    # a tuple would reach the Trainer, which takes one loss tensor
    with pytest.raises(TypeError, match=r"compute_loss_func: `return_stats` is set here"):
        compute_loss_func(return_stats=True)
    with pytest.raises(TypeError, match=r"fused_causal_lm_loss: `return_stats` is set here"):
        fused_causal_lm_loss(tiny_gpt2(), torch.zeros(1, 2, dtype=torch.long),
                             torch.zeros(1, 2, dtype=torch.long), return_stats=True)  # fmt: skip
    with pytest.raises(TypeError, match=r"compute_loss_func: got an unexpected keyword .*'eps'"):
        compute_loss_func(eps=0.1)
    with pytest.raises(ValueError, match=r"compute_loss_func: `smoothing` must be in \[0, 1\]"):
        compute_loss_func(smoothing=1.5)
    with pytest.raises(ValueError, match=r"compute_loss_func: `z_loss`"):
        compute_loss_func(z_loss=-1.0)
    logits, labels = torch.zeros(2, 4, VOCAB), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"compute_loss_func: `num_items_in_batch` must be"):
        compute_loss_func()({"logits": logits}, labels, -1)
    with pytest.raises(ValueError, match=r"compute_loss_func: the Trainer passed labels=None"):
        compute_loss_func()({"logits": logits}, None, None)
    with pytest.raises(TypeError, match=r"fused_causal_lm_loss: got an unexpected .*'eps'"):
        fused_causal_lm_loss(tiny_gpt2(), labels, labels, eps=0.1)


def test_a_count_of_zero_gives_nan_and_a_zero_gradient_as_transformers_loss():
    """A batch whose every label is -100 (all padding): the Trainer passes
    ``num_items_in_batch=0``. Oracle: transformers' own causal-LM loss, ``sum / 0``: NaN, with a
    zero gradient (the Trainer then leaves the loss out of its logs and eval_loss)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, VOCAB, generator=generator, dtype=torch.float64)
    labels = torch.full((2, 5), -100)
    leaf = logits.clone().requires_grad_()
    expected = ForCausalLMLoss(leaf, labels, VOCAB, num_items_in_batch=torch.tensor(0))
    expected.backward()
    assert expected.isnan() and (leaf.grad == 0).all()  # the oracle's behaviour
    counts = (0, torch.tensor(0), torch.tensor(0.0), torch.zeros(2, 1))  # (n_gpu, 1): DataParallel
    for smoothing in (0.0, 0.1):
        for count in counts:
            leaf = logits.clone().requires_grad_()
            loss = compute_loss_func(smoothing=smoothing)({"logits": leaf}, labels, count)
            loss.backward()
            assert loss.isnan() and (leaf.grad == 0).all(), (smoothing, count)
    model, ids = tiny_gpt2(), torch.zeros(2, 5, dtype=torch.long)
    loss = fused_causal_lm_loss(model, ids, labels, num_items_in_batch=0, smoothing=0.1)
    loss.backward()
    assert loss.isnan()
    assert all((p.grad == 0).all() for p in model.parameters() if p.grad is not None)


def test_evaluate_leaves_out_an_all_padding_batch_as_the_trainer_does(tmp_path):
    """Trainer.evaluate() with a batch of only -100 labels: the Trainer's own label smoothing
    gives NaN there and drops it from eval_loss; so does ours (it raised before)."""
    rows = token_rows(4)
    for row in rows[2:]:
        row["labels"] = torch.full_like(row["labels"], -100)
    losses = []
    for kwargs in ({"smoothing": 0.1}, {"compute_loss_func": compute_loss_func(smoothing=0.1)}):
        trainer = trainer_for(tmp_path / str(len(losses)), tiny_gpt2(), batch=2, steps=1,
                              **kwargs)  # fmt: skip
        trainer.args.per_device_eval_batch_size = 2
        losses.append(trainer.evaluate(rows)["eval_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[0] == losses[0]


def test_a_count_per_device_as_data_parallel_passes_it():
    """With several GPUs in one process the Trainer passes the count once per device,
    ``(n_gpu, 1)``, and averages the loss it gets back. Oracle: what transformers' causal-LM
    loss computes (``ForCausalLMLoss``: torch's summed cross-entropy of the shifted tokens over
    the count; in float64 here, where it would cast the logits to float32), then the Trainer's
    average."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, VOCAB, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (2, 6), generator=generator)
    labels[0, :2] = -100
    count = torch.tensor(7.0).unsqueeze(0).expand(2, -1)  # the Trainer's DataParallel count
    total = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum"
    )
    expected = (total / count.double()).mean()
    got = compute_loss_func()({"logits": logits}, labels, count)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"compute_loss_func: `num_items_in_batch` must be the "
                       r"same count on every device; got \[7.0, 6.0\]"):  # fmt: skip
        compute_loss_func()({"logits": logits}, labels, torch.tensor([[7.0], [6.0]]))


def test_bad_calls_name_the_function_and_the_argument():
    logits, labels = torch.zeros(2, 4, VOCAB), torch.zeros(2, 4, dtype=torch.long)
    loss_fn = compute_loss_func()
    # a sequence classifier's (batch,) labels: the shift would run along the batch
    message = (
        r"compute_loss_func: `shift_labels=True` shifts `labels` along their last axis, time, "
        r"but `labels` has shape \(2,\)"
    )
    with pytest.raises(ValueError, match=message):
        loss_fn({"logits": torch.zeros(2, 3)}, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"fused_causal_lm_loss: `shift_labels=True` shifts"):
        fused_causal_lm_loss(tiny_gpt2(), labels, labels[:, 0])
    # a truth test would read "False" as True
    with pytest.raises(TypeError, match=r"compute_loss_func: `shift_labels` must be True or "
                       r"False; got 'False' \(str\)"):  # fmt: skip
        compute_loss_func(shift_labels="False")
    with pytest.raises(TypeError, match=r"fused_causal_lm_loss: `shift_labels` must be True"):
        fused_causal_lm_loss(tiny_gpt2(), labels, labels, shift_labels=1)
    with pytest.raises(TypeError, match=r"compute_loss_func: `labels` must be a torch.Tensor; "
                       r"got list"):  # fmt: skip
        loss_fn({"logits": logits}, labels.tolist())
    with pytest.raises(TypeError, match=r"fused_causal_lm_loss: `input_ids` must be a torch"):
        fused_causal_lm_loss(tiny_gpt2(), labels.tolist(), labels)
    with pytest.raises(TypeError, match=r"fused_causal_lm_loss: `attention_mask` must be a"):
        fused_causal_lm_loss(tiny_gpt2(), labels, labels, attention_mask="x")
    # the shapes as given (not after the shift, nor the model's hidden states'), token ids ints
    with pytest.raises(ValueError, match=r"fused_causal_lm_loss: `labels` must have the "
                       r"input_ids' shape \(2, 4\); got shape \(2, 3\)\.$"):  # fmt: skip
        fused_causal_lm_loss(tiny_gpt2(), labels, labels[:, 1:])
    with pytest.raises(
        TypeError,
        match=r"fused_causal_lm_loss: `input_ids` must have an "
        r"integer dtype \(an int torch.Tensor\); got dtype torch.float32",
    ):
        fused_causal_lm_loss(tiny_gpt2(), labels.float(), labels)
    # tensor options are checked when the loss is built, before training starts
    with pytest.raises(TypeError, match=r"compute_loss_func: `weight` must be a tensor or a "
                       r"list of numbers; got 'w'"):  # fmt: skip
        compute_loss_func(weight="w")
    with pytest.raises(TypeError, match=r"compute_loss_func: `class_mask` must be a tensor"):
        compute_loss_func(class_mask="m")
    with pytest.raises(TypeError, match=r"compute_loss_func: `class_mask` must have dtype bool"):
        compute_loss_func(class_mask=[1] * VOCAB)
    with pytest.raises(ValueError, match=r"compute_loss_func: `class_mask` allows 0 class"):
        compute_loss_func(class_mask=[False] * VOCAB)
    with pytest.raises(ValueError, match=r"compute_loss_func: `weight` must have one dimension"):
        compute_loss_func(weight=[[1.0]] * VOCAB)
    for count in (-3, torch.tensor(-3), float("nan")):  # the value given, not a conversion
        message = (
            r"compute_loss_func: `num_items_in_batch` must be a count of tokens, a finite "
            rf"number >= 0; got {re.escape(repr(count))}\.$"
        )
        with pytest.raises(ValueError, match=message):
            loss_fn({"logits": logits}, labels, count)
    with pytest.raises(ValueError, match=r"fused_causal_lm_loss: `num_items_in_batch` must be a "
                       r"count of tokens, a finite number >= 0; got -1\.$"):  # fmt: skip
        fused_causal_lm_loss(tiny_gpt2(), labels, labels, num_items_in_batch=-1)


def test_the_fused_loss_refuses_what_it_would_get_wrong():
    ids = torch.zeros(2, 4, dtype=torch.long)
    model = tiny_gpt2()
    model.config.final_logit_softcapping = 30.0  # Gemma 2's transform of the logits
    with pytest.raises(ValueError, match=r"fused_causal_lm_loss: .*final_logit_softcapping=30.0"):
        fused_causal_lm_loss(model, ids, ids)
    wrapped = torch.nn.Sequential(tiny_gpt2())  # a wrapper without get_output_embeddings
    with pytest.raises(TypeError, match=r"fused_causal_lm_loss: `model` must be a causal LM"):
        fused_causal_lm_loss(wrapped, ids, ids)


def test_outputs_are_read_as_a_mapping_an_attribute_a_tuple_or_the_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, VOCAB, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (2, 5), generator=generator)
    loss_fn = compute_loss_func(smoothing=0.1)
    # Oracle: torch's own loss on the shifted positions.
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), label_smoothing=0.1
    )

    class WithLogits:
        pass

    holder = WithLogits()
    holder.logits = logits
    for outputs in ({"logits": logits}, holder, (logits,), logits):
        torch.testing.assert_close(loss_fn(outputs, labels, None), expected, rtol=1e-12, atol=0)


def test_options_reach_the_loss():
    # Oracle: torch's weighted, label-smoothed cross-entropy on the shifted positions; and the
    # z-loss term of the counted tokens, z * mean(logsumexp**2), from torch's logsumexp.
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, VOCAB, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (2, 6), generator=generator)
    labels[1, :3] = -100
    weight = torch.rand(VOCAB, generator=generator, dtype=torch.float64) + 0.5
    shifted_logits, shifted_labels = logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(
        shifted_logits, shifted_labels, weight=weight, label_smoothing=0.2
    )
    got = compute_loss_func(smoothing=0.2, weight=weight)({"logits": logits}, labels)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)

    counted = shifted_labels != -100
    lse = torch.logsumexp(shifted_logits[counted], dim=-1)
    plain = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, reduction="sum")
    expected = (plain + 1e-2 * (lse**2).sum()) / 7  # 7: the whole batch's token count
    got = compute_loss_func(z_loss=1e-2)({"logits": logits}, labels, torch.tensor(7))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
