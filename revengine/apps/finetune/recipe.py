"""FinetuneRecipe: one fine-tuning run, as setup() -> train() -> cleanup() (run() does all three)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Dict, Optional

import torch

from revengine import memory
from revengine.offload import LayerStore, OffloadError
from revengine.optim import WEIGHT_DTYPES, InBackwardOptimizer, create, optimizer_class, set_lr

from .args import FinetuneArgs, FinetuneError
from .checkpoint import (check_resume, checkpoint_dirs, load_checkpoint_weights, load_optimizer_state, load_state,
                         prepare_out, remove_leftovers, restore_rng, run_inputs, save_checkpoint, save_final,
                         set_aside_newer, truncate_log)
from .data import DataStream, load_splits, load_tokenizer, to_device
from .evaluate import evaluate
from .interrupt import Interrupt
from .loss import autocast, model_losses, token_kl
from .model import is_revmoe, load_source, new_parameters, store_dir, streams, vocab_size_of, why_not_streamed


class FinetuneRecipe:
    """Stage 1 trains the parameters the conversion added (all of them when it added none), stage 2
    trains every parameter; the original model's logits are the teacher while --distill says so.
    Every step's state (weights, optimizer, RNG, data position) is what a checkpoint holds, so a
    resumed run ends bit-identical to an uninterrupted one."""

    def __init__(self, args: FinetuneArgs):
        self.args = args
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.store: Optional[LayerStore] = None  # --offload: stage 2's layers between uses
        self._bar = None

    # -- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Loads and checks the models, tokenizer and data (and on --resume, the checkpoint) before
        anything is written to --out."""
        args = self.args
        args.validate()
        self.resume_from = prepare_out(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)
        self.tok = load_tokenizer(args.model)
        # --offload disk from an HF checkpoint: the layers go straight into the store, which is then
        # also the checkpoint of the weights and the optimizer state
        self.streamed = streams(args)
        if args.offload == "disk" and not self.streamed:
            print(f"revengine finetune: --offload disk: the whole model is built in memory first, and its layers go "
                  f"to the store for stage 2 ({why_not_streamed(args)})", flush=True)
        source, self.student, self.kind = load_source(args, resuming=self.resume_from is not None)
        # the run's draws (dropout, BDIA's signs) start here: a model built in memory (whose
        # initialisation draws) and one streamed into the store train alike
        torch.manual_seed(args.seed)
        vocab = vocab_size_of(self.student)
        if len(self.tok) > vocab:
            raise FinetuneError(f"vocabulary mismatch: the tokenizer has {len(self.tok)} tokens but the model's "
                                f"embedding has {vocab} rows" +
                                (" (byte-level data needs >= 257)" if self.tok.kind == "bytes" else ""))
        self.train_examples, self.eval_examples = load_splits(args, self.tok, vocab)
        self.stream = DataStream(self.train_examples, args.batch_size, args.seed, self.tok.pad_token_id)

        new = new_parameters(self.student, source)
        self.stage1_params = new if new else list(self.student.parameters())
        self.stage1_what = f"{sum(p.numel() for p in new)} new parameters" if new else "all parameters (no new ones)"
        # the source lives on only as the teacher (when distilling)
        self.teacher = source if (source is not None and args.distill != "none") else None
        if not self.streamed:  # (streamed: built on the CPU in --weights' dtype, its layers released)
            self.student.to(self.device)
        if args.weights != "fp32" and not self.streamed:  # no fp32 copy: the optimizer rounds its updates to these weights
            self.student.to(WEIGHT_DTYPES[args.weights])
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.total = args.stage1_steps + args.steps

        self.inputs = run_inputs(args)
        self.state: Dict[str, Any] = {"step": 0, "args": args.record(), "inputs": self.inputs, "evals": {},
                                      "data": self.stream.state(), "timings": {}}
        if self.resume_from is not None:
            self._load_checkpoint_state()
        os.makedirs(args.out, exist_ok=True)
        self.log_path = os.path.join(args.out, "log.jsonl")
        if self.resume_from is None and os.path.exists(self.log_path):
            os.remove(self.log_path)  # prepare_out found it the only trace of a run that never saved a checkpoint
        if self.resume_from is not None:
            set_aside_newer(args.out, self.resume_from)
        remove_leftovers(args.out, args.keep_checkpoints)
        truncate_log(self.log_path, self.state["step"], self.state["evals"])

    def _load_checkpoint_state(self) -> None:
        """The run's state, weights and data position from the checkpoint (whose settings must match)."""
        self.state = load_state(self.resume_from)
        in_store = "store_step" in self.state
        if in_store != self.streamed:
            raise FinetuneError(f"--resume: {self.resume_from} " + (
                f"keeps its weights in the layer store ({self.state.get('store_dir')}): resume with --offload disk"
                if in_store else "holds the whole model's weights; this run would stream the model into a layer "
                "store (--offload disk): resume with the checkpoint's --offload"))
        if not in_store:  # shapes first: another model of another shape is best told as such
            load_checkpoint_weights(self.student, self.resume_from)
        check_resume(self.args, self.state, self.inputs, self.resume_from)
        self.state["args"] = self.args.record()  # today's paths, and --steps when raised
        self.stream.load(self.state["data"])

    # -- the training loop ----------------------------------------------------------------------

    def train(self) -> Dict[str, Any]:
        """Runs the remaining steps; returns a summary dict (status 'finished' or 'interrupted')."""
        args, state = self.args, self.state
        step = state["step"]
        stage, base_lr = self._start(step)
        status, ran, step_times = "finished", 0, []
        self._bar = self._progress_bar(step)
        if stage == 2:
            self._reset_peaks()
        self.student.train()
        with Interrupt() as intr:
            while step < self.total:
                if self._stage_of(step + 1) != stage:  # stage 1 -> 2
                    stage = 2
                    if args.distill != "all":
                        self.teacher = None
                    self._drop_optimizer()  # stage 1's state is freed before stage 2's peak starts
                    self.optimizer, base_lr = self._make_optimizer(2)
                    self._offload(2)
                    self._reset_peaks()
                t0 = time.perf_counter()
                in_stage = step - (0 if stage == 1 else args.stage1_steps)
                lr = base_lr * min(1.0, (in_stage + 1) / args.warmup) if args.warmup else base_lr
                set_lr(self.optimizer, lr)
                loss_sum = kl_sum = 0.0
                for _ in range(args.grad_accum):
                    batch = to_device(self.stream.next(), self.device)
                    if args.in_backward and args.clip == "global":  # a pass that measures the norm, one that steps
                        passes = []

                        def objective_of_pass(batch=batch):
                            passes.append(self._losses(batch, step))
                            return passes[-1][0]
                        self.optimizer.step_two_pass(objective_of_pass)
                        objective, ce, kl = passes[-1]  # the stepping pass's
                    else:
                        objective, ce, kl = self._losses(batch, step)
                        (objective / args.grad_accum).backward()
                    loss_sum += float(ce.detach())
                    kl_sum += float(kl.detach()) if kl is not None else 0.0
                if args.in_backward:  # every parameter was stepped (and clipped) inside backward
                    gnorm = self.optimizer.last_grad_norm if args.clip == "global" else float("nan")
                else:
                    gnorm = self._clip_grads()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                memory.synchronize(self.device)  # the step's queued GPU work belongs to its time
                step += 1
                ran += 1
                dt = time.perf_counter() - t0
                if stage == 2:
                    step_times.append(dt)
                rec = {"step": step, "stage": stage, "loss": loss_sum / args.grad_accum, "lr": lr,
                       "grad_norm": gnorm, "time_s": dt}
                if self.teacher is not None:
                    rec["kl"] = kl_sum / args.grad_accum
                self._log(rec)
                if self._bar is not None:
                    self._bar.update(1)
                    self._bar.set_postfix(stage=stage, loss=f"{rec['loss']:.4f}")
                state["step"], state["data"] = step, self.stream.state()
                if name := self._eval_due(step):
                    self._evaluate(name)
                stop = intr.requested or (args.stop_after is not None and ran >= args.stop_after and step < self.total)
                if (stop or (args.save_every and step % args.save_every == 0) or step == args.stage1_steps
                        or step == self.total or self.streamed):  # streamed: the store moves on every step
                    self.save_checkpoint()
                if stop:
                    status = "interrupted"
                    break
        if self._bar is not None:
            self._bar.close()
        summary: Dict[str, Any] = {"status": status, "step": step, "total_steps": self.total, "out": args.out}
        if status == "interrupted":
            print(f"revengine finetune: stopped at step {step}/{self.total}; checkpoint saved in "
                  f"{checkpoint_dirs(args.out)[-1]}; continue with --resume", flush=True)
            return summary
        return self._finish(stage, step_times, summary)

    # -- helpers of the loop ----------------------------------------------------------------------

    def _eval_due(self, step: int) -> Optional[str]:
        """The name of the eval the schedule runs after this step of the loop (None when none): the end of
        stage 1, and every --eval-every steps but the last (whose eval is "final")."""
        args = self.args
        if step == args.stage1_steps:
            return "stage1"
        if args.eval_every and step % args.eval_every == 0 and step < self.total:
            return f"step{step}"
        return None

    def _stage_of(self, step: int) -> int:
        """The stage the step with this 1-based index belongs to."""
        return 1 if step <= self.args.stage1_steps else 2

    def _make_optimizer(self, stage: int):
        """(the optimizer over the stage's parameters, its base learning rate); only those parameters require
        grads. --optimizer and --weights choose the class; --in-backward wraps one instance per parameter
        into an InBackwardOptimizer, which steps inside backward."""
        args = self.args
        params = self.stage1_params if stage == 1 else list(self.student.parameters())
        for p in self.student.parameters():
            p.requires_grad_(stage == 2)
        for p in params:
            p.requires_grad_(True)
        lr = (args.stage1_lr or args.lr) if stage == 1 else args.lr
        try:
            cls, kw = optimizer_class(args.optimizer, weights=args.weights)
        except ImportError as e:
            raise FinetuneError(f"--optimizer {args.optimizer} --weights {args.weights}: {e}") from None
        if args.in_backward:
            clip = (dict(max_grad_norm=args.max_grad_norm, clip="global" if args.clip == "global" else "per_tensor")
                    if args.max_grad_norm > 0 else {})
            return InBackwardOptimizer(params, cls, lr=lr, weight_decay=args.weight_decay,
                                       state_device=args.state_device, **clip, **kw), lr
        return create(cls, params, lr=lr, weight_decay=args.weight_decay, **kw), lr

    def _offload(self, stage: int) -> None:
        """--offload: stage 2's layers and their optimizer state go to the store (after the optimizer
        state of a resumed run is loaded: the checkpoint, not an earlier store, is what the run resumes from)."""
        args = self.args
        if args.offload == "none" or stage != 2:
            return
        directory = store_dir(args)
        try:
            if self.streamed:  # the store holds the run: opened at the checkpoint's step
                self.store = LayerStore.open(self.student, self.optimizer, directory,
                                             step=self.state.get("store_step", 0))
                return
            LayerStore.remove(directory)  # an earlier run's store: this one starts from the weights in memory
            self.store = LayerStore(self.student, self.optimizer, tier=args.offload, directory=directory)
        except OffloadError as e:
            raise FinetuneError(str(e)) from None

    def _whole_model(self):
        """A block in which every layer is in memory (checkpoints and the final save read the whole model;
        not when streamed: the store is the checkpoint, and the final save reads a layer at a time)."""
        return self.store.resident() if self.store is not None and not self.streamed else contextlib.nullcontext()

    def _drop_optimizer(self) -> None:
        """Lets go of the optimizer (an in-backward one's hooks too, which would otherwise keep stepping)."""
        if self.store is not None:
            self.store.detach()
            self.store = None
        if isinstance(self.optimizer, InBackwardOptimizer):
            self.optimizer.remove()
        self.optimizer = None

    def _start(self, step: int):
        """Before the first step of this process: the opening evals (of a new run), the optimizer
        (with the checkpoint's state when resuming inside its stage), the checkpoint's RNG, the banner.
        Returns (stage, base learning rate)."""
        args = self.args
        if step == 0:
            if self.teacher is not None:
                self._evaluate("original", self.teacher)
            if not self.streamed:  # (streamed: once the store has brought the layers)
                self._evaluate("start")
        stage = self._stage_of(step + 1) if step < self.total else 2
        self.optimizer, base_lr = self._make_optimizer(stage)
        if self.resume_from is not None:
            if step < self.total and self._stage_of(step) == stage and step > 0 and not self.streamed:
                load_optimizer_state(self.optimizer, self.resume_from)
            restore_rng(self.resume_from, self.device)
        self._offload(stage)
        if step == 0 and self.streamed:
            self._evaluate("start")
        if stage == 2 and self.teacher is not None and args.distill != "all":
            self.teacher = None
        print(f"revengine finetune: {type(self.student).__name__} ({self.kind}, scheme {args.scheme}) on "
              f"{self.device}, {sum(p.numel() for p in self.student.parameters())} parameters; stage 1 trains "
              f"{self.stage1_what}; {len(self.train_examples)} train / {len(self.eval_examples)} eval examples; "
              f"steps {step}/{self.total}" + (f"; its layers live in the store {self.store.directory}, never all in "
                                                "memory" if self.streamed else ""), flush=True)
        if self.resume_from is not None and 0 < step < self.total and (name := self._eval_due(step)):
            # the checkpoint's step may call for an eval it does not record: the last step of a run now
            # extended (evaluated as "final" then, now a step of the schedule), or --eval-every changed.
            # The weights are the step's, and the RNG as the loop would have it (a save follows its eval)
            self._evaluate(name)
        return stage, base_lr

    def _progress_bar(self, step: int):
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            return None
        return tqdm(total=self.total, initial=step, disable=not self.args.progress, dynamic_ncols=True,
                    file=sys.stderr)

    def _kl_to_teacher(self, batch, student_logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False).logits
        return token_kl(t_logits, student_logits, batch["attention_mask"])

    def _losses(self, batch, step: int):
        """(the objective to differentiate, the cross-entropy, the KL to the teacher or None) of one micro-batch."""
        args = self.args
        kl = None
        with autocast(args.bf16, self.device):
            out, objective, ce = model_losses(self.student, batch, want_logits=self.teacher is not None)
            if self.teacher is not None:
                kl = self._kl_to_teacher(batch, out.logits)
                objective = objective + args.kl_weight * kl
        if not torch.isfinite(objective):
            raise FloatingPointError(f"step {step + 1}: the loss is {float(objective)}; stopping "
                                     "(nothing finished is written; the last checkpoint stays)")
        return objective, ce, kl

    def _clip_grads(self) -> float:
        """The global grad norm before clipping to --max-grad-norm (nan when clipping is off)."""
        if self.args.max_grad_norm <= 0:
            return float("nan")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return float(torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm))

    def _reset_peaks(self) -> None:
        """Stage 2's peak memory starts here: RSS (and on a GPU, its peak allocated memory)."""
        memory.malloc_trim()
        memory.reset_peak_rss()
        if self.device.type == "cuda":
            memory.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _log(self, rec: Dict[str, Any]) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def _evaluate(self, name: str, model=None) -> None:
        """Evaluates the student (or `model`) once per name: a resumed run keeps the evals it has."""
        if name in self.state["evals"]:
            return
        args = self.args
        res = evaluate(model if model is not None else self.student, self.eval_examples, self.tok,
                       args.eval_batch_size, args.eval_max_examples, args.bf16)
        self.state["evals"][name] = res
        self._log({"step": self.state["step"], "eval": name, **res})
        msg = f"eval [{name}] step {self.state['step']}: loss {res['loss']:.4f}"
        if "exact_match" in res:
            msg += f", exact match {res['exact_match']:.3f} ({res['exact_match_n']} examples)"
        print(msg, flush=True)

    def _finish(self, stage: int, step_times, summary: Dict[str, Any]) -> Dict[str, Any]:
        """Stage 2's timings, the final eval, the fixed-point report, and the finished model in --out."""
        state = self.state
        if stage == 2 and step_times:
            hwm = memory.proc_status_kb("VmHWM")
            state["timings"] = {"stage2_peak_rss_mb": hwm["VmHWM"] / 1024.0 if hwm else None,
                                "stage2_median_step_s": sorted(step_times)[len(step_times) // 2]}
            if self.device.type == "cuda":
                state["timings"]["stage2_peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self._evaluate("final")
        rep = self.student.fixed_point_report() if is_revmoe(self.student) else None
        if rep:
            state["fixed_point"] = {"layers": len(rep), "stored": sum(bool(r.get("stored")) for r in rep),
                                    "max_iterations": max(int(r.get("iterations") or 0) for r in rep)}
            print(f"revffn fixed point: {state['fixed_point']['stored']}/{len(rep)} layers stored their input in "
                  f"the last step (the rest inverted in <= {state['fixed_point']['max_iterations']} iterations)",
                  flush=True)
        with self._whole_model():
            save_final(self.args.out, self.student, self.tok, state,
                       save_model=self._save_streamed if self.streamed else None)
        summary.update(evals=state["evals"], timings=state["timings"])
        return summary

    # -- checkpoints and cleanup ------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        """checkpoints/step-NNNNNN for the current step (the older ones beyond --keep-checkpoints go)."""
        if self.streamed:  # the weights and the optimizer state are the store's, at this step
            self.state.update(store_step=self.store.step, store_dir=self.store.directory)
            return save_checkpoint(self.args.out, self.state["step"], None, None, self.state,
                                   self.args.keep_checkpoints)
        with self._whole_model():
            return save_checkpoint(self.args.out, self.state["step"], self.student, self.optimizer, self.state,
                                   self.args.keep_checkpoints)

    def _save_streamed(self, directory: str) -> None:
        """The finished model as save_pretrained writes it, its weights read from the store a layer at a time."""
        self.student.config.save(directory)
        self.store.save_weights(os.path.join(directory, "model.safetensors"), {"format": "pt", "model_type": "revmoe"})

    def cleanup(self) -> None:
        """Closes the progress bar and lets go of the models and the optimizer state."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._drop_optimizer()
        self.teacher = self.student = None


def run(args: FinetuneArgs) -> Dict[str, Any]:
    """Runs (or resumes) a fine-tuning; returns a summary dict (status 'finished' or 'interrupted')."""
    recipe = FinetuneRecipe(args)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
