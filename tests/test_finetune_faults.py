"""Fault injection over `revengine finetune`: kill -9 at random moments of a run, then --resume, again and
again. Every run must end bit-identical to the uninterrupted one (the finished model's tensors, log.jsonl
but its timings, the evals), with no temporary folder left behind, and after every kill the run folder
must be usable: a checkpoint to resume from whose files all match their checksums, or (killed before the
first one) nothing but what a new run may start over on.

A kill moment comes from one of four triggers, drawn with a seeded random generator (the seed is in every
failure; REVENGINE_FAULT_SEED=N replays the draws, though not the exact moments, which are wall-clock):
  time   a delay after the command starts (imports, loading, resuming: set-aside, log truncation)
  step   a delay after a later step's log line (training, evals, checkpoint saves and their pruning)
  save   the moment a checkpoint's temporary folder appears (inside a checkpoint write), or shortly after
  final  the moment the finished model's temporary folder appears, or shortly after (the final eval is
         logged by then)
Checkpoints are saved every step, so random moments land in their writes too. The default run kills 3
times, one inside a checkpoint write for sure; `pytest -m slow` kills 20 times, at least 4 inside writes.

The commands run in children of a fork server (tests/_finetune_forkserver.py), which imports torch and
transformers once: `python -m revengine` would spend ~5 s importing before each kill.
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from revengine.apps import finetune as ft  # noqa: E402
from revengine.apps.finetune.checkpoint import checkpoint_problem, only_unfinished_leftovers  # noqa: E402
from conftest import child_env  # noqa: E402
from test_finetune import save_tiny, same_weights  # noqa: E402
from _finetune_forkserver import Lines  # noqa: E402

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_finetune_forkserver.py")
STAGE1, STAGE2 = 3, 6
TOTAL = STAGE1 + STAGE2
COMMON = ["--lr", "3e-3", "--batch-size", "8", "--save-every", "1", "--keep-checkpoints", "2",
          "--eval-every", "2", "--eval-max-examples", "4", "--threads", "1", "--no-progress"]
FLAGS = ["--scheme", "revffn", "--stage1-steps", str(STAGE1), "--steps", str(STAGE2), "--stage1-lr", "1e-2", *COMMON]
# the checkpoint streamed into a layer store that is the run's checkpoint of weights and optimizer state
STREAMED = ["--scheme", "bdia", "--stage1-steps", "0", "--steps", str(TOTAL), "--in-backward", "--offload", "disk",
            *COMMON]


class ForkServer:
    """The test's side of tests/_finetune_forkserver.py."""

    def __init__(self, folder: Path):
        self.err = open(folder / "forkserver.err", "w")
        self.proc = subprocess.Popen([sys.executable, SERVER, "transformers.models.mixtral.modeling_mixtral"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     env=child_env(OMP_NUM_THREADS="1"), cwd=tempfile.gettempdir())
        self.lines = Lines(self.proc.stdout.fileno())
        assert self.get(180) == {"ready": True}, self.error()

    def error(self) -> str:
        self.err.flush()
        return "fork server stderr:\n" + open(self.err.name).read()[-4000:]

    def get(self, timeout):
        line = self.lines.get(timeout)
        assert line != b"", "the fork server died; " + self.error()
        return None if line is None else json.loads(line)

    def send(self, msg) -> None:
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()

    def start(self, argv, log: Path) -> int:
        self.send({"argv": argv, "log": str(log)})
        return self.get(60)["pid"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.err.close()


def logged_step(out: Path) -> int:
    """The last training step in out/log.jsonl (0 when none)."""
    step = 0
    try:
        with open(out / "log.jsonl") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "stage" in rec:
                    step = max(step, rec["step"])
    except FileNotFoundError:
        pass
    return step


def temporaries(folder: Path, prefix: str):
    try:
        return {n for n in os.listdir(folder) if n.startswith(prefix)}
    except FileNotFoundError:
        return set()


def log_without_times(out: Path):
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in open(out / "log.jsonl")]


class Campaign:
    """Runs the command in `folder`/run-N, killing it at the planned triggers and resuming, and checks each
    run folder after each kill and each finished run against the uninterrupted reference."""

    def __init__(self, folder: Path, model: str, data: str, seed: int, flags=FLAGS):
        self.folder, self.model, self.data, self.seed, self.flags = folder, model, data, seed, flags
        self.rng = random.Random(seed)
        self.server = ForkServer(folder)
        self.kills = []  # (trigger, where it landed)
        self.history = []  # one line per command
        self.launches = 0
        self.ref = folder / "ref"
        self.t_setup, self.t_step = self._reference()

    def argv(self, out: Path, resume: bool):
        return ["finetune", "--model", self.model, "--data", self.data, "--out", str(out), *self.flags] + \
            (["--resume"] if resume else [])

    def _run(self, out: Path, resume: bool, trigger=None):
        """Runs the command once; returns (rc, child log path, where a kill landed or None, whether it
        landed inside a checkpoint write: the write's temporary folder is still there)."""
        self.launches += 1
        log = self.folder / f"child-{self.launches:03d}.log"
        seen_steps, seen_final = temporaries(out / "checkpoints", ".tmp-step-"), temporaries(out, ".tmp-final-")
        start_step = logged_step(out)
        t0 = time.monotonic()
        self.server.start(self.argv(out, resume), log)
        fire_at, saves_seen, where = None, set(), None
        while True:
            msg = self.server.get(0.002)
            if msg is not None:
                inside = bool(temporaries(out / "checkpoints", ".tmp-step-") - seen_steps)
                return msg["rc"], log, where, inside
            if where is not None:
                continue  # killed: waiting for the server to report it
            now = time.monotonic()
            assert now - t0 < 300, f"the command ran for 5 minutes: {log.read_text()[-3000:]}"
            if trigger is None:
                time.sleep(0.01)
                continue
            kind = trigger[0]
            if fire_at is None:
                if kind == "time":
                    fire_at = t0 + trigger[1]
                elif kind == "step" and logged_step(out) >= max(trigger[1], start_step + 1):
                    fire_at = now + trigger[2]
                elif kind == "save":
                    new = temporaries(out / "checkpoints", ".tmp-step-") - seen_steps
                    saves_seen |= new
                    if new and len(saves_seen) > trigger[1]:
                        fire_at = now + trigger[2]
                elif kind == "final" and temporaries(out, ".tmp-final-") - seen_final:
                    fire_at = now + trigger[1]
            if fire_at is not None and now >= fire_at:
                self.server.send({"kill": True})
                where = (f"step {logged_step(out)}; checkpoint temporaries "
                         f"{sorted(temporaries(out / 'checkpoints', '.tmp-step-') - seen_steps)}; model temporaries "
                         f"{sorted(temporaries(out, '.tmp-final-') - seen_final)}")
            time.sleep(0.001)

    def _reference(self):
        """The uninterrupted run (through the fork server like the others); the time its setup takes
        (until the first log line) and a step's average time, which scale the kill delays."""
        t0 = time.monotonic()
        self.server.start(self.argv(self.ref, False), self.folder / "child-ref.log")
        t_setup = None
        while (msg := self.server.get(0.005)) is None:
            if t_setup is None and (self.ref / "log.jsonl").exists():
                t_setup = time.monotonic() - t0
        assert msg["rc"] == 0, (self.folder / "child-ref.log").read_text()[-3000:]
        total = time.monotonic() - t0
        return t_setup or total / 2, (total - (t_setup or 0)) / TOTAL

    def draw(self, kind: str, out: Path):
        """A trigger of this kind with random parameters (for the command about to run in `out`)."""
        r = self.rng
        if kind == "time":
            return ("time", r.uniform(0, 1.2 * self.t_setup))
        if kind == "step":
            return ("step", r.randint(min(logged_step(out) + 1, TOTAL), TOTAL), r.uniform(0, 1.5 * self.t_step))
        if kind == "save":  # the first checkpoint write it sees, or a later one; killed at once or a little later
            return ("save", r.choice([0, 0, 1, 2]), r.choice([0.0, 0.0, r.uniform(0, 0.02)]))
        if kind == "save-now":  # inside a write unless it ends between the poll that sees it and the kill
            return ("save", 0, 0.0)
        if kind == "final":  # saving the tiny model takes milliseconds, and then the command ends
            return ("final", r.choice([0.0, r.uniform(0, 0.004)]))
        raise ValueError(kind)

    def check_usable(self, out: Path) -> bool:
        """After a kill: True when --resume is what continues the run (a checkpoint to resume from whose
        files all match their checksums), False when a new run starts over (nothing was saved yet)."""
        ckpts = ft.checkpoint_dirs(str(out)) if out.exists() else []
        if ckpts:
            # a renamed checkpoint is complete: a kill can only leave an older one half-deleted (pruning)
            assert checkpoint_problem(ckpts[-1]) is None, (ckpts[-1], checkpoint_problem(ckpts[-1]))
            return True
        assert not out.exists() or only_unfinished_leftovers(str(out)), sorted(os.listdir(out))
        return False

    def check_identical(self, out: Path) -> None:
        assert (out / "config.json").exists()
        assert same_weights(str(self.ref), str(out)), "the finished model's tensors differ"
        assert log_without_times(out) == log_without_times(self.ref), "log.jsonl differs"
        evals = [json.load(open(p / "eval.json"))["evals"] for p in (out, self.ref)]
        assert evals[0] == evals[1], "the evals differ"
        left = [n for n in os.listdir(out) if n.startswith(".tmp") or n.endswith(".tmp")]
        left += [n for n in os.listdir(out / "checkpoints") if not n.startswith("step-")]
        assert not left, f"left behind: {left}"
        ckpts = ft.checkpoint_dirs(str(out))
        assert len(ckpts) <= 2 and all(checkpoint_problem(d) is None for d in ckpts), ckpts

    def run(self, kinds, inside_writes: int) -> None:
        """Kills once per trigger kind in `kinds` (in a random order), resuming after each, and finishes the run;
        more "save-now" triggers follow while fewer than `inside_writes` kills landed inside a checkpoint write
        (a write can end between the moment its folder is seen and the kill: then the kill lands after it)."""
        plan = list(kinds)
        self.rng.shuffle(plan)
        runs, out, inside, extra = 0, self.folder / "run-0", 0, 0
        while True:
            resume = self.check_usable(out)
            trigger = self.draw(plan[len(self.kills)], out) if len(self.kills) < len(plan) else None
            rc, log, where, landed_inside = self._run(out, resume, trigger)
            self.history.append(f"{out.name} {'--resume' if resume else 'new'} {trigger} -> rc {rc} {where or ''}")
            if rc == -9 and where is not None:
                self.kills.append((trigger, where))
                inside += landed_inside
                if len(self.kills) == len(plan) and inside < inside_writes and extra < 3:
                    plan.append("save-now")
                    extra += 1
                continue
            assert rc == 0, f"{'--resume' if resume else 'a new run'} after {len(self.kills)} kills failed " \
                            f"(rc {rc}):\n{log.read_text()[-3000:]}"
            self.check_identical(out)
            if len(self.kills) == len(plan):
                break
            runs += 1  # this run finished before its trigger fired: the next trigger goes to a new run
            out = self.folder / f"run-{runs}"
        assert inside >= inside_writes, f"only {inside} kills landed inside a checkpoint write"
        self.runs = runs + 1

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault-inputs")
    ft.write_jsonl(ft.arithmetic_records(300, digits=2, seed=1), str(d / "train.jsonl"))
    return save_tiny(d / "mixtral"), str(d / "train.jsonl")


def campaign(tmp_path, inputs, kinds, inside_writes, flags=FLAGS):
    seed = int(os.environ.get("REVENGINE_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    c = Campaign(tmp_path, *inputs, seed, flags)
    t0 = time.monotonic()
    try:
        c.run(kinds, inside_writes)
    except AssertionError as e:
        history = "\n  ".join(c.history)
        raise AssertionError(f"fault injection seed {seed} (REVENGINE_FAULT_SEED={seed} replays its draws); "
                             f"the commands so far (run, how, trigger -> exit status, where the kill landed):"
                             f"\n  {history}\n{e}") from e
    finally:
        c.close()
    print(f"seed {seed}: {len(c.kills)} kills in {c.runs} run(s), {c.launches} commands, "
          f"{time.monotonic() - t0:.1f} s after the reference")
    for t, w in c.kills:
        print(f"  {t} -> {w}")
    return c


def test_kill9_and_resume_three_times(tmp_path, inputs):
    kinds = ["save-now", "step", "time"]
    campaign(tmp_path, inputs, kinds, inside_writes=1)


@pytest.mark.slow
def test_kill9_and_resume_twenty_times(tmp_path, inputs):
    kinds = ["save-now"] * 3 + ["save"] * 3 + ["final"] * 2 + ["time"] * 4 + ["step"] * 8
    campaign(tmp_path, inputs, kinds, inside_writes=4)


def test_kill9_and_resume_a_streamed_run(tmp_path, inputs):
    """--offload disk from the HF checkpoint: the store is the checkpoint of weights and optimizer state, so
    a kill lands between a layer's write-back, the store's commit and the run's own checkpoint too."""
    campaign(tmp_path, inputs, ["save-now", "step", "time"], inside_writes=1, flags=STREAMED)


@pytest.mark.slow
def test_kill9_and_resume_a_streamed_run_twenty_times(tmp_path, inputs):
    kinds = ["save-now"] * 3 + ["save"] * 3 + ["final"] * 2 + ["time"] * 4 + ["step"] * 8
    campaign(tmp_path, inputs, kinds, inside_writes=4, flags=STREAMED)
