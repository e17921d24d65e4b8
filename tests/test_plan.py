"""`revengine plan`: config parsing, parameter and activation counts against real models, the
strategies' formulas, the command line and its one-line errors, the benchmark's smoke run."""
import json
import os

import pytest
import torch

from conftest import child_env, load_benchmark, run_python
from revengine.apps import plan

tf = pytest.importorskip("transformers")

REAL = {"qwen1.5-moe-a2.7b": 14.3e9, "olmoe-1b-7b": 6.92e9, "qwen3-30b-a3b": 30.5e9, "mixtral-8x7b": 46.7e9}
# Small configs of every family (and of the two measured models' layouts), shrunk from the presets.
SMALL = dict(hidden_size=64, num_hidden_layers=2, vocab_size=300, moe_intermediate_size=24, intermediate_size=40,
             shared_expert_intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)


def small_config(preset: str, **over) -> dict:
    cfg = plan.read_config_json(plan.resolve_config(preset))
    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    for k, v in SMALL.items():
        if k in keep or k in ("num_key_value_heads",):
            keep[k] = v
    if "head_dim" in keep:
        keep["head_dim"] = 16
    keep.update(over)
    return keep


def hf_model(cfg: dict):
    c = dict(cfg)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(c.pop("model_type"), **c))


def test_presets_are_the_public_models():
    assert {"qwen1.5-moe-a2.7b", "olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b", "qwen-moe-mini",
            "smollm2-moe"} <= set(plan.presets())
    for name, n in REAL.items():
        s = plan.load_shapes(name)
        assert abs(s.params() / n - 1) < 0.01, (name, s.params())
    mini = plan.load_shapes("qwen-moe-mini")
    assert round(4 * mini.params() / 2**20) == 304  # the README's measured weights, MiB


@pytest.mark.parametrize("preset", ["qwen1.5-moe-a2.7b", "olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b",
                                    "qwen-moe-mini", "smollm2-moe"])
def test_parameter_count_equals_the_model(preset):
    cfg = small_config(preset)
    model = hf_model(cfg)
    shapes = plan.Shapes.from_config(cfg, "small")
    assert shapes.params() == sum(p.numel() for p in model.parameters())
    assert shapes.largest_tensor() == max(p.numel() for p in model.parameters())
    from revengine.convert import from_hf

    for scheme in ("bdia", "revffn"):
        rev = from_hf(model, scheme=scheme)
        assert shapes.params(scheme) == sum(p.numel() for p in rev.parameters()), scheme


@pytest.mark.parametrize("preset", ["qwen-moe-mini", "smollm2-moe", "qwen3-30b-a3b", "olmoe-1b-7b"])
def test_saved_activation_elements_per_layer(preset):
    """The elements per token per layer the formulas count are what autograd saves in HF's layer."""
    cfg = small_config(preset, hidden_size=128, vocab_size=64)
    T = 256

    def saved(layers):
        model = hf_model(dict(cfg, num_hidden_layers=layers))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
            return t

        ids = torch.randint(0, cfg["vocab_size"], (1, T), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False)
        return sum(seen.values()) / 4 / T

    per_layer = saved(2) - saved(1)
    counted = plan.Shapes.from_config(cfg, "small").layer_elements()
    assert abs(counted / per_layer - 1) < 0.05, (counted, per_layer)


def test_strategies_order_and_parts():
    s = plan.load_shapes("qwen1.5-moe-a2.7b")
    preds = {p.strategy: p for p in plan.plan(s, [plan.Strategy.parse(t) for t in plan.DEFAULT_STRATEGIES], 1, 4096)}
    plain, ck = preds["hf-plain/adamw/fp32"], preds["hf-checkpoint/adamw/fp32"]
    rev, rev_ib = preds["rev-bdia/adamw/fp32"], preds["rev-bdia/adamw/fp32/in-backward"]
    low = preds["rev-bdia/adamw4bit/bf16/in-backward"]
    assert plain.total >= ck.total >= rev.total > rev_ib.total > low.total
    assert plain.parts["weights"] == 4 * s.params() and plain.parts["optimizer"] == 8 * s.params()
    assert low.parts["weights"] == 2 * s.params() and low.parts["optimizer"] < 1.1 * s.params()
    assert rev_ib.parts["grads"] < 0.1 * rev.parts["grads"]
    for p in preds.values():
        assert abs(sum(p.parts.values()) - p.total) < 1


def test_stored_activations_per_added_layer():
    """Per layer and token: plain stores the layer's activations, checkpointing one fp32 hidden state,
    BDIA 4 bits per element plus the routing ids (uint8), RevFFN the routing ids only."""
    import dataclasses

    s = plan.load_shapes("qwen-moe-mini")
    deep = dataclasses.replace(s, layers=s.layers + 1)
    T = 8 * 1024
    growth = {}
    for name in ("hf-plain", "hf-checkpoint", "rev-bdia", "rev-revffn"):
        st = plan.Strategy.parse(name)
        growth[name] = (plan.phases(deep, st, 8, 1024)["loss"]["stored"] - plan.phases(s, st, 8, 1024)["loss"]["stored"]) / T
    assert growth["hf-plain"] == pytest.approx(4 * s.layer_elements() * plan.CAL["hf_store"])
    assert growth["hf-checkpoint"] == 4 * s.hidden
    assert growth["rev-bdia"] == s.hidden / 2 + s.top_k
    assert growth["rev-revffn"] == s.top_k


def test_longest_sequence_is_the_boundary():
    s = plan.load_shapes("olmoe-1b-7b")
    for text in ("hf-checkpoint/adamw8bit/bf16/in-backward", "rev-bdia/adamw8bit/bf16/in-backward"):
        st = plan.Strategy.parse(text)
        mem = 32 * 2**30
        n = plan.max_seq(s, st, 1, mem)
        assert n > 0
        assert plan.peak(s, st, 1, n)[2] <= mem < plan.peak(s, st, 1, n + 1)[2]
    assert plan.max_seq(s, plan.Strategy.parse("hf-plain"), 1, 32 * 2**30) == 0


@pytest.mark.parametrize("text,expected", [("80GB", 80 * 2**30), ("24GiB", 24 * 2**30), ("24g", 24 * 2**30),
                                           ("141e9", 141e9), ("80", 80 * 2**30), ("512MiB", 512 * 2**20)])
def test_parse_memory(text, expected):
    assert plan.parse_memory(text) == expected


def run_plan(*args):
    return run_python(["-m", "revengine", "plan", *args], env=child_env(), timeout=120)


def test_cli_table_and_json(tmp_path):
    p = run_plan("--config", "mixtral-8x7b", "--seq", "4096", "--memory", "80GB,24GB")
    assert p.returncode == 0, p.stderr
    assert "| rev-bdia/adamw4bit/bf16/in-backward |" in p.stdout
    assert "longest seq @ 80 GiB" in p.stdout and "fits 24 GiB" in p.stdout
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(small_config("qwen3-30b-a3b")))
    for cfg in (str(folder), str(folder / "config.json")):
        p = run_plan("--config", cfg, "--seq", "512", "--memory", "24GiB", "--json", "--strategy", "hf-plain",
                     "--strategy", "rev-bdia/adamw8bit/bf16/in-backward")
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert [r["strategy"] for r in out["strategies"]] == ["hf-plain/adamw/fp32",
                                                              "rev-bdia/adamw8bit/bf16/in-backward"]
        r = out["strategies"][0]
        assert set(r["parts_gib"]) == set(plan.PARTS) and r["fits"] == {"24": True} and r["max_seq"]["24"] > 512
    # the reversible models' options change their working set, not their weights
    st = "rev-bdia/adamw4bit/bf16/in-backward"
    lean = run_plan("--config", "olmoe-1b-7b", "--json", "--strategy", st)
    fat = run_plan("--config", "olmoe-1b-7b", "--json", "--strategy", st, "--moe-chunk-size", "0",
                   "--no-attention-recompute")
    lean, fat = (json.loads(p.stdout)["strategies"][0] for p in (lean, fat))
    assert fat["parts_gib"]["weights"] == lean["parts_gib"]["weights"]
    assert fat["parts_gib"]["layer"] > lean["parts_gib"]["layer"] and fat["total_gib"] > lean["total_gib"]


def test_cli_errors_are_one_line(tmp_path):
    llama = tmp_path / "config.json"
    llama.write_text('{\n  "hidden_size": 64,\n  "model_type": "llama",\n  "vocab_size": 10\n}\n')
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "model_type": "mixtral",\n  "hidden_size": 64,,\n}\n')
    cases = [
        (["--config", "no-such-model"], "--config 'no-such-model': not a preset"),
        (["--config", str(llama)], f"{llama}:3: model_type 'llama' is not supported"),
        (["--config", str(broken)], f"{broken}:3"),
        (["--config", str(tmp_path)], "model_type 'llama'"),
        (["--config", "olmoe-1b-7b", "--seq", "0"], "--seq '0': must be a positive integer"),
        (["--config", "olmoe-1b-7b", "--seq", "-5"], "--seq '-5'"),
        (["--config", "olmoe-1b-7b", "--batch", "x"], "--batch 'x'"),
        (["--config", "olmoe-1b-7b", "--memory", "lots"], "--memory 'lots'"),
        (["--config", "olmoe-1b-7b", "--memory", "80 parsecs"], "--memory '80 parsecs'"),
        (["--config", "olmoe-1b-7b", "--strategy", "deepspeed"], "--strategy 'deepspeed'"),
        (["--config", "olmoe-1b-7b", "--loss-chunk-size", "-3"], "--loss-chunk-size '-3'"),
        (["--config", "olmoe-1b-7b", "--moe-chunk-size", "x"], "--moe-chunk-size 'x'"),
    ]
    for args, needle in cases:
        p = run_plan(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("revengine plan: error: "), (args, p.stderr)
        assert needle in lines[0], (args, lines[0])


def test_plan_check_quick(capsys):
    bench = load_benchmark("plan_check.py")
    pytest.importorskip("torchao")  # the low-memory row's optimizer
    assert bench.main(["--quick", "--strategies", "hf-plain", "rev-bdia-ib", "rev-bdia-8bit"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| qwen-moe-mini |")]
    assert len(rows) == 3 and "rev-bdia/adamw8bit/bf16/in-backward" in out and ("PASS" in out or "FAIL" in out), out


def test_presets_ship_as_package_data():
    """A non-editable install carries the presets: pyproject declares them as package data."""
    import glob

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as fh:
        data = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["revengine.apps"]
    shipped = {os.path.basename(p) for pattern in data for p in glob.glob(os.path.join(root, "revengine", "apps", pattern))}
    assert shipped == {name + ".json" for name in plan.presets()}


def test_offload_strategies_hold_two_layers_and_say_what_moves(capsys):
    """Under offload the device holds, besides what stays (the final norm), at the loss the last layer's
    weights and the head's weights, grads and state; in a layer's re-run two layers' weights, one
    layer's state and its grads; at the embedding's step (the last, once layer 0 is gone) the
    embedding's weights, grad and state. On disk (a CPU model) an end's weights, grads and state come
    a row slice at a time, whatever the optimizer.
    The activations and the loss are those of the model without the store. The store keeps every
    layer and both ends (two slots on disk) and moves 3 weight + 2 state copies of each per step."""
    s = plan.load_shapes("mixtral-8x7b")
    on = plan.Strategy.parse("rev-bdia/adamw8bit/bf16/in-backward")
    off = plan.Strategy.parse("rev-bdia/adamw8bit/bf16/in-backward/offload-host")  # each end whole
    assert off.offload == "host" and off.name.endswith("/offload-host") and not s.tied
    P, Lp, L, E = s.params("bdia"), s.layer_params("bdia"), s.layers, s.vocab * s.hidden
    ob = plan.OPTIMIZERS["adamw8bit"]
    rest = P - L * Lp - 2 * E  # the final norm
    a, ph = plan.phases(s, on, 1, 4096), plan.phases(s, off, 1, 4096)
    assert set(ph) == {"loss", "layer re-run", "embedding's step"}
    assert ph["loss"]["weights"] == (rest + Lp + E) * 2.0 and ph["loss"]["optimizer"] == pytest.approx((rest + E) * ob)
    assert ph["loss"]["grads"] == E * 2.0
    rerun = ph["layer re-run"]
    assert rerun["weights"] == (rest + 2 * Lp) * 2.0 and rerun["optimizer"] == pytest.approx((rest + Lp) * ob)
    assert rerun["grads"] == Lp * 2.0  # (the update makes no temporaries)
    bottom = ph["embedding's step"]
    assert bottom["weights"] == (rest + E) * 2.0 and bottom["optimizer"] == pytest.approx((rest + E) * ob)
    assert bottom["grads"] == E * 2.0
    for name in ("stored", "logits"):
        assert ph["loss"][name] == a["loss"][name]
    assert rerun["layer"] == a["end of backward"]["layer"] and rerun["stored"] == a["loss"]["stored"]
    disk_st = plan.Strategy.parse(on.name + "/offload-disk")
    on_disk = plan.phases(s, disk_st, 1, 4096)  # the ends a row slice at a time; a CPU model's layer objects
    objects = L * plan.CAL["disk_layer_objects"]
    assert on_disk["layer re-run"] == dict(rerun, weights=rerun["weights"] + objects) and s.end_slice() < E
    assert on_disk["loss"]["grads"] == s.end_slice() * 2.0 and on_disk["embedding's step"]["grads"] == s.end_slice() * 2.0
    # torch's AdamW: on disk an end's state is read a row slice at a time (1M elements: 4096 rows of 256)
    big = plan.load_shapes("qwen-moe-mini")
    Lm, Em = big.layer_params("bdia"), big.vocab * big.hidden
    assert big.end_slice() == 4096 * 256 < Em and not big.tied
    disk = plan.phases(big, plan.Strategy.parse("rev-bdia/adamw/fp32/in-backward/offload-disk"), 1, 512)
    host = plan.phases(big, plan.Strategy.parse("rev-bdia/adamw/fp32/in-backward/offload-host"), 1, 512)
    assert host["loss"]["optimizer"] - disk["loss"]["optimizer"] == pytest.approx((Em - big.end_slice()) * 8)
    # and the head itself: the loss reads its weight, and steps its gradient, a slice at a time
    on_cpu = big.layers * plan.CAL["disk_layer_objects"]
    assert host["loss"]["weights"] - disk["loss"]["weights"] == pytest.approx((Em - big.end_slice()) * 4 - on_cpu)
    assert host["loss"]["grads"] == Em * 4 and disk["loss"]["grads"] == big.end_slice() * 4
    # the embedding's too: its lookup reads it, and steps its gradient, a slice at a time
    bottom_host, bottom_disk = host["embedding's step"], disk["embedding's step"]
    assert bottom_host["weights"] - bottom_disk["weights"] == pytest.approx((Em - big.end_slice()) * 4 - on_cpu)
    assert bottom_host["grads"] == Em * 4 and bottom_disk["grads"] == big.end_slice() * 4
    # a layer's grads at once (the fused AdamW update inside backward makes no temporaries)
    assert disk["layer re-run"]["grads"] == Lm * 4
    # torchao's 8-bit state, bf16 weights: in row slices on disk too (its codes and scales by rows)
    disk8 = plan.phases(big, plan.Strategy.parse("rev-bdia/adamw8bit/bf16/in-backward/offload-disk"), 1, 512)
    host8 = plan.phases(big, plan.Strategy.parse("rev-bdia/adamw8bit/bf16/in-backward/offload-host"), 1, 512)
    assert host8["loss"]["grads"] == Em * 2 and disk8["loss"]["grads"] == big.end_slice() * 2
    assert host8["loss"]["optimizer"] - disk8["loss"]["optimizer"] == pytest.approx(
        (Em - big.end_slice()) * plan.OPTIMIZERS["adamw8bit"])
    off = disk_st
    fig = plan.store_figures(s, off)
    assert fig["moved_bytes_per_step"] == pytest.approx((L * Lp + 2 * E) * (3 * 2 + 2 * ob) + rest * (2 + ob))
    assert fig["store_bytes"] == pytest.approx(2 * P * (2 + ob))
    assert plan.store_figures(s, on) == {}
    import argparse
    ap = argparse.ArgumentParser()
    plan.add_arguments(ap)
    assert plan.cmd_plan(ap.parse_args(["--config", "mixtral-8x7b", "--strategy", off.name, "--bandwidth", "2"])) == 0
    out = capsys.readouterr().out
    assert f"{off.name}: {fig['store_bytes'] / 2**30:.2f} GiB on disk (two slots per layer)" in out
    assert f"at least {fig['moved_bytes_per_step'] / 2e9:.1f} s per step at 2 GB/s" in out


@pytest.mark.parametrize("text,why", [
    ("hf-checkpoint/adamw/fp32/in-backward/offload-disk", "only a reversible model's layers"),
    ("rev-bdia/adamw/fp32/in-backward/offload-ssd", "the fifth part can only be offload-disk or offload-host"),
])
def test_bad_offload_strategies(text, why):
    with pytest.raises(plan.PlanError, match=why):
        plan.Strategy.parse(text)


def test_the_default_loss_chunk_is_the_converted_models_own(capsys):
    """With no --loss-chunk-size the planner takes the chunk a default-converted model runs with
    (2^20 logits: 16 tokens at Qwen's 151936 vocabulary, 64 at 16384); a given one replaces it."""
    from revengine.models import RevMoEConfig
    qwen, mini = plan.load_shapes("qwen1.5-moe-a2.7b"), plan.load_shapes("qwen-moe-mini")
    for shapes in (qwen, mini):
        model_cfg = RevMoEConfig.preset("qwen-moe-mini", vocab_size=shapes.vocab)
        assert plan.rev_options_for(shapes)["loss_chunk_size"] == model_cfg.working_set(4096)["loss_chunk_size"]
    assert plan.rev_options_for(qwen)["loss_chunk_size"] == 16 and plan.rev_options_for(mini)["loss_chunk_size"] == 64
    import argparse
    ap = argparse.ArgumentParser()
    plan.add_arguments(ap)
    for flag, chunk in ((["--loss-chunk-size", "128"], 128), ([], 16)):
        assert plan.cmd_plan(ap.parse_args(["--config", "qwen1.5-moe-a2.7b", "--json", *flag])) == 0
        assert json.loads(capsys.readouterr().out)["rev_options"]["loss_chunk_size"] == chunk
