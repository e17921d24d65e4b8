"""revengine.apps.finetune (`revengine finetune`): two-stage fine-tuning of converted HF MoE checkpoints,
checkpoints and bit-identical --resume (also after Ctrl-C), eval loss and exact match, bad input,
and a converted model under HF Trainer. Tiny random models saved to tmp dirs; no download."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

tf = pytest.importorskip("transformers")

from revengine.apps import finetune as ft  # noqa: E402
from revengine.apps.finetune import FinetuneArgs, FinetuneError  # noqa: E402

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
from revengine.models import BLOCK_TYPES as SCHEMES  # noqa: E402
from revengine.models import RevMoEForCausalLM  # noqa: E402
from conftest import child_env  # noqa: E402  (a subprocess imports the revengine under test)


def tiny_config(family, vocab=260, layers=2):
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=2, rms_norm_eps=1e-6,
                  pad_token_id=None, eos_token_id=None, bos_token_id=None, experts_implementation="eager")
    if family == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, intermediate_size=24, **common)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                 intermediate_size=40, qkv_bias=True, **common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=24, norm_topk_prob=True, head_dim=12, **common)
    if family == "llama":
        return tf.LlamaConfig(intermediate_size=48, **{k: v for k, v in common.items()
                                                       if k not in ("num_experts_per_tok", "experts_implementation")})
    return tf.OlmoeConfig(num_experts=4, intermediate_size=24, **common)


def save_tiny(path, family="mixtral", seed=0, **kw):
    torch.manual_seed(seed)
    cls = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM, "qwen3_moe": tf.Qwen3MoeForCausalLM,
           "olmoe": tf.OlmoeForCausalLM, "llama": tf.LlamaForCausalLM}[family]
    cls(tiny_config(family, **kw)).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ft.write_jsonl(ft.arithmetic_records(300, digits=2, seed=1), str(d / "train.jsonl"))
    return str(d / "train.jsonl")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("mixtral") / "m")


def args(model, data, out, **kw):
    base = dict(model=model, data=data, out=str(out), stage1_steps=4, steps=8, lr=3e-3, stage1_lr=1e-2,
                batch_size=8, progress=False, save_every=0, eval_max_examples=8, threads=1)
    base.update(kw)
    return FinetuneArgs(**base)


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------
# Every family, every scheme: a two-stage run lowers the held-out loss


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_two_stage_run_lowers_heldout_loss(tmp_path, data, family, scheme):
    model = save_tiny(tmp_path / "hf", family)
    s = ft.run(args(model, data, tmp_path / "out", scheme=scheme, stage1_steps=10, steps=20))
    ev = s["evals"]
    assert s["status"] == "finished" and s["step"] == 30
    assert set(ev) >= {"original", "start", "stage1", "final"}
    # converted models start at the original's loss (up to the scheme's function change)
    assert abs(ev["start"]["loss"] - ev["original"]["loss"]) < 0.5
    assert ev["final"]["loss"] < ev["start"]["loss"] - 0.5, ev
    assert 0.0 <= ev["final"]["exact_match"] <= 1.0 and ev["final"]["exact_match_n"] == 8
    # the finished model reloads and reproduces the final eval
    from revengine.models import RevMoEForCausalLM
    m = RevMoEForCausalLM.from_pretrained(str(tmp_path / "out"))
    tok = ft.load_tokenizer(str(tmp_path / "out"))
    assert isinstance(tok, ft.ByteTokenizer)
    recs = json.load(open(tmp_path / "out" / "eval.json"))
    assert recs["evals"]["final"]["loss"] == pytest.approx(ev["final"]["loss"])
    assert sum(p.numel() for p in m.parameters()) > 0


def test_bdia_starts_as_the_original_and_takes_its_gamma(tmp_path, data, mixtral):
    out = tmp_path / "out"
    s = ft.run(args(mixtral, data, out, scheme="bdia", bdia_gamma=0.125, stage1_steps=0, steps=3))
    ev = s["evals"]
    assert s["status"] == "finished" and abs(ev["start"]["loss"] - ev["original"]["loss"]) < 1e-5, ev
    cfg = json.load(open(out / "config.json"))
    assert cfg["block_type"] == "bdia" and cfg["bdia_gamma"] == 0.125 and cfg["exact"]
    bad = tmp_path / "bad"
    with pytest.raises(FinetuneError, match="bdia_gamma = 2\\^-k"):
        ft.run(args(mixtral, data, bad, scheme="bdia", bdia_gamma=0.3, stage1_steps=0, steps=3))
    assert not os.path.exists(bad / "config.json")


def test_stage1_trains_only_the_new_parameters(tmp_path, data, mixtral):
    from revengine import convert
    out = tmp_path / "out"
    s = ft.run(args(mixtral, data, out, scheme="revffn", stage1_steps=5, steps=0, distill="stage1"))
    assert s["status"] == "finished"
    src = tf.MixtralForCausalLM.from_pretrained(mixtral)
    start = convert.from_hf(src, scheme="revffn")
    after = weights(str(out))
    pretrained = {k for k, p in start.state_dict().items()
                  if any(p is q for q in convert.hf_parameter_map(start).values())}
    sd = start.state_dict()
    changed = {k for k in sd if not torch.equal(sd[k], after[k])} if set(after) == set(sd) else None
    assert changed, "stage 1 changed nothing"
    assert not (changed & pretrained), f"stage 1 touched pretrained weights: {sorted(changed & pretrained)[:4]}"
    assert all("adapter" in k or "up_" in k or "down_" in k for k in changed), sorted(changed)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert all("kl" in r for r in log if "stage" in r)  # distilled against the original


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume


@pytest.mark.parametrize("stops", [(3,), (4,), (2, 5, 3)], ids=["mid-stage1", "stage-boundary", "three-stops"])
def test_resume_is_bit_identical(tmp_path, data, mixtral, stops):
    kw = dict(scheme="revffn", grad_accum=2, bf16=True, save_every=3)
    ref = ft.run(args(mixtral, data, tmp_path / "ref", **kw))
    out = tmp_path / "run"
    for i, k in enumerate(stops):
        s = ft.run(args(mixtral, data, out, resume=i > 0, stop_after=k, **kw))
        assert s["status"] == "interrupted"
    s = ft.run(args(mixtral, data, out, resume=True, **kw))
    assert s["status"] == "finished" and ref["status"] == "finished"
    assert same_weights(str(tmp_path / "ref"), str(out))

    def strip(p):
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in open(p / "log.jsonl")]
    assert strip(tmp_path / "ref") == strip(out)  # same losses, evals and data order


def test_resume_refuses_changed_settings_and_other_shapes(tmp_path, data, mixtral):
    out = tmp_path / "out"
    ft.run(args(mixtral, data, out, stop_after=2))
    with pytest.raises(FinetuneError, match="differ from the checkpoint"):
        ft.run(args(mixtral, data, out, resume=True, lr=1e-3))
    other = save_tiny(tmp_path / "other", vocab=300)  # another shape (the path is no part of a run's identity)
    with pytest.raises(FinetuneError, match="checkpoint of another shape"):
        ft.run(args(other, data, out, resume=True))
    with pytest.raises(FinetuneError, match="no checkpoint"):
        ft.run(args(mixtral, data, tmp_path / "empty", resume=True))


def test_resume_knows_a_run_by_content_not_by_path(tmp_path, data, mixtral, monkeypatch):
    import shutil
    monkeypatch.chdir(tmp_path)
    ft.run(args(mixtral, data, "relrun", stop_after=3))
    s = ft.run(args(mixtral, data, "./relrun/", resume=True, stop_after=2))  # another spelling of --out
    assert s["status"] == "interrupted" and s["step"] == 5
    # the run folder moved, the data and the model copied elsewhere (--model with a trailing slash)
    shutil.move("relrun", "moved")
    shutil.copytree(mixtral, "model-copy")
    shutil.copy(data, "data-copy.jsonl")
    s = ft.run(args("model-copy/", "data-copy.jsonl", tmp_path / "moved", resume=True))
    assert s["status"] == "finished" and s["step"] == 12
    ft.run(args(mixtral, data, tmp_path / "ref"))
    assert same_weights(str(tmp_path / "ref"), str(tmp_path / "moved"))


def test_resume_refuses_other_content_under_the_same_path(tmp_path, data, mixtral):
    import shutil
    model, d = shutil.copytree(mixtral, tmp_path / "m"), tmp_path / "d.jsonl"
    shutil.copy(data, d)
    out = tmp_path / "out"
    ft.run(args(str(model), str(d), out, stop_after=2))
    ft.write_jsonl(ft.arithmetic_records(300, digits=2, seed=7), str(d))  # replaced: another split
    with pytest.raises(FinetuneError, match=r"the content of --data differs from the checkpoint's"):
        ft.run(args(str(model), str(d), out, resume=True))
    shutil.copy(data, d)
    cfg = json.load(open(model / "config.json"))
    cfg["router_aux_loss_coef"] = 0.5  # the same shapes, another model
    json.dump(cfg, open(model / "config.json", "w"))
    with pytest.raises(FinetuneError, match=r"model folder's config.json differ"):
        ft.run(args(str(model), str(d), out, resume=True))
    with pytest.raises(FinetuneError, match=r"the content of --eval-data differs"):
        ft.run(args(mixtral, str(d), out, resume=True, eval_data=data))


def test_resume_may_raise_steps_and_nothing_else(tmp_path, data, mixtral):
    out = tmp_path / "out"
    kw = dict(stage1_steps=2, steps=3)
    assert ft.run(args(mixtral, data, out, **kw))["status"] == "finished"
    with pytest.raises(FinetuneError, match=r"--steps 2 is below the checkpoint's 3"):
        ft.run(args(mixtral, data, out, resume=True, stage1_steps=2, steps=2))
    with pytest.raises(FinetuneError, match=r"differ from the checkpoint.*'stage1_steps': \(2, 3\)"):
        ft.run(args(mixtral, data, out, resume=True, stage1_steps=3, steps=6))
    s = ft.run(args(mixtral, data, out, resume=True, stage1_steps=2, steps=6))  # extended by 3 steps
    assert s["status"] == "finished" and s["step"] == 8
    assert json.load(open(out / "eval.json"))["args"]["steps"] == 6
    ft.run(args(mixtral, data, tmp_path / "ref", stage1_steps=2, steps=6))
    assert same_weights(str(tmp_path / "ref"), str(out))


def _log_without_times(out):
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in open(Path(out) / "log.jsonl")]


@pytest.mark.parametrize("eval_every", [2, 3], ids=["old-last-step-on-schedule", "old-last-step-off-schedule"])
def test_extended_run_keeps_the_eval_schedule(tmp_path, data, mixtral, eval_every):
    # A finished run of 2+2 steps evaluated "final" at step 4. Extended to 2+5 steps, step 4 is a step of
    # the schedule like any other: with --eval-every 2 it calls for "step4" (which the short run never ran,
    # and the resumed loop starts after), with 3 for nothing. Either way the old "final" at step 4 is no
    # eval of the longer run: the log, evals and weights must be the uninterrupted 2+5 run's.
    out = tmp_path / "out"
    kw = dict(stage1_steps=2, eval_every=eval_every)
    assert ft.run(args(mixtral, data, out, steps=2, **kw))["status"] == "finished"
    assert [(r["eval"], r["step"]) for r in _log_without_times(out) if "eval" in r][-1] == ("final", 4)
    s = ft.run(args(mixtral, data, out, resume=True, steps=5, **kw))
    assert s["status"] == "finished" and s["step"] == 7
    ref = ft.run(args(mixtral, data, tmp_path / "ref", steps=5, **kw))
    evals = [(r["eval"], r["step"]) for r in _log_without_times(out) if "eval" in r]
    want = [("original", 0), ("start", 0), ("stage1", 2)] + \
        [(f"step{k}", k) for k in range(3, 7) if k % eval_every == 0] + [("final", 7)]
    assert evals == want, evals
    assert _log_without_times(out) == _log_without_times(tmp_path / "ref")
    assert s["evals"] == ref["evals"] and same_weights(str(tmp_path / "ref"), str(out))
    # resuming the finished run again (same --steps) redoes its end, and logs its final eval once
    s = ft.run(args(mixtral, data, out, resume=True, steps=5, **kw))
    assert s["status"] == "finished" and _log_without_times(out) == _log_without_times(tmp_path / "ref")


def test_resume_refuses_a_checkpoint_without_content_hashes(tmp_path, data, mixtral):
    out = tmp_path / "out"
    ft.run(args(mixtral, data, out, stop_after=2))
    ckpt = ft.checkpoint_dirs(str(out))[-1]
    state = json.load(open(os.path.join(ckpt, ft.STATE_FILE)))
    del state["inputs"]  # as an older revengine wrote it: no hashes, no checksums
    json.dump(state, open(os.path.join(ckpt, ft.STATE_FILE), "w"))
    os.remove(os.path.join(ckpt, "complete.json"))
    with pytest.raises(FinetuneError, match="no intact checkpoint.*complete.json is missing.*older revengine"):
        ft.run(args(mixtral, data, out, resume=True))


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, data, mixtral, capsys):
    import shutil
    kw = dict(save_every=3, keep_checkpoints=2)
    ft.run(args(mixtral, data, tmp_path / "ref", **kw))
    base = tmp_path / "base"
    ft.run(args(mixtral, data, base, stop_after=7, **kw))
    assert [os.path.basename(d) for d in ft.checkpoint_dirs(str(base))] == ["step-000006", "step-000007"]

    def truncate(p):
        p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])

    def strip(p):
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in open(p / "log.jsonl")]
    damages = {"optimizer.safetensors": truncate, "model.safetensors": os.remove, "rng.safetensors": truncate,
               "trainer_state.json": lambda p: p.write_text("{not json"), "complete.json": os.remove}
    for name, damage in damages.items():
        run = tmp_path / ("run-" + name)
        shutil.copytree(base, run)
        damage(run / "checkpoints" / "step-000007" / name)
        capsys.readouterr()
        s = ft.run(args(mixtral, data, run, resume=True, **kw))
        err = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
        assert len(err) == 1 and "step-000007" in err[0] and name in err[0], err
        assert s["status"] == "finished" and same_weights(str(tmp_path / "ref"), str(run)), name
        assert strip(tmp_path / "ref") == strip(run), name
        assert (run / "checkpoints" / "damaged-step-000007" / "complete.json").exists() or name == "complete.json"
    # nothing intact: one error naming each checkpoint's damage
    for d in ft.checkpoint_dirs(str(base)):
        truncate(Path(d) / "optimizer.safetensors")
    with pytest.raises(FinetuneError,
                       match=r"no intact checkpoint.*step-000007: optimizer.safetensors.*step-000006: optim"):
        ft.run(args(mixtral, data, base, resume=True, **kw))


def test_sigint_saves_a_checkpoint_and_resume_matches(tmp_path, data, mixtral):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "revengine", "finetune", "--model", mixtral, "--data", data, "--out", str(out),
           "--scheme", "additive", "--stage1-steps", "0", "--steps", "400", "--lr", "1e-3", "--save-every", "0",
           "--no-progress", "--eval-max-examples", "4", "--threads", "1", "--batch-size", "4"]
    env = child_env(OMP_NUM_THREADS="1")
    # cwd: `python -m` puts the working directory first on sys.path, which must not be a source checkout
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and sum(1 for line in open(log) if '"stage"' in line) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    assert "continue with --resume" in text
    assert not (out / "config.json").exists()  # nothing that looks finished
    ckpts = ft.checkpoint_dirs(str(out))
    assert len(ckpts) == 1
    stopped = json.load(open(os.path.join(ckpts[0], ft.STATE_FILE)))["step"]
    assert 3 <= stopped < 400
    kw = dict(scheme="additive", stage1_steps=0, steps=400, lr=1e-3, stage1_lr=None, save_every=0, eval_max_examples=4,
              batch_size=4)
    ft.run(args(mixtral, data, out, resume=True, **kw))
    ft.run(args(mixtral, data, tmp_path / "ref", **kw))
    assert same_weights(str(tmp_path / "ref"), str(out))


# ---------------------------------------------------------------------------------------------
# Baselines and other inputs


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "hf-gradient-checkpointing"])
def test_scheme_none_finetunes_the_hf_model(tmp_path, data, mixtral, ckpt):
    s = ft.run(args(mixtral, data, tmp_path / "out", scheme="none", stage1_steps=0, steps=12, gradient_checkpointing=ckpt))
    ev = s["evals"]
    assert "original" not in ev and ev["final"]["loss"] < ev["start"]["loss"] - 0.3
    assert s["timings"]["stage2_peak_rss_mb"] > 0 and s["timings"]["stage2_median_step_s"] > 0
    m = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(m).__name__ == "MixtralForCausalLM"


def test_upcycled_dense_llama_and_continued_finetuning(tmp_path, data):
    llama = save_tiny(tmp_path / "llama", "llama")
    s = ft.run(args(llama, data, tmp_path / "a", scheme="leapfrog", upcycle_experts=4, upcycle_top_k=2))
    ev = s["evals"]
    assert ev["final"]["loss"] < ev["start"]["loss"]
    assert ev["start"]["loss"] == pytest.approx(ev["original"]["loss"], abs=0.2)
    # a finished revengine model is itself a valid --model (stage 2 only)
    s2 = ft.run(args(str(tmp_path / "a"), data, tmp_path / "b", scheme="leapfrog", stage1_steps=0, steps=6))
    assert s2["evals"]["start"]["loss"] == pytest.approx(ev["final"]["loss"], rel=1e-5)
    assert s2["evals"]["final"]["loss"] < s2["evals"]["start"]["loss"]


def test_text_records_and_explicit_eval_split(tmp_path, mixtral):
    from revengine.models import corpus
    text = corpus.TEXT.split("\n")
    ft.write_jsonl([{"text": t} for t in text[:-8] if t], str(tmp_path / "tr.jsonl"))
    ft.write_jsonl([{"text": t} for t in text[-8:] if t], str(tmp_path / "ev.jsonl"))
    s = ft.run(args(mixtral, str(tmp_path / "tr.jsonl"), tmp_path / "out", eval_data=str(tmp_path / "ev.jsonl"),
                    scheme="midpoint", max_length=64))
    ev = s["evals"]
    assert "exact_match" not in ev["final"] and ev["final"]["loss"] < ev["start"]["loss"]


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing in --out


def _refused(tmp_path, a, match):
    with pytest.raises(FinetuneError, match=match):
        ft.run(a)
    out = a.out
    assert not os.path.exists(out) or not os.listdir(out), os.listdir(out)


def test_unsupported_architectures(tmp_path, data):
    llama = save_tiny(tmp_path / "llama", "llama")
    _refused(tmp_path, args(llama, data, tmp_path / "o1"), r"model_type='llama'.*--upcycle-experts")
    tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=260)).save_pretrained(str(tmp_path / "gpt2"))
    _refused(tmp_path, args(str(tmp_path / "gpt2"), data, tmp_path / "o2"), r"unsupported architecture model_type='gpt2'")
    _refused(tmp_path, args(str(tmp_path), data, tmp_path / "o3"), "no config.json")


def test_checkpoint_of_another_shape(tmp_path, data):
    m = save_tiny(tmp_path / "m")
    cfg = json.load(open(os.path.join(m, "config.json")))
    cfg["intermediate_size"] = 40
    json.dump(cfg, open(os.path.join(m, "config.json"), "w"))
    _refused(tmp_path, args(m, data, tmp_path / "out"), r"does not fit its config.*experts")


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n{"prompt": "3+3=" "answer": "6"}\n',
     r"train.jsonl:3: not valid JSON"),
    ('{"text": "ok"}\n\n{"question": "no"}\n', r"train.jsonl:3: expected an object"),
    ('["a list"]\n', r"train.jsonl:1: expected an object"),
    ("", r"no examples \(the file is empty\)"),
    ("\n  \n", r"no examples"),
], ids=["bad-json", "wrong-keys", "not-object", "empty", "blank"])
def test_malformed_data(tmp_path, mixtral, content, match):
    p = tmp_path / "train.jsonl"
    p.write_text(content)
    _refused(tmp_path, args(mixtral, str(p), tmp_path / "out"), match)


@pytest.mark.parametrize("content,match", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"train.jsonl:2: not UTF-8 text"),
    (b'{"text": ""}\n' * 20, r"train.jsonl: the training split has no target tokens"),
    (b'{"prompt": "", "answer": "1"}\n' * 20, r"train.jsonl:1: empty 'prompt'"),
], ids=["not-utf8", "no-targets", "empty-prompts"])
def test_data_without_anything_to_train_on(tmp_path, mixtral, content, match):
    p = tmp_path / "train.jsonl"
    p.write_bytes(content)
    _refused(tmp_path, args(mixtral, str(p), tmp_path / "out"), match)


@pytest.mark.parametrize("flag,value", [
    ("lr", float("nan")), ("lr", float("inf")), ("stage1_lr", float("nan")), ("weight_decay", -1.0),
    ("threads", -1), ("threads", 0), ("max_grad_norm", float("nan")), ("max_grad_norm", -1.0),
    ("eval_max_examples", -1), ("kl_weight", float("nan")),
    ("bdia_gamma", float("nan")), ("bdia_gamma", float("inf")), ("bdia_gamma", 0.0), ("bdia_gamma", -0.25),
    ("bdia_gamma", 2.0)])
def test_bad_numbers_are_errors_naming_the_flag(tmp_path, data, mixtral, flag, value):
    scheme = "bdia" if flag == "bdia_gamma" else "revffn"
    _refused(tmp_path, args(mixtral, data, tmp_path / "out", scheme=scheme, **{flag: value}),
             f"--{flag.replace('_', '-')} must be")


GAMMA = "--bdia-gamma must be a finite number in (0, 1] (2^-k, k = 1..8), got "


@pytest.mark.parametrize("flags,message", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--scheme", "bdia", "--bdia-gamma", "nan"], GAMMA + "nan"),
    (["--scheme", "bdia", "--bdia-gamma=-inf"], GAMMA + "-inf"),  # '-inf' alone would read as an option
    (["--scheme", "bdia", "--bdia-gamma", "1.5"], GAMMA + "1.5"),
    (["--bdia-gamma", "0"], GAMMA + "0.0"),  # whatever --scheme
], ids=["lr-nan", "bdia-gamma-nan", "bdia-gamma-neg-inf", "bdia-gamma-above-1", "bdia-gamma-0-revffn"])
def test_cli_bad_number_is_one_line_and_writes_nothing(tmp_path, data, mixtral, capsys, flags, message):
    from revengine.apps.cli import main
    out = tmp_path / "o"
    assert main(["finetune", "--model", mixtral, "--data", data, "--out", str(out), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and message in err, err
    assert not out.exists()


def test_vocabulary_mismatch(tmp_path, data):
    small = save_tiny(tmp_path / "small", vocab=200)
    _refused(tmp_path, args(small, data, tmp_path / "out"), r"vocabulary mismatch.*257")


def test_out_dir_and_argument_checks(tmp_path, data, mixtral):
    out = tmp_path / "out"
    ft.run(args(mixtral, data, out, steps=2, stage1_steps=0))
    with pytest.raises(FinetuneError, match="already holds a finished model"):
        ft.run(args(mixtral, data, out))
    with pytest.raises(FinetuneError, match="--scheme none"):
        ft.run(args(mixtral, data, tmp_path / "x", scheme="none", stage1_steps=3))
    with pytest.raises(FinetuneError, match="--batch-size"):
        ft.run(args(mixtral, data, tmp_path / "y", batch_size=0))
    with pytest.raises(FinetuneError, match="fewer than --batch-size"):
        ft.run(args(mixtral, data, tmp_path / "z", batch_size=1000))
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_run_that_dies_before_its_first_checkpoint_leaves_out_reusable(tmp_path, data, mixtral, monkeypatch):
    out = tmp_path / "out"
    real_eval, real_losses = ft.recipe.evaluate, ft.recipe.model_losses
    calls = {"eval": 0, "step": 0}

    def eval_then_ctrl_c(*a, **kw):  # Ctrl-C during the first eval of the student (after the original's)
        calls["eval"] += 1
        if calls["eval"] == 2:
            raise KeyboardInterrupt
        return real_eval(*a, **kw)

    def fail_in_step_two(*a, **kw):
        calls["step"] += 1
        if calls["step"] == 2:
            raise RuntimeError("injected")
        return real_losses(*a, **kw)

    for name, fault, exc in (("evaluate", eval_then_ctrl_c, KeyboardInterrupt),
                             ("model_losses", fail_in_step_two, RuntimeError)):
        with monkeypatch.context() as m:
            m.setattr(ft.recipe, name, fault)
            with pytest.raises(exc):
                ft.run(args(mixtral, data, out, stage1_steps=0, steps=3))
        assert os.listdir(out) == ["log.jsonl"] and not ft.checkpoint_dirs(str(out))
        with pytest.raises(FinetuneError, match="no checkpoint"):  # nothing to resume...
            ft.run(args(mixtral, data, out, stage1_steps=0, steps=3, resume=True))
    # ...and a save killed mid-way leaves only its temporary folder
    (out / "checkpoints" / ".tmp-step-000001-x").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-000001-x" / "model.safetensors").write_bytes(b"partial")
    s = ft.run(args(mixtral, data, out, stage1_steps=0, steps=3))  # ...so the same command starts over
    assert s["status"] == "finished"
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r.get("eval") for r in log if "eval" in r] == ["original", "start", "final"]
    assert [r["step"] for r in log if "stage" in r] == [1, 2, 3]
    # anything else in --out is still refused
    for name, content in (("notes.txt", "mine"), ("log.jsonl", "not a run's log\n")):
        other = tmp_path / ("o-" + name)
        other.mkdir()
        (other / name).write_text(content)
        with pytest.raises(FinetuneError, match="already holds files"):
            ft.run(args(mixtral, data, other, stage1_steps=0, steps=3))
        assert os.listdir(other) == [name] and (other / name).read_text() == content


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_option_trains_there_and_resumes_across_devices(tmp_path, data, mixtral, device):
    out = tmp_path / "out"
    s = ft.run(args(mixtral, data, out, scheme="bdia", stage1_steps=0, steps=6, device=device, bf16=True,
                    stop_after=3))
    assert s["status"] == "interrupted"
    # a --resume may move the run to another device (the checkpoint is device-free)
    s = ft.run(args(mixtral, data, out, scheme="bdia", stage1_steps=0, steps=6, device="cpu", bf16=True,
                    resume=True))
    assert s["status"] == "finished" and s["step"] == 6
    assert s["evals"]["final"]["loss"] < s["evals"]["start"]["loss"]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log if "stage" in r] == list(range(1, 7))
    if device == "cuda":
        from safetensors.torch import load_file
        rng = load_file(sorted((out / "checkpoints").glob("step-*"))[0] / "rng.safetensors")
        assert "cuda" in rng  # the GPU generator (bdia's signs, dropout) is part of a checkpoint
        s = ft.run(args(mixtral, data, tmp_path / "gpu", scheme="bdia", stage1_steps=0, steps=2, device="cuda"))
        assert s["timings"]["stage2_peak_cuda_mb"] > 0


def test_bad_device_is_a_clear_error(tmp_path, data, mixtral):
    for device, match in (("tpu", "--device: expected 'cpu' or 'cuda\\[:i\\]', got 'tpu'"),
                          ("cuda:99", "--device: 'cuda:99'")):
        with pytest.raises(FinetuneError, match=match):
            ft.run(args(mixtral, data, tmp_path / device, device=device))
        assert not (tmp_path / device).exists()


def test_cli_reports_errors_with_status_2(tmp_path, mixtral):
    from revengine.apps.cli import main
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{oops\n')
    assert main(["finetune", "--model", mixtral, "--data", str(p), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Pieces


def test_arithmetic_records():
    recs = ft.arithmetic_records(50, digits=3, seed=4)
    assert recs == ft.arithmetic_records(50, digits=3, seed=4) and len(recs) == 50
    for r in recs:
        expr = r["prompt"][3:-1]
        assert eval(expr) == int(r["answer"])  # noqa: S307  (our own generated digits)
    assert len({r["prompt"] for r in recs}) == 50


class _Oracle(torch.nn.Module):
    """A 'model' whose next token is the byte after the longest known prompt, then the answer's bytes."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.training = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, labels=None,
                past_key_values=None, use_cache=False, **kw):
        tok = ft.ByteTokenizer()
        if past_key_values is not None:  # its "cache" is the ids so far: the caller passes only new ones
            input_ids = torch.cat([past_key_values, input_ids], 1)
        out = torch.full((input_ids.shape[0], 1, 257), -1e9)
        for i, row in enumerate(input_ids.tolist()):
            text = tok.decode([t for t, m in zip(row, attention_mask[i].tolist()) if m])
            nxt = 256
            for prompt, answer in self.table.items():
                if text.startswith(prompt):
                    done = text[len(prompt):]
                    nxt = ord(answer[len(done)]) if len(done) < len(answer) else 256
            out[i, 0, nxt] = 0.0
        return tf.modeling_outputs.CausalLMOutputWithPast(
            logits=out, loss=torch.tensor(0.0) if labels is not None else None,
            past_key_values=input_ids if use_cache else None)


def test_exact_match_counts_greedy_answers():
    tok = ft.ByteTokenizer()
    recs = [{"prompt": "Q: 1+1=", "answer": "2"}, {"prompt": "Q: 10+5=", "answer": "15"},
            {"prompt": "Q: 7-9=", "answer": "-2"}, {"prompt": "Q: 3+3=", "answer": "6"}]
    exs = ft.encode_records(recs, tok, 64, 257, "t")
    oracle = _Oracle({"Q: 1+1=": "2", "Q: 10+5=": "15", "Q: 7-9=": "-3", "Q: 3+3=": "66"})
    res = ft.evaluate(oracle, exs, tok, batch_size=3)
    assert res["exact_match"] == pytest.approx(0.5) and res["exact_match_n"] == 4


def _greedy_without_cache(model, prompts, max_new, pad, eos):
    """The reference: every step runs the whole left-padded prefix."""
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    new, done = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(max_new):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                done[i] = t == eos
                if not done[i]:
                    new[i].append(t)
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return new


@pytest.mark.parametrize("kind", ["hf", "revengine"])
def test_greedy_continue_with_cache_equals_full_prefix_decoding(kind):
    """greedy_continue feeds one token per step with the model's key/value cache; with left padding and
    explicit positions it must pick what decoding the whole prefix every step picks."""
    from revengine import convert

    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tiny_config("mixtral"))
    if kind == "revengine":
        model = convert.from_hf(model, scheme="bdia")
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 100, (n,), generator=g).tolist() for n in (3, 7, 5, 1)]
    widths = []  # tokens fed per call: the prompt once per batch, then one at a time (the cache is used)
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    got = ft.greedy_continue(model, prompts, max_new=6, pad=0, eos=-1, batch=3)
    hook.remove()
    assert widths == [7] + [1] * 5 + [1] + [1] * 5, widths
    assert got == _greedy_without_cache(model, prompts, 6, 0, -1)


def test_collate_masks_prompts_and_padding():
    tok = ft.ByteTokenizer()
    exs = ft.encode_records([{"prompt": "ab", "answer": "c"}, {"text": "hello"}], tok, 64, 257, "t")
    b = ft.collate(exs, tok.pad_token_id)
    assert b["labels"][0].tolist() == [-100, -100, ord("c"), 256, -100, -100]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert b["labels"][1].tolist() == list(b"hello") + [256]


# ---------------------------------------------------------------------------------------------
# Hugging Face Trainer


def test_converted_model_trains_under_hf_trainer(tmp_path, mixtral):
    pytest.importorskip("accelerate")
    from revengine.convert import from_hf
    torch.manual_seed(0)
    model = from_hf(tf.MixtralForCausalLM.from_pretrained(mixtral), scheme="revffn")
    tok = ft.ByteTokenizer()
    exs = ft.encode_records(ft.arithmetic_records(64, seed=2), tok, 32, 257, "t")

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(exs)

        def __getitem__(self, i):
            return exs[i]

    grads = []

    class GradProbe(tf.TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, **kw):
            g = [p.grad for p in model.parameters() if p.grad is not None]
            grads.append((len(g), all(bool(torch.isfinite(t).all()) for t in g)))

    targs = tf.TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, max_steps=25, learning_rate=3e-3, logging_steps=1,
                                 report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                                 remove_unused_columns=False, seed=0)
    trainer = tf.Trainer(model=model, args=targs, train_dataset=DS(),
                         data_collator=lambda b: ft.collate(b, tok.pad_token_id), callbacks=[GradProbe()])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert len(grads) == 25 and all(n == len(list(model.parameters())) and ok for n, ok in grads)


# ---------------------------------------------------------------------------------------------
# Low-memory training state: --optimizer adamw|adamw8bit|adamw4bit, --weights fp32|bf16, --in-backward

LOWBIT = [("adamw", "fp32", False), ("adamw", "fp32", True), ("adamw", "bf16", True),
          ("adamw8bit", "fp32", False), ("adamw8bit", "bf16", False), ("adamw8bit", "bf16", True),
          ("adamw4bit", "fp32", True), ("adamw4bit", "bf16", True)]


@pytest.mark.parametrize("optimizer,wdtype,in_backward", LOWBIT)
def test_optimizer_weights_and_in_backward_train(tmp_path, data, mixtral, optimizer, wdtype, in_backward):
    if optimizer != "adamw" or wdtype != "fp32":
        pytest.importorskip("torchao")
    out = tmp_path / "out"
    s = ft.run(args(mixtral, data, out, scheme="bdia", stage1_steps=0, steps=6, lr=1e-2, optimizer=optimizer,
                    weights=wdtype, in_backward=in_backward))
    assert s["status"] == "finished" and s["evals"]["final"]["loss"] < s["evals"]["start"]["loss"] - 0.3, s["evals"]
    sd = weights(str(out))
    want = torch.bfloat16 if wdtype == "bf16" else torch.float32
    assert all(t.dtype == want for t in sd.values() if t.is_floating_point())
    log = [json.loads(line) for line in open(out / "log.jsonl") if "stage" in line]
    assert len(log) == 6 and all(np.isnan(r["grad_norm"]) == in_backward for r in log)


def test_resume_is_bit_identical_with_8bit_state_bf16_weights_in_backward(tmp_path, data, mixtral):
    pytest.importorskip("torchao")
    kw = dict(scheme="revffn", stage1_steps=3, steps=5, save_every=2, optimizer="adamw8bit", weights="bf16",
              in_backward=True)
    ref = ft.run(args(mixtral, data, tmp_path / "ref", **kw))
    out = tmp_path / "run"
    for i, k in enumerate((2, 3)):  # inside stage 1, then across the stage boundary
        assert ft.run(args(mixtral, data, out, resume=i > 0, stop_after=k, **kw))["status"] == "interrupted"
    s = ft.run(args(mixtral, data, out, resume=True, **kw))
    assert s["status"] == "finished" and ref["status"] == "finished"
    assert same_weights(str(tmp_path / "ref"), str(out))

    def strip(p):
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in open(p / "log.jsonl")]
    assert strip(tmp_path / "ref") == strip(out)
    # the quantized state went through a checkpoint: its codes and scales are plain tensors there
    from safetensors import safe_open
    ckpt = ft.checkpoint_dirs(str(out))[-1]
    with safe_open(os.path.join(ckpt, "optimizer.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
        assert any(k.endswith(".codes") for k in keys) and all(fh.get_tensor(k).dtype != torch.uint8 or
                                                               k.endswith(".codes") for k in keys)


def test_checkpoint_files_hold_no_pickle(tmp_path, data, mixtral):
    pytest.importorskip("torchao")
    out = tmp_path / "out"
    ft.run(args(mixtral, data, out, scheme="bdia", stage1_steps=0, steps=4, stop_after=2, optimizer="adamw4bit",
                weights="bf16", in_backward=True))
    (ckpt,) = ft.checkpoint_dirs(str(out))
    names = sorted(os.listdir(ckpt))
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    for n in names:
        raw = open(os.path.join(ckpt, n), "rb").read()
        assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:2], n  # no zip (torch.save), no pickle
    # the state file is readable without torchao's classes being unpickled: JSON metadata + tensors
    from revengine.optim import load_state_dict_file
    sd = load_state_dict_file(os.path.join(ckpt, "optimizer.safetensors"))
    assert sd["n"] > 0 and type(sd["per_parameter"][0]["state"][0]["exp_avg"]).__name__.startswith(("OptimState",
                                                                                                      "Tensor"))


@pytest.mark.parametrize("kw,match", [
    (dict(optimizer="adam8bit"), r"--optimizer must be one of \('adamw', 'adamw8bit', 'adamw4bit'\), got 'adam8bit'"),
    (dict(weights="fp16"), r"--weights must be one of \('fp32', 'bf16'\), got 'fp16'"),
    (dict(in_backward=True, grad_accum=2), "--in-backward .* use --grad-accum 1"),
    (dict(state_device="cpu"), "--state-device .* needs --in-backward"),
    (dict(scheme="leapfrog", weights="bf16"), "--weights bf16 cannot be honoured by --scheme leapfrog"),
])
def test_bad_optimizer_settings_are_refused_before_writing(tmp_path, data, mixtral, kw, match):
    out = tmp_path / "out"
    with pytest.raises(FinetuneError, match=match):
        ft.run(args(mixtral, data, out, **kw))
    assert not out.exists()


@pytest.mark.parametrize("kw,flag", [(dict(optimizer="adamw8bit"), "--optimizer adamw8bit"),
                                     (dict(weights="bf16"), "--weights bf16")])
def test_missing_torchao_is_one_clear_error(tmp_path, data, mixtral, monkeypatch, capsys, kw, flag):
    import revengine.apps.finetune.args as fargs
    monkeypatch.setattr(fargs, "torchao_available", lambda: False)
    out = tmp_path / "out"
    with pytest.raises(FinetuneError, match=f"{flag} needs torchao, which is not installed: pip install"):
        ft.run(args(mixtral, data, out, **kw))
    assert not out.exists()


def test_bf16_weights_on_a_gpu_without_bf16_are_refused(tmp_path, data, mixtral, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    import revengine.apps.finetune.args as fargs
    monkeypatch.setattr(fargs.memory, "check_device", lambda d: None)
    with pytest.raises(FinetuneError, match="--weights bf16: cuda has no bf16 support"):
        ft.run(args(mixtral, data, tmp_path / "out", weights="bf16", device="cuda"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# --offload: stage 2's layers between uses in a store (revengine.offload)


@pytest.mark.parametrize("optimizer,wdtype", [("adamw", "fp32"), ("adamw8bit", "bf16")])
def test_offload_disk_is_bit_identical_and_resumes(tmp_path, data, mixtral, optimizer, wdtype, capsys, monkeypatch):
    """Stage 1 in memory, 10 steps of stage 2 with every layer on disk between uses: the same weights,
    losses and evals as without; stopped and resumed (the checkpoint, not the store, is what a resume reads),
    still the same. The store is in <out>/offload. The tiny model's embedding and head come in row
    slices, as a real model's do (slices of 1024 elements here: several per end)."""
    if optimizer != "adamw":
        pytest.importorskip("torchao")
    from revengine import optim
    from revengine.offload import LayerStore
    monkeypatch.setattr(optim, "SLICE_ELEMENTS", 1024)
    streamed = []
    real_init = LayerStore.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        streamed.append([end.streamed for end in self.ends])
    monkeypatch.setattr(LayerStore, "__init__", init)
    kw = dict(scheme="bdia", stage1_steps=2, steps=10, save_every=2, in_backward=True, optimizer=optimizer,
              weights=wdtype)
    ref = ft.run(args(mixtral, data, tmp_path / "ref", **kw))
    out = tmp_path / "run"
    assert ft.run(args(mixtral, data, out, offload="disk", stop_after=6, **kw))["status"] == "interrupted"
    assert (out / "offload" / "store.json").exists()
    assert ("--offload disk: the whole model is built in memory first, and its layers go to the store for stage 2 "
            "(stage 1 (--stage1-steps) trains in memory)") in capsys.readouterr().out
    s = ft.run(args(mixtral, data, out, offload="disk", resume=True, **kw))
    assert s["status"] == "finished" and ref["status"] == "finished"
    assert same_weights(str(tmp_path / "ref"), str(out))

    def strip(p):
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in open(p / "log.jsonl")]
    assert strip(tmp_path / "ref") == strip(out)
    with open(out / "offload" / "store.json") as fh:
        assert json.load(fh)["step"] == 6  # the resumed process's six stage-2 steps
    assert streamed and all(ends == [True, True] for ends in streamed)


@pytest.mark.parametrize("kw,match", [
    (dict(offload="ssd"), r"--offload must be one of \('none', 'host', 'disk'\), got 'ssd'"),
    (dict(offload="disk"), "--offload disk .* needs --in-backward"),
    (dict(offload="disk", in_backward=True, reversible_mode="checkpoint"), "--reversible-mode reversible"),
    (dict(offload="host", in_backward=True), r"--offload host .* \(--device cuda\); on the CPU use --offload disk"),
    (dict(offload_dir="x", in_backward=True), "--offload-dir is the folder of --offload disk"),
    (dict(offload="disk", in_backward=True, state_device="cpu"), "drop --state-device"),
])
def test_bad_offload_settings_are_refused_before_writing(tmp_path, data, mixtral, kw, match):
    out = tmp_path / "out"
    with pytest.raises(FinetuneError, match=match):
        ft.run(args(mixtral, data, out, scheme="bdia", **kw))
    assert not out.exists()


def test_unwritable_offload_dir_is_one_error(tmp_path, data, mixtral):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = tmp_path / "out"
    with pytest.raises(FinetuneError, match=r"--offload-dir .*file/store: cannot create it"):
        ft.run(args(mixtral, data, out, scheme="bdia", stage1_steps=0, steps=2, in_backward=True, offload="disk",
                    offload_dir=str(blocker / "store")))


@pytest.mark.parametrize("optimizer,wdtype", [("adamw", "fp32"), ("adamw8bit", "bf16")])
def test_offload_disk_streams_the_checkpoint_into_the_store(tmp_path, data, optimizer, wdtype):
    """--offload disk from an HF checkpoint without stage 1: the decoder layers go from the checkpoint's
    files into the store one at a time (the whole model is never in memory), the store is the checkpoint
    of weights and optimizer state, the final model is written a layer at a time. Same weights, losses and
    evals as the in-memory run; stopped, and resumed from a checkpoint one step behind the store (a kill
    between the store's commit and the checkpoint), still the same."""
    if optimizer != "adamw":
        pytest.importorskip("torchao")
    model = save_tiny(tmp_path / "qwen", "qwen2_moe")
    kw = dict(scheme="bdia", stage1_steps=0, steps=5, in_backward=True, optimizer=optimizer, weights=wdtype,
              eval_every=2, distill="none")
    ref = ft.run(args(model, data, tmp_path / "ref", **kw))
    out = tmp_path / "run"
    assert ft.run(args(model, data, out, offload="disk", stop_after=3, **kw))["status"] == "interrupted"
    ckpts = ft.checkpoint_dirs(str(out))
    assert [os.path.basename(c) for c in ckpts] == ["step-000002", "step-000003"]
    assert not os.path.exists(os.path.join(ckpts[-1], "model.safetensors"))  # the store holds the weights
    shutil.rmtree(ckpts[-1])  # killed after the store committed step 3, before the checkpoint of it
    s = ft.run(args(model, data, out, offload="disk", resume=True, **kw))
    assert s["status"] == "finished" and ref["status"] == "finished"
    assert same_weights(str(tmp_path / "ref"), str(out))
    assert RevMoEForCausalLM.from_pretrained(str(out)).config.block_type == "bdia"

    def strip(p):
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in open(p / "log.jsonl")]
    assert strip(tmp_path / "ref") == strip(out)
    # a resume that would not stream cannot use these checkpoints
    with pytest.raises(FinetuneError, match="keeps its weights in the layer store .*resume with --offload disk"):
        ft.run(args(model, data, out, resume=True, **{**kw, "steps": 6}))


def test_in_backward_global_clipping_is_torchs_also_streamed(tmp_path, data):
    """--in-backward --clip global clips by the whole model's gradient norm (a first forward + backward
    measures it, a second one steps): the same norms as torch's clip_grad_norm_ in a run without
    --in-backward and the same weights up to float rounding, while per-tensor clipping ends elsewhere;
    with the layers streamed into the store (--offload disk), bit-identical to the run in memory."""
    model = save_tiny(tmp_path / "qwen", "qwen2_moe")
    kw = dict(scheme="bdia", stage1_steps=0, steps=3, max_grad_norm=0.05, distill="none", eval_max_examples=0)
    runs = {"plain": {}, "global": dict(in_backward=True, clip="global"),
            "streamed": dict(in_backward=True, clip="global", offload="disk"), "per-tensor": dict(in_backward=True)}
    for name, extra in runs.items():
        assert ft.run(args(model, data, tmp_path / name, **kw, **extra))["status"] == "finished"
    log = {name: [r for r in map(json.loads, open(tmp_path / name / "log.jsonl")) if "grad_norm" in r] for name in runs}
    norms = [r["grad_norm"] for r in log["plain"]]
    assert min(norms) > 0.05  # clipping was active at every step
    assert [r["grad_norm"] for r in log["global"]] == pytest.approx(norms, rel=1e-5)
    assert [r["loss"] for r in log["global"]] == pytest.approx([r["loss"] for r in log["plain"]], rel=1e-5)
    assert same_weights(str(tmp_path / "global"), str(tmp_path / "streamed"))
    assert [r["loss"] for r in log["global"]] == [r["loss"] for r in log["streamed"]]
    ref = weights(str(tmp_path / "plain"))

    def off(name):
        w = weights(str(tmp_path / name))
        return max(float((w[k] - ref[k]).abs().max()) for k in ref)
    assert off("global") < 1e-6 and off("per-tensor") > 100 * max(off("global"), 1e-6), \
        (off("global"), off("per-tensor"))


@pytest.mark.parametrize("kw,match", [
    (dict(clip="global"), "--clip chooses how --in-backward clips"),
    (dict(clip="norm", in_backward=True), r"--clip must be one of \('per-tensor', 'global'\), got 'norm'"),
    (dict(clip="global", in_backward=True, max_grad_norm=0.0), "--clip global clips to --max-grad-norm"),
])
def test_bad_clip_settings_are_refused_before_writing(tmp_path, data, mixtral, kw, match):
    out = tmp_path / "out"
    with pytest.raises(FinetuneError, match=match):
        ft.run(args(mixtral, data, out, scheme="bdia", **kw))
    assert not out.exists()
