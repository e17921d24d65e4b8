"""revengine.offload.LayerStore: a run whose layers live on disk between uses is bit-identical to one
whose layers stay in memory; the memory is really released; a process killed in the middle of a
step resumes from the last completed one bit-identically; bad stores and failing disks are
one-line errors that leave the last completed step loadable."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import revengine as rev
from revengine.models import RevMoEConfig, RevMoEForCausalLM
from revengine.offload import LayerStore, OffloadError
from revengine.optim import InBackwardOptimizer, optimizer_class

from conftest import child_env

SETTINGS = [("adamw", "fp32"), pytest.param("adamw8bit", "bf16", marks=pytest.mark.skipif(
    not rev.optim.torchao_available(), reason="torchao is not installed"))]


# the tiny models' embedding and head (vocab x 64) are stepped in row slices of 32 rows here, as a
# real model's are (SLICE_ELEMENTS = 1M elements): on disk their state is then never whole
SMALL_SLICES = 2048


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    monkeypatch.setattr(rev.optim, "SLICE_ELEMENTS", SMALL_SLICES)


def build(optimizer="adamw", weights="fp32", hidden=64, layers=3, opt_kw=None, **config):
    torch.manual_seed(0)
    cfg = RevMoEConfig.preset("tiny", num_hidden_layers=layers, block_type="bdia", hidden_size=hidden,
                              moe_intermediate_size=64, **config)
    model = RevMoEForCausalLM(cfg).train()
    if weights == "bf16":
        model.to(torch.bfloat16)
    cls, kw = optimizer_class(optimizer, weights=weights)
    return model, InBackwardOptimizer(model.parameters(), cls, lr=1e-3, **kw, **(opt_kw or {}))


def train(model, steps, start=0):
    losses = []
    for s in range(start, start + steps):
        torch.manual_seed(100 + s)  # the batch and BDIA's signs of step s
        ids = torch.randint(0, model.config.vocab_size, (2, 64)).to(next(model.parameters()).device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    return losses


def snapshot(model, opt):
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = [{k: [t.clone() for t in rev.optim.inner_tensors(v)] for k, v in st.items() if isinstance(v, torch.Tensor)}
             for st in opt.state.values()]
    return weights, state


def assert_same(a, b):
    (wa, sa), (wb, sb) = a, b
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            assert all(torch.equal(u, v) for u, v in zip(x[k], y[k])), k


def assert_opens_as_uninterrupted(directory, steps):
    """The store in `directory` opens at `steps` and equals that many uninterrupted steps."""
    ref_model, ref_opt = build()
    train(ref_model, steps)
    model, opt = build()
    store = LayerStore.open(model, opt, directory)
    assert store.step == steps
    store.close()
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt))


@pytest.mark.parametrize("optimizer,weights", SETTINGS)
@pytest.mark.parametrize("tier", ["disk", "none"])
def test_offloaded_run_is_bit_identical(tmp_path, optimizer, weights, tier):
    model, opt = build(optimizer, weights)
    plain = train(model, 6)
    expect = snapshot(model, opt)

    model, opt = build(optimizer, weights)
    store = LayerStore(model, opt, tier=tier, directory=str(tmp_path / "store"))
    losses = train(model, 6)
    if tier == "disk":
        # read ahead for the next step: the first layer (the embedding is read a slice at a time)
        # (torch's AdamW: the embedding is read a slice at a time; torchao's low-bit state: whole)
        ahead = ["model.layers.0"] if store._input.streamed else ["model.embed_tokens", "model.layers.0"]
        assert store.step == 6 and store.resident_layers() == ahead
        assert store.bytes_read > 0 and store.bytes_written > 0
        # the files are safetensors: safetensors itself reads them
        from safetensors.torch import load_file
        layer0 = load_file(str(tmp_path / "store" / "model.layers.0.0.safetensors"))
        assert any(k.startswith("state.") for k in layer0) and all(v.numel() for v in layer0.values())
    store.close()
    assert losses == plain
    assert_same(snapshot(model, opt), expect)


def test_layers_are_released_between_uses(tmp_path):
    """Between steps the layers' weights (but the first's and the embedding's, read ahead for the next
    step), the head's and their AdamW moments hold no memory; small tensors stay; a forward brings a
    layer in and lets it go again."""
    model, opt = build()
    store = LayerStore(model, opt, tier="disk", directory=str(tmp_path / "s"))
    train(model, 1)
    stack = model.model.layers.layers
    big = [p for p in stack[1:].parameters() if p.numel() >= rev.offload.MIN_ELEMENTS]
    assert big and all(p.untyped_storage().nbytes() == 0 for p in big)
    moments = [t for p in stack.parameters() if p.numel() >= rev.offload.MIN_ELEMENTS
               for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.dim() > 0
               for t in rev.optim.inner_tensors(v)]
    assert moments and all(t.untyped_storage().nbytes() == 0 for t in moments)
    assert store.resident_layers() == ["model.layers.0"]  # being read ahead (the embedding comes in slices)
    head = model.lm_head.weight
    assert head.untyped_storage().nbytes() == 0
    assert all(t.untyped_storage().nbytes() == 0 for v in opt.state[head].values()
               if isinstance(v, torch.Tensor) and v.dim() > 0 for t in rev.optim.inner_tensors(v))
    seen = []
    stack[1].f.register_forward_hook(lambda m, a, o: seen.append(store.resident_layers()), prepend=True)
    with torch.no_grad():
        model.eval()(input_ids=torch.randint(0, model.config.vocab_size, (1, 8)))
    # layer 1 runs, layer 2 is being read for what comes next; nothing stays after an eval forward
    assert seen == [["model.layers.1", "model.layers.2"]] and store.resident_layers() == []
    store.close()
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in big)
    # in training the last layer stays after forward: backward re-runs it first
    store = LayerStore(model, opt, tier="disk", directory=str(tmp_path / "t"))
    model.train()(input_ids=torch.randint(0, model.config.vocab_size, (1, 8)))
    assert store.resident_layers() == ["model.layers.2", "lm_head"]  # and the head, for the loss's backward
    store.close()


def test_backward_holds_two_layers_weights_and_one_layers_state(tmp_path, monkeypatch):
    """At every step inside backward the memory held is the stepped layer's weights and state and the
    weights of the layer below (read once the write-back of the one above has freed its memory); at
    the top the last layer; never three layers' weights or two layers' state. The embedding and the
    head come a slice at a time (their lookup and loss step them slice by slice): never whole."""
    model, opt = build(layers=6)
    store = LayerStore(model, opt, tier="disk", directory=str(tmp_path / "s"))
    write = rev.offload._write_payload

    def slow_disk(fh, buffers):  # writes slower than the compute: reads would otherwise overtake them
        time.sleep(0.05)
        write(fh, buffers)
    monkeypatch.setattr(rev.offload, "_write_payload", slow_disk)
    held = []

    def count(p):
        big = [(layer.name, kind) for layer in store.layers + store.ends
               for k, t in store._tensors(layer).items() if t.numel() >= rev.offload.MIN_ELEMENTS
               for kind in ("param", "state") if k.startswith(kind) and t.untyped_storage().nbytes()]
        held.append({kind: {n for n, k in big if k == kind} for kind in ("param", "state")})
    opt.register_grad_hooks(count, lambda p, stepped: None)  # after the store's: the layer is in
    train(model, 3)
    assert len(held) == 3 * len(opt.params)
    ends = {e.name for e in store.ends}
    assert ends == {"model.embed_tokens", "lm_head"}
    for h in held:
        layers = {kind: h[kind] - ends for kind in h}
        end = (h["param"] | h["state"]) & ends
        assert len(end) <= 1, h
        assert len(layers["state"]) <= 1 and len(layers["param"]) <= (1 if end else 2), h
        if "model.embed_tokens" in end:  # its step, the last: read once layer 0 was written back
            assert not layers["param"] and not layers["state"], h
    assert not any(h["param"] & ends or h["state"] & ends for h in held)
    assert max(len(h["param"]) for h in held) == 2  # the window is full at times
    store.close()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_embedding_and_the_head_are_stored_unless_tied(tmp_path, tied):
    """An untied embedding and head have files of their own, like a layer: the embedding is in memory
    for its forward and its step, the head never whole (the loss reads it a vocabulary slice at a
    time). A tied one is used at both ends of every step: it stays in memory with the rest.
    Bit-identical."""
    model, opt = build(tie_word_embeddings=tied)
    plain = train(model, 3)
    expect = snapshot(model, opt)

    model, opt = build(tie_word_embeddings=tied)
    directory = tmp_path / "store"
    store = LayerStore(model, opt, tier="disk", directory=str(directory))
    after_forward = []
    model.register_forward_hook(lambda m, a, o: after_forward.append(store.resident_layers()))
    losses = train(model, 3)
    files = set(os.listdir(directory))
    ends = {"model.embed_tokens.0.safetensors", "model.embed_tokens.1.safetensors", "lm_head.0.safetensors",
            "lm_head.1.safetensors"}
    head = model.lm_head.weight
    if tied:
        assert not ends & files and store.ends == []
        assert after_forward[-1] == ["model.layers.2"] and head.untyped_storage().nbytes() > 0
    else:
        assert ends <= files
        # the embedding went after its forward; the head's weight never comes whole: the loss reads it
        assert after_forward[-1] == ["model.layers.2"]
        assert store.resident_layers() == ["model.layers.0"]  # read ahead for the next step
        assert head.untyped_storage().nbytes() == 0 and model.model.embed_tokens.weight.untyped_storage().nbytes() == 0
    store.close()
    assert losses == plain
    assert_same(snapshot(model, opt), expect)


def test_the_ends_state_is_stepped_in_row_slices_never_whole(tmp_path, monkeypatch):
    """On disk the embedding's and the head's AdamW state comes in row slices inside their step (read
    from the last version's file, written into the next one's): it never has memory in the store's
    run, and the run ends bit-identical to one without a store (whose steps in row slices equal
    whole ones: tests/test_optim.py)."""
    model, opt = build()
    plain = train(model, 3)
    expect = snapshot(model, opt)

    model, opt = build()
    ends = [model.model.embed_tokens.weight, model.lm_head.weight]
    slices = [len(opt.row_slices(p)) for p in ends]
    assert min(slices) >= 4
    store = LayerStore(model, opt, tier="disk", directory=str(tmp_path / "store"))
    reads, state_bytes = [], []
    real_read = rev.offload._StateRows.read
    monkeypatch.setattr(rev.offload._StateRows, "read", lambda self, rows: reads.append(rows) or real_read(self, rows))

    def after(p, stepped):
        if any(p is e for e in ends) and stepped:
            state_bytes.append(sum(t.untyped_storage().nbytes() for k, t in opt.state[p].items() if k != "step"))
    opt.register_grad_hooks(lambda p: None, after)
    losses = train(model, 3)
    assert len(reads) == 2 * sum(slices)  # steps 2 and 3 read every slice of both (step 1 creates the state)
    assert len(state_bytes) == 6 and set(state_bytes) == {0}
    store.close()
    assert losses == plain
    assert_same(snapshot(model, opt), expect)


LOWBIT = pytest.mark.skipif(not rev.optim.torchao_available(), reason="torchao is not installed")


@pytest.mark.parametrize("clip,optimizer,weights", [
    (None, "adamw", "fp32"), ("per_tensor", "adamw", "fp32"), ("global", "adamw", "fp32"),
    pytest.param(None, "adamw8bit", "bf16", marks=LOWBIT), pytest.param("per_tensor", "adamw4bit", "fp32", marks=LOWBIT),
    pytest.param("global", "adamw8bit", "fp32", marks=LOWBIT), pytest.param(None, "adamw", "bf16", marks=LOWBIT)])
def test_the_heads_weight_and_gradient_are_never_whole(tmp_path, monkeypatch, clip, optimizer, weights):
    """On disk the loss reads the head's weight a vocabulary slice at a time (in forward for the
    log-sum-exp, in backward for each slice's gradient, which is clipped and stepped at once; per-tensor
    clipping first measures every slice's gradient), so the weight never has memory and no gradient
    of it exists whole, nor its state (torch's moments, torchao's 8- and 4-bit codes and scales: only
    their lookup tables stay); with a scaled loss and ignored labels the run is bit-identical to one
    without a store, whose loss computes the same slices from the weight in memory (bf16 weights:
    with the same stochastic rounding)."""
    opt_kw = None if clip is None else dict(max_grad_norm=0.05, clip=clip)

    def run(model, opt, steps=3):
        losses = []
        for s in range(steps):
            torch.manual_seed(100 + s)
            ids = torch.randint(0, model.config.vocab_size, (2, 64))
            labels = ids.clone()
            labels[:, :20] = -100  # a prompt: only the answer's tokens are labelled
            closure = lambda: model(input_ids=ids, labels=labels).loss * 0.5  # noqa: E731
            loss = opt.step_two_pass(closure) if clip == "global" else closure()
            if clip != "global":
                loss.backward()
            losses.append(loss.item())
        return losses

    model, opt = build(optimizer, weights, opt_kw=opt_kw)
    plain = run(model, opt)
    expect = snapshot(model, opt)

    model, opt = build(optimizer, weights, opt_kw=opt_kw)
    head = model.lm_head.weight
    store = LayerStore(model, opt, tier="disk", directory=str(tmp_path / "store"))
    assert store._output.streamed
    slices = len(rev.optim.row_slices_of(head))
    assert slices >= 4
    seen, embedding_reads = [], []
    real = rev.offload._StateRows.read_weight

    def read_weight(self, rows):
        if self.param is not head:
            embedding_reads.append(rows.start)
            return real(self, rows)
        state = [t for v in opt.state.get(head, {}).values() if isinstance(v, torch.Tensor) and v.dim() > 0
                 for t, part in zip(rev.optim.inner_tensors(v), rev.optim.state_rows(v, slice(0, len(v))))
                 if part is not None]
        tables = [t for v in opt.state.get(head, {}).values() if isinstance(v, torch.Tensor) and v.dim() > 0
                  for t in rev.optim.inner_tensors(v)][len(state):]
        assert all(t.numel() <= 256 for t in tables)  # a quantization table: 16 or 256 entries
        seen.append((head.untyped_storage().nbytes(), head.grad, sum(t.untyped_storage().nbytes() for t in state)))
        return real(self, rows)
    monkeypatch.setattr(rev.offload._StateRows, "read_weight", read_weight)
    losses = run(model, opt)
    # reads a step: forward + backward, + the norm sweep with per-tensor clipping, x2 with global (two passes)
    assert len(seen) == 3 * slices * {None: 2, "per_tensor": 3, "global": 4}[clip]
    # the embedding's: each slice holding some of the ids in forward, each slice for its step (norm sweeps
    # and global clipping's norm pass read no weight: they measure the gradient only)
    lookups = 3 * len(rev.optim.row_slices_of(model.model.embed_tokens.weight)) * {"global": 2}.get(clip, 1)
    assert len(embedding_reads) == lookups + lookups // {"global": 2}.get(clip, 1)
    assert all(nbytes == 0 and grad is None and state == 0 for nbytes, grad, state in seen)
    assert int(opt.state[head]["step"]) == 3  # one step of the head a training step, not two
    store.close()
    assert losses == plain
    assert_same(snapshot(model, opt), expect)


def test_a_training_forward_that_runs_the_head_whole_steps_it_whole(tmp_path):
    """A loss from the logits (the head run on its own in a training forward, as DPO-style trainers
    do) brings the head in whole and steps it from its whole gradient, bit-identical to a run without a
    store; running it whole after the labels' loss already streamed it is a one-line error."""
    def run(model, steps=2):
        for s in range(steps):
            torch.manual_seed(100 + s)
            ids = torch.randint(0, model.config.vocab_size, (2, 32))
            logits = model(input_ids=ids).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()

    model, opt = build()
    run(model)
    expect = snapshot(model, opt)
    model, opt = build()
    store = LayerStore(model, opt, tier="disk", directory=str(tmp_path / "store"))
    run(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with pytest.raises(OffloadError, match=r"lm_head ran whole in a training forward that had already read its weight"):
        model(input_ids=ids, labels=ids, return_logits=True)
    store.close()
    assert_same(snapshot(model, opt), expect)


def test_an_embedding_called_whole_is_stepped_whole(tmp_path, monkeypatch):
    """A model whose forward calls its embedding module itself (as HF models do) gets it whole for
    the lookup and the step, bit-identical to a run without a store; the models' own lookup reads it
    a slice at a time (never whole) with the same result; calling the module as well in the same
    forward is a one-line error."""
    import revengine.models.modeling as modeling

    model, opt = build()
    plain = train(model, 2)
    expect = snapshot(model, opt)
    for whole in (True, False):
        if whole:
            monkeypatch.setattr(modeling, "embed", lambda module, ids: module(ids))
        model, opt = build()
        emb = model.model.embed_tokens.weight
        store = LayerStore(model, opt, tier="disk", directory=str(tmp_path / f"store{whole}"))
        sizes = []
        opt.register_grad_hooks(lambda p: sizes.append(emb.untyped_storage().nbytes()) if p is emb else None,
                                lambda p, stepped: None)
        assert train(model, 2) == plain
        assert len(sizes) == 2 and all((n > 0) == whole for n in sizes)  # at its steps
        if not whole:
            ids = torch.randint(0, model.config.vocab_size, (1, 8))
            with pytest.raises(OffloadError, match=r"model\.embed_tokens ran whole in a training forward that"):
                model(input_ids=ids, labels=ids)  # (streamed its embedding)
                model.model.embed_tokens(ids)
        store.close()
        assert_same(snapshot(model, opt), expect)
        monkeypatch.undo()
        monkeypatch.setattr(rev.optim, "SLICE_ELEMENTS", SMALL_SLICES)


CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    import test_offload as t
    import revengine.optim
    from revengine.offload import LayerStore
    revengine.optim.SLICE_ELEMENTS = t.SMALL_SLICES
    model, opt = t.build({optimizer!r}, {weights!r})
    store = LayerStore(model, opt, tier="disk", directory={directory!r})
    t.train(model, 3)
    written = []
    def kill_after_first_write(p, stepped):
        if stepped:
            written.append(p)
            if len(written) == 3:  # some of step 4's layers are written, the rest are not
                os.kill(os.getpid(), signal.SIGKILL)
    opt.register_grad_hooks(lambda p: None, kill_after_first_write)
    t.train(model, 1, start=3)
    print("not killed")
""")


@pytest.mark.parametrize("optimizer,weights", SETTINGS)
def test_resume_after_kill_is_bit_identical(tmp_path, optimizer, weights):
    """kill -9 in the middle of step 4's backward (after one layer's write-back): opening the store
    gives step 3, and three more steps end where six uninterrupted steps do."""
    directory = str(tmp_path / "store")
    code = CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)), optimizer=optimizer, weights=weights,
                        directory=directory)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(),
                       cwd=str(tmp_path), timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    with open(os.path.join(directory, "store.json")) as fh:
        assert json.load(fh)["step"] == 3

    model, opt = build(optimizer, weights)
    store = LayerStore.open(model, opt, directory)
    assert store.step == 3
    resumed = train(model, 3, start=3)
    store.close()

    ref_model, ref_opt = build(optimizer, weights)
    ref = train(ref_model, 6)
    assert resumed == ref[3:]
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt))


@pytest.mark.parametrize("where", ["layer", "head rows", "head's last rows"])
def test_full_disk_is_one_error_and_the_last_step_stays_loadable(tmp_path, monkeypatch, where):
    """The disk fills up while the first file of step 3 is written: a layer's (written whole), or the
    head's (its state written row slice by row slice inside its step, each slice's write on the writer
    thread while the next computes: raised by the next slice's write, or, for the last slice, when the
    file is completed at the head's release)."""
    directory = str(tmp_path / "store")
    model, opt = build()
    store = LayerStore(model, opt, tier="disk", directory=directory)
    train(model, 2)

    def full(fh, buffers):  # the disk fills up while a layer's tensors are written
        fh.write(bytes(buffers[0])[:100])
        raise OSError(28, os.strerror(28))

    calls, write_at = [], rev.offload._write_at
    last = 1 + 3 * (len(rev.optim.row_slices_of(model.lm_head.weight)) - 1)  # the header, 3 tensors a slice

    def full_at(fd, data, offset):
        calls.append(offset)
        if where == "head rows" or len(calls) == last + 1:  # (the disk then has room for the embedding's rows)
            raise OSError(28, os.strerror(28))
        write_at(fd, data, offset)

    if where == "layer":  # the head is first in backward, but it does not write through _write_payload
        monkeypatch.setattr(rev.offload, "_write_payload", full)
        match = r"model\.layers\.2\.\d\.safetensors: cannot write .*No space left"
    else:
        monkeypatch.setattr(rev.offload, "_write_at", full_at)
        match = r"lm_head\.\d\.safetensors: cannot write .*No space left"
    with pytest.raises(OffloadError, match=match):
        train(model, 1, start=2)
    monkeypatch.undo()
    monkeypatch.setattr(rev.optim, "SLICE_ELEMENTS", SMALL_SLICES)  # (the head's loss is computed in these slices)
    store.detach()
    assert not [f for f in os.listdir(directory) if ".tmp" in f]

    assert_opens_as_uninterrupted(directory, 2)


def test_store_json_names_only_files_already_flushed(tmp_path, monkeypatch):
    # a write-back leaves its file in the page cache and frees the layer at once; the flush comes
    # later on its own thread. store.json must still never name a file (or a rename) not yet on
    # the disk: what a power loss would otherwise break
    directory = str(tmp_path / "store")
    events, lock = [], threading.Lock()
    sync, write_json = rev.offload._sync_file, rev.offload._write_json

    def recording_sync(path, *args):
        sync(path, *args)
        with lock:
            events.append(("synced", os.path.realpath(path), os.stat(path).st_ino))

    def checking_json(path, doc):
        with lock:
            synced = {(p, ino) for kind, p, ino in events if kind == "synced"}
        for name, slot in doc["slots"].items():
            f = os.path.realpath(os.path.join(directory, f"{name}.{slot}.safetensors"))
            assert (f, os.stat(f).st_ino) in synced, f"store.json of step {doc['step']} names {f}, not flushed yet"
        assert (os.path.realpath(directory), os.stat(directory).st_ino) in synced, "the folder's renames"
        events.append(("json", doc["step"], None))
        write_json(path, doc)

    monkeypatch.setattr(rev.offload, "_sync_file", recording_sync)
    monkeypatch.setattr(rev.offload, "_write_json", checking_json)
    model, opt = build()
    store = LayerStore(model, opt, tier="disk", directory=directory)
    train(model, 3)
    store.close()
    assert [e[1] for e in events if e[0] == "json"] == [0, 1, 2, 3]


def test_a_failed_flush_is_one_error_and_the_last_step_stays_loadable(tmp_path, monkeypatch):
    # layer files reach the disk on a thread of their own after their memory is freed; an I/O error
    # there (a disk that fails late, a network folder gone) is still raised by the step, names the
    # file, and store.json keeps naming the last step whose files were all flushed
    directory = str(tmp_path / "store")
    model, opt = build()
    store = LayerStore(model, opt, tier="disk", directory=directory)
    train(model, 2)
    fsync = os.fsync
    failing = os.path.join(directory, "model.layers.1.")
    failed = []

    def flaky(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.startswith(failing):
            failed.append(path)
            raise OSError(5, os.strerror(5))
        return fsync(fd)

    monkeypatch.setattr(rev.offload.os, "fsync", flaky)
    with pytest.raises(OffloadError, match=r"model\.layers\.1\.\d\.safetensors: cannot write .*Input/output error"):
        train(model, 1, start=2)
    monkeypatch.undo()
    monkeypatch.setattr(rev.optim, "SLICE_ELEMENTS", SMALL_SLICES)  # (the head's loss is computed in these slices)
    assert failed, "the layer file's flush was never asked for"
    store.detach()
    with open(os.path.join(directory, "store.json")) as fh:
        assert json.load(fh)["step"] == 2
    assert_opens_as_uninterrupted(directory, 2)


def test_reads_ask_for_huge_pages_inside_their_buffers(tmp_path, monkeypatch):
    # the advice covers exactly the whole 2 MiB pages inside a buffer: never memory around it
    calls = []
    monkeypatch.setattr(rev.offload, "_madvise", lambda start, n, advice: calls.append((start, n, advice)))
    huge = 2 << 20
    t = torch.empty(5 * huge // 4)
    rev.offload._advise_huge_pages(t)
    (start, n, advice), = calls
    lo = -(-t.data_ptr() // huge) * huge
    assert (start, advice) == (lo, 14) and n == (t.data_ptr() + 5 * huge - lo) // huge * huge
    calls.clear()
    rev.offload._advise_huge_pages(torch.empty(huge // 8))  # no whole huge page inside: nothing asked
    assert calls == []

    # every buffer a read brings back is advised before the read lands in it
    advised = []
    monkeypatch.setattr(rev.offload, "_advise_huge_pages", lambda t: advised.append(t.untyped_storage().nbytes()))
    model, opt = build()
    store = LayerStore(model, opt, tier="disk", directory=str(tmp_path / "store"))
    train(model, 1)
    store.close()
    assert advised and all(n > 0 for n in advised)


def test_truncated_or_vanished_files_name_the_file(tmp_path):
    directory = str(tmp_path / "store")
    model, opt = build()
    LayerStore(model, opt, tier="disk", directory=directory)
    train(model, 1)
    path = os.path.join(directory, "model.layers.1.1.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(OffloadError, match=r"model\.layers\.1\.1\.safetensors: truncated"):
        train(model, 1, start=1)
    model, opt = build()
    with pytest.raises(OffloadError, match=r"model\.layers\.1\.1\.safetensors: truncated"):
        LayerStore.open(model, opt, directory)

    os.remove(path)
    model, opt = build()
    with pytest.raises(OffloadError, match=r"model\.layers\.1\.1\.safetensors: cannot read"):
        LayerStore.open(model, opt, directory)


def test_a_truncated_ends_state_rows_name_the_file_and_leave_no_partial_file(tmp_path):
    """The head's state comes a row slice at a time inside its step: a file cut short in its last
    rows fails that slice's read, after earlier slices were written into the next version's file.
    The error names the file; the next attempt starts that file over; detach removes it."""
    directory = str(tmp_path / "store")
    model, opt = build()
    store = LayerStore(model, opt, tier="disk", directory=directory)
    train(model, 2)
    path = os.path.join(directory, "lm_head.0.safetensors")  # step 2's head
    with open(path, "rb") as fh:
        whole = fh.read()
    with open(path, "r+b") as fh:
        fh.truncate(len(whole) - 1000)
    with pytest.raises(OffloadError, match=r"lm_head\.0\.safetensors: truncated while reading state\.weight"):
        train(model, 1, start=2)
    assert [f for f in os.listdir(directory) if ".tmp" in f] == [f"lm_head.1.safetensors.tmp-{os.getpid()}"]
    store.detach()
    assert not [f for f in os.listdir(directory) if ".tmp" in f]
    with open(path, "wb") as fh:  # the file whole again: the store opens at step 2 as if nothing happened
        fh.write(whole)
    assert_opens_as_uninterrupted(directory, 2)


def test_a_store_of_another_model_or_optimizer_is_refused(tmp_path):
    directory = str(tmp_path / "store")
    model, opt = build()
    store = LayerStore(model, opt, tier="disk", directory=directory)
    train(model, 1)
    store.close()
    other, other_opt = build(hidden=96)
    with pytest.raises(OffloadError, match=r"safetensors: param\..* the model's is"):
        LayerStore.open(other, other_opt, directory)
    deeper, deeper_opt = build(layers=4)
    with pytest.raises(OffloadError, match=r"store\.json: written for another model or optimizer \(layers"):
        LayerStore.open(deeper, deeper_opt, directory)
    if rev.optim.torchao_available():
        model8, opt8 = build("adamw8bit", "bf16")
        with pytest.raises(OffloadError, match=r"store\.json: written for another model or optimizer \(optimizer"):
            LayerStore.open(model8, opt8, directory)
    fresh, fresh_opt = build()
    with pytest.raises(OffloadError, match=r"holds a store already"):
        LayerStore(fresh, fresh_opt, tier="disk", directory=directory)


def test_bad_settings_are_one_line_errors(tmp_path):
    model, opt = build()
    with pytest.raises(OffloadError, match="tier must be one of"):
        LayerStore(model, opt, tier="ssd", directory=str(tmp_path))
    with pytest.raises(OffloadError, match="needs a directory"):
        LayerStore(model, opt, tier="disk")
    with pytest.raises(OffloadError, match="this model is on the CPU"):
        LayerStore(model, opt, tier="host")
    elsewhere = build()[0].to("meta")  # (a GPU model, where there is none): the disk tier reads into CPU memory
    elsewhere_opt = InBackwardOptimizer(elsewhere.parameters(), torch.optim.AdamW, lr=1e-3)
    with pytest.raises(OffloadError, match="tier 'disk' reads the layers into CPU memory; this model is on meta"):
        LayerStore(elsewhere, elsewhere_opt, tier="disk", directory=str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")
    with pytest.raises(OffloadError, match="InBackwardOptimizer"):
        LayerStore(model, torch.optim.AdamW(model.parameters()), tier="disk", directory=str(tmp_path / "a"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OffloadError, match="--offload-dir .*file/s: cannot create it"):
        LayerStore(model, opt, tier="disk", directory=str(blocker / "s"))
    model.model.layers.mode = "checkpoint"
    with pytest.raises(OffloadError, match="runs in mode 'checkpoint'"):
        LayerStore(model, opt, tier="disk", directory=str(tmp_path / "b"))
    model.model.layers.mode = "reversible"
    model.model.layers.layers[0].f.attn.self_attn.q_proj.weight.requires_grad_(False)
    frozen_opt = InBackwardOptimizer([p for p in model.parameters() if p.requires_grad], torch.optim.AdamW)
    with pytest.raises(OffloadError, match=r"model\.layers\.0 has parameters the optimizer does not train"):
        LayerStore(model, frozen_opt, tier="disk", directory=str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c" / "store.json")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host tier keeps a GPU model's layers in host memory")
def test_host_tier_on_a_gpu_is_bit_identical():
    model, opt = build()
    model.cuda()
    opt = InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    plain = train(model, 3)
    expect = snapshot(model, opt)
    model, opt = build()
    model.cuda()
    opt = InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    store = LayerStore(model, opt, tier="host")
    losses = train(model, 3)
    assert store.resident_layers() == ["model.embed_tokens", "model.layers.0"]  # read ahead for the next step
    store.close()
    assert losses == plain
    assert_same(snapshot(model, opt), expect)


def _init_layer(i, module):
    """A deterministic initialisation of stack layer i (the same whether built in memory or in the store)."""
    g = torch.Generator().manual_seed(1000 + i)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05)


def test_build_writes_a_model_one_layer_at_a_time(tmp_path):
    """LayerStore.build creates a model whose stack was never in memory as a whole (built on the meta
    device, each layer given memory, filled, written and released in turn); opened with an optimizer
    it trains bit-identically to the same model built in memory."""
    cfg = RevMoEConfig.preset("tiny", num_hidden_layers=4, block_type="bdia", hidden_size=64,
                              moe_intermediate_size=64)

    def rest_init(model):
        torch.manual_seed(0)
        with torch.no_grad():
            for name in ("model.embed_tokens", "model.norm", "lm_head"):
                for p in model.get_submodule(name).parameters():
                    p.copy_(torch.randn(p.shape) * 0.05)

    ref = RevMoEForCausalLM(cfg).train()
    rest_init(ref)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers.layers):
            _init_layer(i, layer)
    ref_opt = InBackwardOptimizer(ref.parameters(), torch.optim.AdamW, lr=1e-3)
    expect = train(ref, 3)

    with torch.device("meta"):
        model = RevMoEForCausalLM(cfg)
    for name in ("model.embed_tokens", "model.norm", "lm_head"):
        model.get_submodule(name).to_empty(device="cpu")
    rest_init(model)
    seen = []

    def big_in_memory():
        return sum(not p.is_meta and p.untyped_storage().nbytes() > 0 for p in model.model.layers.parameters()
                   if p.numel() >= rev.offload.MIN_ELEMENTS)

    def fill(i, layer):
        seen.append(big_in_memory())
        _init_layer(i, layer)

    directory = str(tmp_path / "store")
    LayerStore.build(model, directory, fill)
    n = sum(p.numel() >= rev.offload.MIN_ELEMENTS for p in model.model.layers.layers[0].parameters())
    assert n > 0 and seen == [n] * 4  # only the layer being filled had memory
    assert all(p.untyped_storage().nbytes() == 0 for p in model.model.layers.parameters()
               if p.numel() >= rev.offload.MIN_ELEMENTS)
    model.train()
    opt = InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    store = LayerStore.open(model, opt, directory)
    assert store.step == 0
    assert train(model, 3) == expect
    store.close()
    assert_same(snapshot(model, opt), snapshot(ref, ref_opt))


def test_the_step_before_the_last_opens_until_the_next_step_writes(tmp_path):
    """A trainer killed between the store's commit of step 3 and its own checkpoint of it resumes at
    step 2: open(step=2) reads the other slots, and continues bit-identically. Once step 4 has written
    over step 2's files, asking for step 2 is an error naming the file, never a mix of steps."""
    directory = str(tmp_path / "store")
    model, opt = build()
    store = LayerStore(model, opt, tier="disk", directory=directory)
    train(model, 3)
    store.detach()
    with open(os.path.join(directory, "store.json")) as fh:
        doc = json.load(fh)
    assert doc["step"] == 3 and doc["previous"]["step"] == 2

    ref_model, ref_opt = build()
    ref = train(ref_model, 5)
    model, opt = build()
    store = LayerStore.open(model, opt, directory, step=2)
    assert store.step == 2
    assert train(model, 2, start=2) == ref[2:4]  # steps 3 and 4 again, over step 3's slots
    store.detach()
    model, opt = build()
    with pytest.raises(OffloadError, match=r"store\.json: holds step 4 \(and 3\), not step 2"):
        LayerStore.open(model, opt, directory, step=2)
    # killed inside step 5 after its writes went over step 3's slots, before its commit: store.json
    # still names steps 4 and 3, and step 3's files say they hold step 5
    saved = open(os.path.join(directory, "store.json")).read()
    store = LayerStore.open(model, opt, directory)
    train(model, 1, start=4)
    store.detach()
    open(os.path.join(directory, "store.json"), "w").write(saved)
    model, opt = build()
    with pytest.raises(OffloadError, match=r"\.safetensors: holds step 5, the store names step 3"):
        LayerStore.open(model, opt, directory, step=3)
    model, opt = build()
    assert LayerStore.open(model, opt, directory).step == 4  # the last completed step is intact


def test_a_layers_other_slot_is_overwritten_where_it_is(tmp_path):
    """Once both of a layer's slots exist, its write-back goes over the other slot's file in place (the
    same inode: no new file, no rename; its page-cache pages are reused), and the run stays bit-identical."""
    directory = str(tmp_path / "store")
    model, opt = build()
    store = LayerStore(model, opt, tier="disk", directory=directory)
    train(model, 2)

    def inodes():
        return {f: os.stat(os.path.join(directory, f)).st_ino for f in os.listdir(directory)
                if f.startswith("model.layers.") and f.endswith(".safetensors")}
    before = inodes()
    assert len(before) == 2 * len(store.layers)
    losses = train(model, 2, start=2)
    store.close()
    assert inodes() == before
    ref_model, ref_opt = build()
    assert train(ref_model, 4)[2:] == losses
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt))


def test_save_weights_and_empty_layers(tmp_path):
    """save_weights writes the model's parameters through the store one layer at a time (safetensors
    reads them back equal to the model's); empty_layers makes a meta-built model that open() fills."""
    from safetensors.torch import load_file

    directory = str(tmp_path / "store")
    model, opt = build()
    store = LayerStore(model, opt, tier="disk", directory=directory)
    train(model, 2)
    store.save_weights(str(tmp_path / "w.safetensors"), {"format": "pt"})
    assert store.resident_layers() == ["model.layers.0"]  # what was released stays released
    store.detach()
    saved = load_file(str(tmp_path / "w.safetensors"))
    model2, opt2 = build()
    LayerStore.open(model2, opt2, directory).close()
    assert saved.keys() == dict(model2.named_parameters()).keys()
    assert all(torch.equal(saved[k], p) for k, p in model2.named_parameters())

    with torch.device("meta"):
        skeleton = RevMoEForCausalLM(model.config)
    for name in ("model.embed_tokens", "model.norm", "lm_head"):
        skeleton.get_submodule(name).to_empty(device="cpu")
    LayerStore.empty_layers(skeleton)
    assert not any(p.is_meta for p in skeleton.parameters())
    assert all(p.untyped_storage().nbytes() == 0 for p in skeleton.model.layers.parameters())
    opt3 = InBackwardOptimizer(skeleton.train().parameters(), torch.optim.AdamW, lr=1e-3)
    LayerStore.open(skeleton, opt3, directory).close()
    assert_same(snapshot(skeleton, opt3), snapshot(model2, opt2))
