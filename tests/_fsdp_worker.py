"""One rank of the FSDP2 test (tests/test_distributed.py launches it with torchrun --standalone).

fully_shard on every reversible layer (decoder layer) and on the root, gloo on CPU, float64.
Each case trains two steps on this rank's half of the batch and compares the full (all-gathered)
grads with one process running both halves in mode="plain". Rank 0 writes the results as JSON.
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import revengine as rev
from revengine.models import RevMoEConfig, RevMoEForCausalLM


def toy(mode):
    torch.manual_seed(0)

    def block():
        return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 8))

    stack = rev.Sequential(*[rev.AdditiveCoupling(block(), block()) for _ in range(4)], mode=mode)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), stack, torch.nn.Linear(16, 3)).double()


def toy_loss(model, rows):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    return model(x[rows]).square().mean()


def toy_loss_f32(model, rows):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g)
    return model(x[rows]).float().square().mean()


def revmoe(block_type):
    def build(mode):
        torch.manual_seed(0)
        cfg = RevMoEConfig.preset("tiny", block_type=block_type, reversible_mode=mode, fixed_point_tol=1e-12)
        return RevMoEForCausalLM(cfg).double()

    def loss(model, rows):
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, 128, (4, 12), generator=g)
        return model(ids[rows], labels=ids[rows]).loss

    return build, loss


def stack_of(model):
    return model[1] if isinstance(model, torch.nn.Sequential) else model.model.layers


def shard(model, mesh):
    for layer in stack_of(model).layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unsharded_layers(stack):
    return sum(not isinstance(next(layer.parameters()), DTensor) for layer in stack.layers)


def run_case(name, build, loss_fn, batch, rank, world, mesh, ref_mode="plain", micro=1, autocast=False,
             mode="reversible"):
    """micro > 1: gradient accumulation over `micro` backward passes per step, FSDP's gradient
    sync off for all but the last (set_requires_gradient_sync)."""
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)  # noqa: E731
    model = shard(build(mode), mesh)
    stack = stack_of(model)
    seen = []  # unsharded layers whenever a layer module is called during backward

    def count(module, args):
        if torch._C._current_graph_task_id() != -1:
            seen.append(unsharded_layers(stack))

    hooks = [layer.register_forward_pre_hook(count) for layer in stack.layers]
    for step in range(2):  # the second step reuses FSDP's state from the first
        model.zero_grad()
        for k in range(micro):
            model.set_requires_gradient_sync(k == micro - 1)
            torch.manual_seed(100 + 10 * k + rank)  # per-rank, per-microbatch dropout stream
            with amp():
                loss_fn(model, rows).backward()
    for h in hooks:
        h.remove()
    after = unsharded_layers(stack)
    grads = [p.grad.full_tensor() if p.grad is not None else None for p in model.parameters()]
    grad_types = sorted({type(p.grad).__name__ for p in model.parameters()})
    result = {}
    if rank == 0:
        ref = build(ref_mode)
        ref.zero_grad()
        for r in range(world):
            for k in range(micro):
                torch.manual_seed(100 + 10 * k + r)
                with amp():
                    (loss_fn(ref, slice(r * batch // world, (r + 1) * batch // world)) / world).backward()
        errors = []
        for (pname, p), g in zip(ref.named_parameters(), grads):
            if p.grad is None and g is None:
                continue
            if (p.grad is None) != (g is None):
                errors.append(float("inf"))
                continue
            errors.append(float((g - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-300)))
        result = dict(max_rel_err=max(errors), params=len(errors), grad_types=grad_types,
                      unsharded_in_backward=max(seen) if seen else -1, rerun_calls=len(seen),
                      unsharded_after=after, layers=len(stack.layers))
    return result


def sharded_stream_function_error(mesh):
    model = toy("reversible")
    fully_shard(model[1].layers[0].f, mesh=mesh)
    try:
        model(torch.randn(2, 5, dtype=torch.float64))
    except ValueError as e:
        return str(e)
    return "no error"


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = {"toy": run_case("toy", toy, toy_loss, 8, rank, world, mesh)}
    results["toy-checkpoint"] = run_case("toy", toy, toy_loss, 8, rank, world, mesh, mode="checkpoint")
    results["toy-accumulation"] = run_case("toy", toy, toy_loss, 8, rank, world, mesh, micro=2)
    # bf16 autocast on float32 streams against the single-process reversible run (same recompute)
    results["toy-bf16-autocast"] = run_case("toy", lambda mode: toy(mode).float(), toy_loss_f32, 8, rank, world, mesh,
                                            ref_mode="reversible", autocast=True)
    for bt in ("revffn", "additive", "leapfrog", "bdia"):  # bdia: each rank's signs are drawn from its seed
        build, loss = revmoe(bt)
        results[f"revmoe-{bt}"] = run_case(bt, build, loss, 4, rank, world, mesh)
    results["error"] = sharded_stream_function_error(mesh)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=1)
    dist.barrier()  # leave together (see the DDP worker in test_distributed.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
