"""The LM head's cross-entropy in vocabulary slices and token chunks: a batch's logits never exist
whole, and a head whose weight an offload store keeps is read, and stepped, a slice at a time."""
from typing import List, Optional

import torch

from revengine import optim

Tensor = torch.Tensor


class _Blocks:
    """The labelled rows of a batch against the head's vocabulary slices (`optim.row_slices_of`),
    in blocks of [token chunk, slice] logits, and the two passes over them that both paths below
    run, block for block, so that they give the same bits: pass 1 folds the slices' log-sum-exp in
    their order; pass 2 recomputes each block's logits, and from them (softmax - onehot) / n, the
    hidden state's gradient (accumulated over the slices in their order) and the slice's weight
    gradient (accumulated over the token chunks in theirs).

    Ignored rows (prompts, padding) add nothing and have zero grads: only the labelled rows go
    through the head (a quarter of them in prompt/answer fine-tuning). A block holds about `chunk`
    x vocab logits, the memory the caller's chunk asked for: token chunks are longer when slices
    are narrower than the vocabulary."""

    def __init__(self, h: Tensor, w: Tensor, labels: Tensor, chunk: int):
        valid = labels != -100
        self.acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        self.n = valid.sum().clamp_min(1).to(self.acc)
        self.h_all, self.rows = h, None
        if not bool(valid.all()):
            self.rows = valid.nonzero()[:, 0]
            h, labels = h.index_select(0, self.rows), labels.index_select(0, self.rows)
            valid = torch.ones_like(labels, dtype=torch.bool)
        self.h, self.labels, self.valid = h, labels, valid
        self.slices = optim.row_slices_of(w)  # (from its shape: a streamed weight has no memory)
        widest = max(r.stop - r.start for r in self.slices)
        tokens = max(1, chunk * w.shape[0] // widest)
        self.chunks = [slice(s, s + tokens) for s in range(0, h.shape[0], tokens)]

    def _logits(self, c: slice, w: Tensor) -> Tensor:
        lf = self.h[c] @ w.t()
        return lf.float() if lf.dtype in (torch.float16, torch.bfloat16) else lf

    def _label_in(self, c: slice, r: slice):
        lab = self.labels[c] - r.start
        return lab, (lab >= 0) & (lab < r.stop - r.start)

    def lse_pass(self, read) -> None:
        """Pass 1: each row's log-sum-exp and its label's logit; read(r) gives slice r's weight."""
        lse: List[Optional[Tensor]] = [None] * len(self.chunks)
        self.tgt = torch.zeros(self.h.shape[0], dtype=self.acc, device=self.h.device)
        for r in self.slices:
            w = read(r)
            for k, c in enumerate(self.chunks):
                lf = self._logits(c, w)
                part = torch.logsumexp(lf, -1)
                lse[k] = part if lse[k] is None else torch.logaddexp(lse[k], part)
                lab, inside = self._label_in(c, r)
                self.tgt[c] += torch.where(inside, lf.gather(-1, lab.clamp(0, lf.shape[1] - 1)[:, None])[:, 0],
                                           0.0).to(self.acc)
        self.lse = torch.cat(lse) if lse else self.tgt.clone()

    def loss(self) -> Tensor:
        total = torch.zeros((), dtype=self.acc, device=self.h.device)
        for c in self.chunks:
            total = total + ((self.lse[c] - self.tgt[c]) * self.valid[c]).sum().to(total.dtype)
        return total / self.n

    def grad_pass(self, read, weight_grad, done, gh: Optional[Tensor]) -> None:
        """Pass 2: for each slice r, weight_grad(r) gives a zeroed buffer for its weight gradient (or
        None), which done(r, weight, buffer) receives once complete; gh (or None) gets the hidden
        state's gradient."""
        for r in self.slices:
            w = read(r)
            gw = weight_grad(r)
            for c in self.chunks:
                g = self._logits(c, w).sub_(self.lse[c][:, None]).exp_()
                lab, inside = self._label_in(c, r)
                at = inside.nonzero()[:, 0]
                g[at, lab[at]] -= 1.0
                g.mul_((self.valid[c].to(g.dtype) / self.n.to(g.dtype))[:, None])
                g = g.to(self.h.dtype)
                if gh is not None:
                    gh[c].addmm_(g, w)
                if gw is not None:
                    if gw.dtype == g.dtype:
                        gw.addmm_(g.t(), self.h[c])  # in place: no [slice, d] temporary per chunk
                    else:
                        gw += (g.t() @ self.h[c]).to(gw.dtype)
            done(r, w, gw)

    def full_grad(self, gh: Tensor) -> Tensor:
        return gh if self.rows is None else torch.zeros_like(self.h_all).index_copy_(0, self.rows, gh)


class _ChunkedLinearCE(torch.autograd.Function):
    """mean CE of (h @ w.T) against labels (ignore_index -100), a block of logits at a time.

    The grads are computed in forward (Liger-style), so neither the logits nor their softmax
    outlive one block; backward only scales them by the incoming grad."""

    @staticmethod
    def forward(ctx, h, w, labels, chunk):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        b = _Blocks(h, w, labels, chunk)
        b.lse_pass(lambda r: w[r])
        gh = gw = None
        if want_h or want_w:
            gh = torch.zeros_like(b.h) if want_h else None
            gw = torch.zeros_like(w) if want_w else None
            b.grad_pass(lambda r: w[r], lambda r: gw[r] if gw is not None else None, lambda r, w_r, g_r: None, gh)
            if gh is not None:
                gh = b.full_grad(gh)
        ctx.save_for_backward(gh, gw)
        return b.loss()

    @staticmethod
    def backward(ctx, grad):
        gh, gw = ctx.saved_tensors
        if bool(grad == 1):
            # the loss itself (not scaled): the saved grads are the grads. Returned as they are, they
            # are not copied: autograd frees the saved references first (without retain_graph), so
            # the head's gradient takes them over; the head's [vocab, hidden] gradient exists once.
            return gh, gw, None, None
        return (gh * grad.to(gh.dtype) if gh is not None else None,
                gw * grad.to(gw.dtype) if gw is not None else None, None, None)


class _StreamedLinearCE(torch.autograd.Function):
    """The same loss, gradients and bits as _ChunkedLinearCE for a head whose weight an offload store
    keeps (`optim.streamed`): its weight is read a vocabulary slice at a time in each pass, and pass 2
    runs in backward, where each slice's gradient is stepped as soon as it is complete, so neither
    the weight nor its gradient is ever whole in memory. Per-tensor clipping needs the gradient's
    norm before the first step: pass 2 then runs twice (the first only measures)."""

    @staticmethod
    def forward(ctx, h, labels, chunk, stream):
        b = _Blocks(h, stream.p, labels, chunk)
        b.lse_pass(stream.read)
        ctx.b, ctx.stream = b, stream
        return b.loss()

    @staticmethod
    def backward(ctx, grad):
        b, stream = ctx.b, ctx.stream
        gh = torch.zeros_like(b.h) if ctx.needs_input_grad[0] else None
        scaled = not bool(grad == 1)

        def done(sweep):
            def take(r, w, gw):
                stream.consume(sweep, r, w, gw * grad.to(gw.dtype) if scaled else gw)
            return take
        try:
            for sweep in stream.sweeps():
                b.grad_pass(stream.read, lambda r: stream.grad_buffer(r, b.h.device), done(sweep),
                            gh if sweep == "step" else None)
        except BaseException:
            stream.finish(failed=True)
            raise
        stream.finish()
        if gh is None:
            return None, None, None, None
        gh = b.full_grad(gh)
        return gh * grad.to(gh.dtype) if scaled else gh, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
    """Mean token cross-entropy of the logits hidden @ weight.T, never materialising them whole (a
    block of about chunk x vocab logits at a time). A weight that an offload store streams
    (`revengine.optim.streamed`) is read, and stepped, one vocabulary slice at a time, with the same
    result bit for bit."""
    stream = optim.streamed(weight)
    if stream is not None:
        # (the weight is not an input of the graph: autograd would give it a gradient of zeros)
        return _StreamedLinearCE.apply(hidden, labels, int(chunk), stream)
    return _ChunkedLinearCE.apply(hidden, weight, labels, int(chunk))
