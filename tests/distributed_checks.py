"""The torch.distributed checks of tests/test_distributed.py: ``python distributed_checks.py N``.

Spawns N gloo processes on CPU (MASTER_ADDR=127.0.0.1, a free port). Every rank holds its slice
of the same logits and computes ``vocab_parallel_smoothed_cross_entropy``, its gradient, its
Hessian-vector product (double backward) and its tangent (forward-mode dual numbers) for each
case, and the same of the dense ``lstorch.smoothed_cross_entropy`` of the full logits as
reference; rank files are collected and one JSON object is printed. The smoothing is a tensor
that requires grad, so each rank's ``d loss / d smoothing`` (that of the whole loss) is compared
with the dense one's too.
"""

import json
import os
import pathlib
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROWS, LOCAL_VOCAB = 11, 7
CASES = [
    ("uniform", None, "none", 0.1),
    ("others", None, "mean", 0.1),
    ("others_but_pad", 4, "sum", 0.3),
    ("uniform", None, "mean", 1.0),
    ("others", None, "mean", 0.2, dict(where=True, normalizer=11.0)),
    ("others_but_pad", 4, "none", 0.1, dict(where=True)),
]


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import lstorch
    from lstorch.distributed import vocab_parallel_smoothed_cross_entropy

    results = []
    for index, (convention, pad_index, reduction, smoothing, *more) in enumerate(CASES):
        generator = torch.Generator().manual_seed(index)  # the same data on every rank
        vocab = world * LOCAL_VOCAB
        logits = 3 * torch.randn(ROWS, vocab, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, vocab, (ROWS,), generator=generator)
        labels[torch.rand(ROWS, generator=generator) < 0.3] = -100
        cotangent = torch.rand(ROWS, generator=generator, dtype=torch.float64) + 0.5
        vector = torch.randn(ROWS, vocab, generator=generator, dtype=torch.float64)
        options = dict(
            convention=convention,
            pad_index=pad_index,
            ignore_index=-100,
            reduction=reduction,
            **(more[0] if more else {}),
        )
        if options.get("where") is True:  # a row mask, the same on every rank
            options["where"] = torch.rand(ROWS, generator=generator) < 0.7
        for dtype in (torch.float64, torch.float32):
            # The smoothing is a tensor that requires grad: d loss / d smoothing is compared too.
            dense_eps = torch.tensor(smoothing, dtype=dtype, requires_grad=True)
            full = logits.to(dtype).requires_grad_(True)
            dense = lstorch.smoothed_cross_entropy(full, labels, smoothing=dense_eps, **options)
            cot = cotangent.to(dense.dtype) if dense.ndim else torch.tensor(1.0, dtype=dense.dtype)
            dense_grad, dense_eps_grad = torch.autograd.grad(dense, (full, dense_eps), cot)
            local = full.detach()[:, rank * LOCAL_VOCAB : (rank + 1) * LOCAL_VOCAB].clone()
            local.requires_grad_(True)
            eps = torch.tensor(smoothing, dtype=dtype, requires_grad=True)
            loss = vocab_parallel_smoothed_cross_entropy(local, labels, smoothing=eps, **options)
            grad, eps_grad = torch.autograd.grad(loss, (local, eps), cot)
            mine = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
            expected_grad = dense_grad[:, mine]
            with_smoothing = dict(options, smoothing=smoothing)
            hvp, expected_hvp = _hessian_vector_products(
                full, local, labels, with_smoothing, cot, vector.to(dtype), mine
            )
            jvp, expected_jvp = _jacobian_vector_products(
                full, local, labels, with_smoothing, vector.to(dtype), mine
            )
            results.append(
                dict(
                    case=f"{convention}/{reduction}/{smoothing}/{str(dtype)[6:]}",
                    loss_bytes=loss.detach().numpy().tobytes().hex(),
                    loss_diff=float((loss - dense).detach().abs().max()),
                    loss_scale=float(dense.detach().abs().max()),
                    grad_diff=float((grad - expected_grad).abs().max()),
                    hvp_diff=float((hvp - expected_hvp).abs().max()),
                    hvp_scale=float(expected_hvp.abs().max()),
                    jvp_diff=float((jvp - expected_jvp).abs().max()),
                    jvp_scale=float(expected_jvp.abs().max()),
                    eps_grad_diff=float((eps_grad - dense_eps_grad).abs()),
                    eps_grad_scale=float(dense_eps_grad.abs()),
                )
            )
    pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _hessian_vector_products(full, local, labels, options, cot, vector, mine):
    """This rank's slice of ``H v`` by double backward (each rank pulls back its own slice of
    ``<grad, v>``; the all-reduce in the recomputed lse carries the other ranks' terms), and the
    slice of the dense ``H v``."""
    import lstorch
    from lstorch.distributed import vocab_parallel_smoothed_cross_entropy

    def hvp(loss_fn, x, v):
        (grad,) = torch.autograd.grad(loss_fn(x), x, cot, create_graph=True)
        (result,) = torch.autograd.grad((grad * v).sum(), x)
        return result

    ours = hvp(
        lambda x: vocab_parallel_smoothed_cross_entropy(x, labels, **options),
        local,
        vector[:, mine],
    )
    dense = hvp(lambda x: lstorch.smoothed_cross_entropy(x, labels, **options), full, vector)
    return ours, dense[:, mine]


def _jacobian_vector_products(full, local, labels, options, vector, mine):
    """The loss's tangent by dual numbers, each rank holding its slice of the tangent, and the
    dense loss's tangent along the whole vector."""
    import torch.autograd.forward_ad as fwAD

    import lstorch
    from lstorch.distributed import vocab_parallel_smoothed_cross_entropy

    with fwAD.dual_level():
        dual = fwAD.make_dual(local.detach(), vector[:, mine])
        ours = vocab_parallel_smoothed_cross_entropy(dual, labels, **options)
        ours = fwAD.unpack_dual(ours).tangent
        dual = fwAD.make_dual(full.detach(), vector)
        dense = fwAD.unpack_dual(lstorch.smoothed_cross_entropy(dual, labels, **options)).tangent
    return ours, dense


def main() -> None:
    import lstorch.distributed  # noqa: F401  (imported once, before the ranks fork)

    world = int(sys.argv[1])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        # fork: the ranks inherit the imported torch and lstorch (spawn would import them in
        # each rank again)
        mp.start_processes(worker, args=(world, port, out_dir), nprocs=world, start_method="fork")
        ranks = [
            json.loads(pathlib.Path(out_dir, f"rank{rank}.json").read_text())
            for rank in range(world)
        ]
    print(json.dumps({"world": world, "ranks": ranks}))


if __name__ == "__main__":
    main()
