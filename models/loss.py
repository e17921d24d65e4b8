"""The LM head's cross-entropy in token chunks: a batch's logits never exist whole."""
import torch

Tensor = torch.Tensor


class _ChunkedLinearCE(torch.autograd.Function):
    """mean CE of (h @ w.T) against labels (ignore_index -100), a chunk of rows at a time.

    The grads are computed chunk by chunk in forward (Liger-style), so neither the logits nor
    their softmax outlive one chunk; backward only scales them by the incoming grad."""

    @staticmethod
    def forward(ctx, h, w, labels, chunk):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = labels != -100
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        n = valid.sum().clamp_min(1).to(acc)
        total = torch.zeros((), dtype=acc, device=h.device)
        rows = None
        if not bool(valid.all()):
            # ignored rows (prompts, padding) add nothing and have zero grads: only the labelled rows
            # go through the head (a quarter of them in prompt/answer fine-tuning)
            rows = valid.nonzero()[:, 0]
            h_all, h, labels = h, h.index_select(0, rows), labels.index_select(0, rows)
            valid = torch.ones_like(labels, dtype=torch.bool)
        gh = torch.empty_like(h) if want_h else None
        gw = torch.zeros_like(w) if want_w else None
        for s in range(0, h.shape[0], chunk):
            hc, lc, vc = h[s:s + chunk], labels[s:s + chunk], valid[s:s + chunk]
            logits = hc @ w.t()
            lf = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
            lse = torch.logsumexp(lf, -1)
            tgt = lf.gather(-1, lc.clamp_min(0)[:, None])[:, 0]
            total = total + ((lse - tgt) * vc).sum().to(total.dtype)
            if want_h or want_w:
                # softmax - onehot, in place in the chunk's logits: one [chunk, V] buffer at a time.
                g = lf.sub_(lse[:, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), lc.clamp_min(0)] -= 1.0
                g.mul_((vc.to(g.dtype) / n.to(g.dtype))[:, None])
                g = g.to(hc.dtype)
                if want_h:
                    gh[s:s + chunk] = g @ w
                if want_w:
                    if gw.dtype == g.dtype:
                        gw.addmm_(g.t(), hc)  # in place: a [V, d] temporary per chunk cost more than the product
                    else:
                        gw += (g.t() @ hc).to(gw.dtype)
            del logits, lf
        if rows is not None and gh is not None:
            gh = torch.zeros_like(h_all).index_copy_(0, rows, gh)
        ctx.save_for_backward(gh, gw)
        return total / n

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


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
    """Mean token cross-entropy of the logits hidden @ weight.T, never materialising them whole."""
    return _ChunkedLinearCE.apply(hidden, weight, labels, int(chunk))
