"""What a run writes to --out: checkpoints (atomic directories), log.jsonl and the finished model."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch

from revengine.optim import load_state_dict_file, save_state_dict

from .args import FinetuneArgs, FinetuneError
from .model import device_of

STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "complete.json"  # a checkpoint's checksums, written last
# every file is safetensors or JSON: a checkpoint is read without unpickling anything
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", STATE_FILE)
# a run whose layer store holds the weights and the optimizer state (--offload disk, streamed)
STORE_CHECKPOINT_FILES = ("rng.safetensors", STATE_FILE)
# the layout of earlier versions (torch.save files, read with weights_only=True)
LEGACY_CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", STATE_FILE)


def atomic_dir(final: str):
    """A temporary sibling directory that replaces `final` on success (and vanishes on failure)."""
    parent = os.path.dirname(os.path.abspath(final))
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide checkpoints from the rest of a team

    @contextlib.contextmanager
    def ctx():
        try:
            yield tmp
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return ctx()


# Files of a model folder that decide what the run trains (its weights follow from config.json's shapes;
# hashing them would read gigabytes on every resume).
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "vocab.json", "merges.txt", "added_tokens.json", "revengine_tokenizer.json")


def sha256_file(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_inputs(args: FinetuneArgs) -> Dict[str, Any]:
    """What a run trains on, by content: sha256 of --data, --eval-data and the model folder's config and
    tokenizer files. A --resume must find the same (however the paths are spelled now)."""
    model = {n: sha256_file(os.path.join(args.model, n)) for n in MODEL_FILES
             if os.path.isfile(os.path.join(args.model, n))}
    return {"data": sha256_file(args.data), "eval_data": sha256_file(args.eval_data) if args.eval_data else None,
            "model": model}


def check_resume(args: FinetuneArgs, state: Dict[str, Any], inputs: Dict[str, Any], ckpt: str) -> None:
    """Refuses a --resume whose settings or inputs differ from the checkpoint's (--steps may only grow)."""
    if "inputs" not in state:
        raise FinetuneError(f"--resume: {ckpt} records no content hashes of its data and model (a checkpoint of an "
                            "older revengine), so it cannot be checked; start a new run in another --out")
    was = state["args"]
    diff = {k: (was.get(k), v) for k, v in args.identity().items() if k != "steps" and was.get(k) != v}
    if diff:
        raise FinetuneError(f"--resume: these settings differ from the checkpoint's (was, now): {diff}")
    if args.steps < was.get("steps", 0):
        raise FinetuneError(f"--resume: --steps {args.steps} is below the checkpoint's {was['steps']}; "
                            "a resume may only raise it (extend the run)")
    old = state["inputs"]
    for flag in ("data", "eval_data"):
        if old.get(flag) != inputs[flag]:
            raise FinetuneError(f"--resume: the content of --{flag.replace('_', '-')} differs from the checkpoint's "
                                f"(sha256 {str(old.get(flag))[:12]} then, {str(inputs[flag])[:12]} now)")
    files = sorted(n for n in set(old.get("model", {})) | set(inputs["model"])
                   if old.get("model", {}).get(n) != inputs["model"].get(n))
    if files:
        raise FinetuneError(f"--resume: the model folder's {', '.join(files)} differ(s) from the checkpoint's")


def checkpoint_dirs(out: str) -> List[str]:
    """The checkpoints in --out, oldest first (each renamed into place complete; checkpoint_problem says
    whether it still is)."""
    return sorted(d for d in glob.glob(os.path.join(out, "checkpoints", "step-*")) if os.path.isdir(d))


def checkpoint_problem(path: str) -> Optional[str]:
    """None when every file of the checkpoint matches the checksum saved beside it, else what is wrong."""
    try:
        with open(os.path.join(path, COMPLETE_FILE)) as fh:
            sums = json.load(fh)["sha256"]
    except FileNotFoundError:
        return f"{COMPLETE_FILE} is missing (a checkpoint of an older revengine, or a damaged one)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{COMPLETE_FILE} is unreadable"
    files = (LEGACY_CHECKPOINT_FILES if "optimizer.pt" in sums else
             STORE_CHECKPOINT_FILES if "model.safetensors" not in sums else CHECKPOINT_FILES)
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
        if sums.get(name) != sha256_file(os.path.join(path, name)):
            return f"{name} does not match its checksum (truncated or changed)"
    return None


def newest_intact_checkpoint(out: str) -> str:
    """The newest checkpoint that passes checkpoint_problem; each newer one is reported on stderr."""
    ckpts = checkpoint_dirs(out) if os.path.isdir(out) else []
    if not ckpts:
        raise FinetuneError(f"--resume: no checkpoint in {out}/checkpoints")
    problems = []
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        problems.append(f"{os.path.basename(ckpt)}: {problem}")
        print(f"revengine finetune: checkpoint {ckpt} is damaged: {problem}; trying the one before",
              file=sys.stderr, flush=True)
    raise FinetuneError(f"--resume: no intact checkpoint in {out}/checkpoints ({'; '.join(problems)})")


def set_aside_newer(out: str, ckpt: str) -> None:
    """Damaged checkpoints newer than the one resumed from go to checkpoints/damaged-step-N (kept for a
    look, out of the way of the steps this run saves again and of --keep-checkpoints)."""
    for d in checkpoint_dirs(out):
        if os.path.basename(d) > os.path.basename(ckpt):
            aside = os.path.join(os.path.dirname(d), "damaged-" + os.path.basename(d))
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(d, aside)


def prepare_out(args: FinetuneArgs) -> Optional[str]:
    """Checks --out against --resume; returns the checkpoint to resume from (or None)."""
    out = args.out
    if os.path.isfile(out):
        raise FinetuneError(f"--out {out} is a file")
    if args.resume:
        return newest_intact_checkpoint(out)
    if os.path.isdir(out) and os.listdir(out) and not only_unfinished_leftovers(out):
        what = "a finished model" if os.path.isfile(os.path.join(out, "config.json")) else "files"
        raise FinetuneError(f"--out {out} already holds {what}; choose an empty directory "
                            "(or pass --resume to continue its checkpoints)")
    return None


def _is_run_log(path: str) -> bool:
    """Whether `path` reads as a log.jsonl a run writes: empty, or JSON objects with a "step", one a line
    (text after the last newline, a line cut short by a kill, is not checked)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError):
        return False
    lines = text.split("\n")[:-1]
    if text and not lines:
        return False
    try:
        return all(isinstance(r := json.loads(line), dict) and "step" in r for line in lines)
    except json.JSONDecodeError:
        return False


def only_unfinished_leftovers(out: str) -> bool:
    """True when --out holds only what a run writes before its first checkpoint: its log.jsonl, a
    checkpoints/ folder with nothing but the .tmp-* folders of a save that never finished, and a streamed
    run's offload/ store (--offload disk). Such a run
    left nothing to resume, so a new run may start over there (its log is replaced)."""
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name == "log.jsonl" and os.path.isfile(path) and _is_run_log(path):
            continue
        if name == "checkpoints" and os.path.isdir(path) and all(n.startswith(".tmp-") for n in os.listdir(path)):
            continue
        if name == "offload" and os.path.isdir(path) and all(_is_store_file(n) for n in os.listdir(path)):
            continue  # a streamed run's layer store, written before its first checkpoint: built again
        return False
    return True


def _is_store_file(name: str) -> bool:
    """A name a layer store (revengine.offload) writes: store.json, layer files, their temporaries."""
    return name == "store.json" or name.endswith(".safetensors") or ".tmp-" in name


def save_checkpoint(out: str, step: int, student, optimizer, state: Dict[str, Any], keep: int) -> str:
    """checkpoints/step-NNNNNN: weights, optimizer state, RNG state and `state`; keeps the newest `keep`.
    student and optimizer None: RNG and `state` only (a layer store holds the rest, at state["store_step"])."""
    from safetensors.torch import save_file, save_model

    final = os.path.join(out, "checkpoints", f"step-{step:06d}")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with atomic_dir(final) as tmp:
        if student is not None:
            save_model(student, os.path.join(tmp, "model.safetensors"))
            # torchao's quantized state tensors are stored as their codes, scales and lookup tables
            save_state_dict(optimizer.state_dict(), os.path.join(tmp, "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        dev = device_of(student) if student is not None else torch.device("cpu")
        if dev.type == "cuda":  # dropout, bdia's signs and stochastic rounding draw from the GPU's generator
            rng["cuda"] = torch.cuda.get_rng_state(dev)
        save_file(rng, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, STATE_FILE), "w") as fh:
            json.dump(state, fh, indent=1)
        # written last: the checksums let a --resume tell a checkpoint damaged since (a truncated or lost
        # file) from a good one, and fall back to the one before
        sums = {n: sha256_file(os.path.join(tmp, n)) for n in (CHECKPOINT_FILES if student is not None
                                                                else STORE_CHECKPOINT_FILES)}
        with open(os.path.join(tmp, COMPLETE_FILE), "w") as fh:
            json.dump({"sha256": sums}, fh, indent=1)
    prune_checkpoints(out, keep)
    return final


def prune_checkpoints(out: str, keep: int) -> None:
    """Deletes all but the newest `keep` checkpoints, oldest first."""
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_state(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, STATE_FILE)) as fh:
        return json.load(fh)


def safetensors_shapes(model_dir: str, pattern: str = "*.safetensors") -> Dict[str, Tuple[int, ...]]:
    """{name: shape} of every tensor in the directory's files matching `pattern` (headers only)."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(glob.glob(os.path.join(model_dir, pattern))):
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                shapes[k] = tuple(fh.get_slice(k).get_shape())
    return shapes


def load_checkpoint_weights(student, path: str) -> None:
    from safetensors.torch import load_model

    weights = os.path.join(path, "model.safetensors")
    expected = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    found = safetensors_shapes(path, "model.safetensors")
    bad = [f"{k}: checkpoint {found[k]} vs model {expected.get(k)}" for k in found if expected.get(k) != found[k]]
    if bad:
        raise FinetuneError(f"{path}: checkpoint of another shape ({len(bad)} tensors): " + "; ".join(bad[:4]))
    load_model(student, weights, strict=False)


def load_optimizer_state(optimizer, path: str) -> None:
    # loaded to the CPU first: Optimizer.load_state_dict moves the state to its parameters' device
    legacy = os.path.join(path, "optimizer.pt")
    if os.path.isfile(legacy):
        sd = torch.load(legacy, map_location="cpu", weights_only=True)
    else:
        try:
            sd = load_state_dict_file(os.path.join(path, "optimizer.safetensors"))
        except ImportError as e:
            raise FinetuneError(f"--resume: {path}: {e}") from None
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError) as e:
        raise FinetuneError(f"--resume: {path}: the optimizer state does not fit this run's optimizer ({e})") from None


def restore_rng(path: str, device: torch.device) -> None:
    """The generators as they were when the checkpoint was saved (the GPU's too, when training there)."""
    if os.path.isfile(os.path.join(path, "rng.pt")):
        rng = torch.load(os.path.join(path, "rng.pt"), map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file
        rng = load_file(os.path.join(path, "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def truncate_log(path: str, step: int, evals) -> None:
    """On resume, keep the log lines the checkpoint accounts for: its steps, and the evals it records
    (`evals`, by name). The rest will be written again: the steps past it, and an eval run after it was
    saved (the "final" eval of a finished run that is extended, or killed before its model was saved),
    which would otherwise be in the log twice, or at a step where the longer schedule has none.
    Replaced atomically: a kill while it rewrites leaves the old log, never a cut one."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                rec = json.loads(line)
                if rec.get("step", 0) <= step and ("eval" not in rec or rec["eval"] in evals):
                    keep.append(line if line.endswith("\n") else line + "\n")  # a last line cut before its newline
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


def remove_leftovers(out: str, keep: int) -> None:
    """What a killed run may have left in --out: the temporary folders of its checkpoint and model saves
    (each as large as a checkpoint or the model; nothing reads them, a save only counts once renamed into
    place), and checkpoints beyond --keep-checkpoints when it died between a save and the pruning after it
    (or in that pruning: a half-deleted checkpoint). Run before anything else is written, on --resume after
    the newer damaged checkpoints are set aside (so the one resumed from is the newest, and kept)."""
    prune_checkpoints(out, keep)
    for pattern in (os.path.join(out, "checkpoints", ".tmp-step-*"), os.path.join(out, ".tmp-final-*")):
        for tmp in glob.glob(pattern):
            shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, "log.jsonl.tmp"))


def save_final(out: str, student, tok, state: Dict[str, Any], save_model=None) -> None:
    """The finished model, written to a temporary folder and moved into --out; config.json last.
    save_model(folder): how the model is written (default student.save_pretrained)."""
    tmp = tempfile.mkdtemp(prefix=".tmp-final-", dir=out)
    os.chmod(tmp, 0o755)
    try:
        (save_model or student.save_pretrained)(tmp)
        tok.save(tmp)
        with open(os.path.join(tmp, "eval.json"), "w") as fh:
            json.dump({k: state.get(k) for k in ("evals", "timings", "fixed_point", "args")}, fh, indent=1)
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for n in names:
            dst = os.path.join(out, n)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(tmp, n), dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
