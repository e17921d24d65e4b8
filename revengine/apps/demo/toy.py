"""`revengine demo --toy`: trains a small reversible network on a synthetic task, then compares peak
memory and step time of plain / checkpoint / reversible (an engine check with no model weights).

    revengine demo --toy            # the full run
    revengine demo --toy --quick    # the same in a few seconds
"""
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Dict

import torch
from torch import nn

from revengine import AdditiveCoupling, Sequential
from revengine.memory import measure_in_subprocess, measure_step, time_alternating

DEMO_MODES = ("plain", "checkpoint", "reversible")  # the table's order: the baseline first


class DemoNet(nn.Module):
    """Input projection -> revengine.Sequential of additive couplings -> norm -> classification head."""

    def __init__(self, in_dim: int, width: int, depth: int, classes: int, mode: str = "reversible"):
        super().__init__()
        def mlp():
            return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

        self.proj = nn.Linear(in_dim, 2 * width)
        self.stack = Sequential(*[AdditiveCoupling(mlp(), mlp()) for _ in range(depth)], mode=mode)
        self.norm = nn.LayerNorm(2 * width)
        self.head = nn.Linear(2 * width, classes)
        # Small last layers in every branch: each coupling starts near the identity, which keeps a
        # deep additive stack well conditioned at step 0.
        for layer in self.stack.layers:
            for branch in (layer.f, layer.g):
                nn.init.normal_(branch[2].weight, std=0.02 / depth**0.5)
                nn.init.zeros_(branch[2].bias)

    def forward(self, x):
        return self.head(self.norm(self.stack(self.proj(x))))


def make_task(seed: int, in_dim: int = 32, classes: int = 8, n_train: int = 8192, n_test: int = 2048):
    """A synthetic classification task: labels are the argmax of a fixed random nonlinear teacher."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(in_dim, 64, generator=g) / in_dim**0.5
    w2 = torch.randn(64, classes, generator=g) / 8.0
    x = torch.randn(n_train + n_test, in_dim, generator=g)
    y = (torch.tanh(x @ w1 * 1.5) @ w2).argmax(dim=-1)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def build_demo(depth: int, width: int, seed: int, mode: str = "reversible", in_dim: int = 32, classes: int = 8):
    torch.manual_seed(seed)
    return DemoNet(in_dim, width, depth, classes, mode=mode)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(dim=-1) == y).float().mean().item()
    return loss, acc


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def measure_demo_step(depth: int, width: int, seed: int, mode: str, batch: int, device: str = "cpu") -> dict:
    """One training step of the demo model in `mode` (run in a fresh subprocess by `demo`)."""
    torch.manual_seed(seed)
    model = build_demo(depth, width, seed, mode=mode).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 32, generator=g).to(device)
    y = torch.randint(0, 8, (batch,), generator=g).to(device)
    _train_step(model, opt, x, y)  # warm-up: AdamW state, lazy allocations
    opt.zero_grad(set_to_none=True)  # the measured step allocates its grads, as after zero_grad()
    fig = measure_step(lambda: _train_step(model, opt, x, y).item(), device=device)
    return {"mode": mode, "figure": fig.as_dict()}


def time_modes(models: Dict[str, nn.Module], x, y, rounds: int, warmup: int = 2) -> Dict[str, float]:
    """Median training-step time per mode, in this process, alternating the modes."""
    opts = {m: torch.optim.AdamW(model.parameters(), lr=1e-4) for m, model in models.items()}
    steps = {m: (lambda m=m: _train_step(models[m], opts[m], x, y)) for m in models}
    times = time_alternating(steps, rounds, warmup=warmup, device=x.device)
    return {m: statistics.median(ts) for m, ts in times.items()}


def run_toy(args) -> int:
    child_env = None
    if args.quick and args.threads is None:
        args.threads = 1  # tiny tensors: thread hand-offs cost more than they save, worst on a busy machine
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        child_env = {"OMP_NUM_THREADS": str(args.threads)}
    if args.quick:
        args.steps = min(args.steps, 30)
        args.depth, args.width = min(args.depth, 3), min(args.width, 16)
        mem_batch, time_batch, rounds = 4096, 128, 3
    else:
        mem_batch, time_batch, rounds = args.mem_batch, 1024, 7
    torch.manual_seed(args.seed)
    (xtr, ytr), (xte, yte) = (tuple(t.to(args.device) for t in split) for split in make_task(args.seed))
    model = train_demo(args, xtr, ytr, xte, yte)
    print()
    compare_modes(args, model.state_dict(), xtr, ytr, mem_batch, time_batch, rounds, child_env)
    return 0


def train_demo(args, xtr, ytr, xte, yte) -> nn.Module:
    """Trains the reversible demo model on the task, printing its loss and accuracy before and after."""
    from tqdm import tqdm

    model = build_demo(args.depth, args.width, args.seed, mode="reversible").to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"revengine demo: Linear(32, {2 * args.width}) -> {args.depth} reversible additive couplings "
        f"(two streams of {args.width}, stream MLPs {args.width}-{2 * args.width}-{args.width}) -> LayerNorm -> "
        f"Linear({2 * args.width}, 8); {n_params:,} parameters; synthetic 8-class task "
        f"(seed {args.seed}, {len(xtr)} train / {len(xte)} held-out examples) on {args.device}"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(args.steps, 1), pct_start=0.1)
    loss0, acc0 = evaluate(model, xtr, ytr)
    print(f"before training: train loss {loss0:.4f}, accuracy {acc0:.3f}")
    g = torch.Generator().manual_seed(args.seed + 2)
    bar = tqdm(range(args.steps), desc="training (reversible)", dynamic_ncols=True, mininterval=0.5)
    for _ in bar:
        idx = torch.randint(0, len(xtr), (args.batch,), generator=g).to(args.device)
        loss = _train_step(model, opt, xtr[idx], ytr[idx])
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    loss1, acc1 = evaluate(model, xtr, ytr)
    tloss, tacc = evaluate(model, xte, yte)
    print(f"after {args.steps} steps: train loss {loss1:.4f}, accuracy {acc1:.3f}")
    print(f"held-out: loss {tloss:.4f}, accuracy {tacc:.3f} (chance {1 / 8:.3f})")
    return model


def compare_modes(args, state, xtr, ytr, mem_batch: int, time_batch: int, rounds: int, child_env) -> None:
    """The table: peak memory (fresh subprocesses) and step time (this process) of the trained weights
    `state` in each of DEMO_MODES."""
    allocator = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    allocator = "default malloc" if allocator is None else f"MALLOC_MMAP_THRESHOLD_={allocator}"
    print("one training step (forward + backward + AdamW) of this model in each mode:")
    where = ("peak allocated GPU memory" if args.device.startswith("cuda")
             else "peak RSS, MALLOC_MMAP_THRESHOLD_=65536")
    print(f"  peak MB: peak-memory delta, batch {mem_batch}, each from a fresh subprocess ({where})")
    print(
        f"  step ms: batch {time_batch}, this process, modes alternating, median of {rounds} steps; "
        f"{torch.get_num_threads()} threads, allocator: {allocator}"
    )

    def measure(m):
        return measure_in_subprocess(
            "revengine.apps.demo.toy:measure_demo_step",
            dict(depth=args.depth, width=args.width, seed=args.seed, mode=m, batch=mem_batch, device=args.device),
            env=child_env, timeout=300,
        )

    # The three processes run side by side: each reads its own peak, so they don't disturb each other's figure.
    with ThreadPoolExecutor(max_workers=len(DEMO_MODES)) as pool:
        mem = {m: out["figure"]["peak_delta_mb"] for m, out in zip(DEMO_MODES, pool.map(measure, DEMO_MODES))}
    models = {}
    for m in DEMO_MODES:
        models[m] = build_demo(args.depth, args.width, args.seed, mode=m).to(args.device)
        models[m].load_state_dict(state)
    tb = torch.Generator().manual_seed(args.seed + 3)
    idx = torch.randint(0, len(xtr), (time_batch,), generator=tb).to(args.device)
    med = time_modes(models, xtr[idx], ytr[idx], rounds)

    hdr = f"{'mode':<11} | {'peak MB':>8} | {'vs plain':>8} | {'step ms':>8} | {'vs plain':>8}"
    print(hdr)
    print("-" * len(hdr))
    for m in DEMO_MODES:
        mr = f"{mem[m] / mem['plain']:.2f}x" if mem["plain"] > 0 else "n/a"
        print(f"{m:<11} | {mem[m]:>8.1f} | {mr:>8} | {med[m] * 1e3:>8.2f} | {med[m] / med['plain']:>7.2f}x")
