#include "layers.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function.h>

#include <cmath>
#include <unordered_map>

#include "ops.h"

namespace revengine {

ParamIndex ParamIndex::build(const std::vector<std::vector<at::Tensor>>& per_fn) {
  ParamIndex idx;
  std::unordered_map<const void*, size_t> seen;
  for (const auto& ps : per_fn) {
    std::vector<size_t> slots;
    for (const auto& p : ps) {
      auto key = static_cast<const void*>(p.unsafeGetTensorImpl());
      auto it = seen.find(key);
      if (it == seen.end()) {
        it = seen.emplace(key, idx.params.size()).first;
        idx.params.push_back(p);
      }
      slots.push_back(it->second);
    }
    idx.slots.push_back(std::move(slots));
  }
  return idx;
}

std::vector<at::Tensor> ParamIndex::of(size_t fn) const {
  std::vector<at::Tensor> out;
  out.reserve(slots.at(fn).size());
  for (size_t j : slots.at(fn)) out.push_back(params[j]);
  return out;
}

at::Tensor grad_leaf(const Streams& s, const at::Tensor& buf) {
  at::Tensor v = s.exact ? s.value(buf) : buf.detach();
  return v.requires_grad_(true);
}

Ctx leaf_context(const Ctx& ctx, const std::vector<bool>& needs) {
  std::vector<at::Tensor> ts;
  ts.reserve(ctx.tensors.size());
  for (size_t k = 0; k < ctx.tensors.size(); ++k) {
    const auto& t = ctx.tensors[k];
    if (!t.defined()) {
      ts.push_back(t);
    } else if (needs[k] && torch::autograd::isDifferentiableType(t.scalar_type())) {
      ts.push_back(t.detach().requires_grad_(true));
    } else {
      ts.push_back(t.detach());
    }
  }
  return ctx.with_tensors(std::move(ts));
}

void check_increment(const at::Tensor& inc, const at::Tensor& stream, const char* fn_name,
                     const std::string& layer) {
  TORCH_CHECK(inc.defined() && inc.sizes() == stream.sizes() && inc.device() == stream.device() &&
                  at::isFloatingType(inc.scalar_type()),
              "revengine: ", fn_name, " of ", layer, " must return a floating tensor shaped like its "
              "stream (", stream.sizes(), " on ", stream.device(), "), got ",
              inc.defined() ? inc.sizes().vec() : std::vector<int64_t>{}, " ",
              inc.defined() ? c10::toString(inc.scalar_type()) : "undefined");
}

namespace {

// Adds the grads of one function's parameters (and of the context) into the layer's result.
void scatter_grads(BackwardResult& r, const std::vector<at::Tensor>& grads, size_t offset,
                   const std::vector<size_t>& slots, size_t nctx) {
  auto acc = [](at::Tensor& dst, const at::Tensor& g) {
    if (!g.defined()) return;
    dst = dst.defined() ? dst + g : g;
  };
  for (size_t j = 0; j < slots.size(); ++j) acc(r.dparams[slots[j]], grads[offset + j]);
  for (size_t k = 0; k < nctx; ++k) acc(r.dctx[k], grads[offset + slots.size() + k]);
}

std::vector<at::Tensor> concat(std::initializer_list<std::vector<at::Tensor>> parts) {
  std::vector<at::Tensor> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

std::vector<bool> wanted_for(bool first, const std::vector<size_t>& slots, const Needs& needs, size_t extra_first = 0) {
  std::vector<bool> w;
  for (size_t i = 0; i < extra_first; ++i) w.push_back(first);
  for (size_t j : slots) w.push_back(needs.params[j]);
  for (bool c : needs.ctx) w.push_back(c);
  return w;
}

// fn(src) with grad, the RNG replayed as the forward's k-th stream-function call saw it.
at::Tensor recompute(Fn& fn, const at::Tensor& src, const Ctx& lctx, const Streams& s, const LayerRecord& rec,
                     size_t k) {
  if (s.preserve_rng) restore_rng(rec.rng.at(k));
  RecomputeGuard rg;
  return fn.call(src, lctx);
}

// For a one-function layer: the vjp of inc = f(src) for dy; puts the parameter and context grads
// into r and returns the grad of src.
at::Tensor single_fn_vjp(BackwardResult& r, const at::Tensor& inc, const at::Tensor& dy, const at::Tensor& src,
                         const std::vector<at::Tensor>& params, const Ctx& lctx, const Needs& needs) {
  std::vector<bool> wanted{true};
  wanted.insert(wanted.end(), needs.params.begin(), needs.params.end());
  wanted.insert(wanted.end(), needs.ctx.begin(), needs.ctx.end());
  auto grads = vjp({inc}, {dy}, concat({{src}, params, lctx.tensors}), wanted);
  r.dparams.assign(grads.begin() + 1, grads.begin() + 1 + params.size());
  r.dctx.assign(grads.begin() + 1 + params.size(), grads.end());
  return grads[0];
}

// In place: buf <- lam*buf + inc (float) or buf += q(inc) (exact).
void add_increment(Streams& s, at::Tensor& buf, const at::Tensor& inc, double lam) {
  if (s.exact) {
    ops::fixed_update_(buf, inc, s.frac_bits, +1);
  } else {
    ops::coupling_update_(buf, inc, lam);
  }
}

// In place: buf <- (buf - inc)/lam (float) or buf -= q(inc) (exact). Returns the finite flag.
bool remove_increment(Streams& s, at::Tensor& buf, const at::Tensor& inc, double lam) {
  if (s.exact) {
    ops::fixed_update_(buf, inc, s.frac_bits, -1);
    return true;  // fixed_update_ rejects non-finite increments itself
  }
  return ops::coupling_inverse_(buf, inc, lam, s.check_finite).item<bool>();
}

}  // namespace

// ---------------------------------------------------------------------------------------------

AdditiveCoupling::AdditiveCoupling(FnPtr f, FnPtr g, double lam, double beta)
    : f_(std::move(f)), g_(std::move(g)), lam_(lam), beta_(beta) {
  TORCH_CHECK(f_ && g_, "revengine: AdditiveCoupling needs two stream functions f and g");
  TORCH_CHECK(lam_ != 0.0 && beta_ != 0.0 && std::isfinite(lam_) && std::isfinite(beta_),
              "revengine: AdditiveCoupling scales must be finite and non-zero (the inverse divides by "
              "them), got lam=", lam_, ", beta=", beta_);
}

std::vector<at::Tensor> AdditiveCoupling::parameters() {
  index_ = ParamIndex::build({f_->parameters(), g_->parameters()});
  return index_.params;
}

void AdditiveCoupling::forward(Streams& s, const Ctx& ctx, LayerRecord& rec) {
  const auto dev = s.a.device();
  if (s.preserve_rng) rec.rng.push_back(capture_rng(dev));
  at::Tensor fx = f_->call(s.value(s.b), ctx);
  check_increment(fx, s.b, "f", name());
  add_increment(s, s.a, fx, lam_);
  fx.reset();
  if (s.preserve_rng) rec.rng.push_back(capture_rng(dev));
  at::Tensor gy = g_->call(s.value(s.a), ctx);
  check_increment(gy, s.a, "g", name());
  add_increment(s, s.b, gy, beta_);
}

BackwardResult AdditiveCoupling::backward(Streams& s, const at::Tensor& dya, const at::Tensor& dyb,
                                          const Ctx& ctx, const LayerRecord& rec, const Needs& needs) {
  BackwardResult r;
  r.dparams.resize(index_.params.size());
  r.dctx.resize(ctx.tensors.size());
  Ctx lctx = leaf_context(ctx, needs.ctx);
  const size_t nctx = ctx.tensors.size();

  // One half step: upd = scale*x + fn(src). Recomputes fn(src) with grad, which also gives x
  // back (in place in upd), then returns the vjp of fn's output wrt src (params and ctx go into r).
  auto half = [&](at::Tensor& upd, const at::Tensor& src_buf, Fn& fn, size_t k, double scale,
                  const at::Tensor& dy) {
    at::Tensor src = grad_leaf(s, src_buf);
    at::Tensor inc = recompute(fn, src, lctx, s, rec, k);
    {
      at::NoGradGuard ng;
      r.finite &= remove_increment(s, upd, inc.detach(), scale);
    }
    auto grads = vjp({inc}, {dy}, concat({{src}, index_.of(k), lctx.tensors}),
                     wanted_for(true, index_.slots[k], needs, 1));
    scatter_grads(r, grads, 1, index_.slots[k], nctx);
    return grads[0];
  };
  // g half first (y2 = beta*x2 + g(y1)), then f half (y1 = lam*x1 + f(x2)).
  at::Tensor dsrc_g = half(s.b, s.a, *g_, 1, beta_, dyb);
  at::Tensor dy1 = dsrc_g.defined() ? dya + dsrc_g : dya;
  at::Tensor dsrc_f = half(s.a, s.b, *f_, 0, lam_, dy1);
  r.da = lam_ == 1.0 ? dy1 : dy1 * lam_;
  at::Tensor db = beta_ == 1.0 ? dyb : dyb * beta_;
  r.db = dsrc_f.defined() ? db + dsrc_f : db;
  return r;
}

bool AdditiveCoupling::inverse(Streams& s, const Ctx& ctx) {
  bool finite = remove_increment(s, s.b, g_->call(s.value(s.a), ctx), beta_);
  finite &= remove_increment(s, s.a, f_->call(s.value(s.b), ctx), lam_);
  return finite;
}

// ---------------------------------------------------------------------------------------------

AffineCoupling::AffineCoupling(FnPtr fs, FnPtr ft, FnPtr gs, FnPtr gt, double clamp)
    : fs_(std::move(fs)), ft_(std::move(ft)), gs_(std::move(gs)), gt_(std::move(gt)), clamp_(clamp) {
  TORCH_CHECK(fs_ && ft_ && gs_ && gt_, "revengine: AffineCoupling needs four stream functions");
  TORCH_CHECK(clamp_ > 0 && std::isfinite(clamp_), "revengine: AffineCoupling clamp must be positive, got ", clamp_);
}

std::vector<at::Tensor> AffineCoupling::parameters() {
  index_ = ParamIndex::build({fs_->parameters(), ft_->parameters(), gs_->parameters(), gt_->parameters()});
  return index_.params;
}

at::Tensor AffineCoupling::scale_of(const at::Tensor& raw) const {
  return at::exp(at::tanh(raw / clamp_) * clamp_);
}

void AffineCoupling::forward(Streams& s, const Ctx& ctx, LayerRecord& rec) {
  const auto dev = s.a.device();
  auto half = [&](at::Tensor& upd, const at::Tensor& src, Fn& fsc, Fn& fsh, const char* nm) {
    if (s.preserve_rng) rec.rng.push_back(capture_rng(dev));
    at::Tensor raw = fsc.call(src, ctx);
    check_increment(raw, src, nm, name());
    if (s.preserve_rng) rec.rng.push_back(capture_rng(dev));
    at::Tensor shift = fsh.call(src, ctx);
    check_increment(shift, src, nm, name());
    ops::affine_update_(upd, scale_of(raw), shift);
  };
  half(s.a, s.b, *fs_, *ft_, "f_scale/f_shift");
  half(s.b, s.a, *gs_, *gt_, "g_scale/g_shift");
}

BackwardResult AffineCoupling::backward(Streams& s, const at::Tensor& dya, const at::Tensor& dyb,
                                        const Ctx& ctx, const LayerRecord& rec, const Needs& needs) {
  BackwardResult r;
  r.dparams.resize(index_.params.size());
  r.dctx.resize(ctx.tensors.size());
  Ctx lctx = leaf_context(ctx, needs.ctx);
  const size_t nctx = ctx.tensors.size();

  // One half: upd = x*scale(src) + shift(src). Reconstructs x in place, returns (dx, dsrc).
  auto half = [&](at::Tensor& upd, const at::Tensor& src_buf, Fn& fsc, Fn& fsh, size_t rng0,
                  size_t slot_sc, size_t slot_sh, const at::Tensor& dy) {
    at::Tensor src = grad_leaf(s, src_buf);
    at::Tensor raw, shift, scale;
    {
      RecomputeGuard rg;
      if (s.preserve_rng) restore_rng(rec.rng.at(rng0));
      raw = fsc.call(src, lctx);
      if (s.preserve_rng) restore_rng(rec.rng.at(rng0 + 1));
      shift = fsh.call(src, lctx);
      scale = scale_of(raw);
    }
    {
      at::NoGradGuard ng;
      r.finite &= ops::affine_inverse_(upd, scale.detach(), shift.detach(), s.check_finite).item<bool>();
    }
    auto psc = index_.of(slot_sc);
    auto psh = index_.of(slot_sh);
    std::vector<size_t> slots = index_.slots[slot_sc];
    slots.insert(slots.end(), index_.slots[slot_sh].begin(), index_.slots[slot_sh].end());
    at::Tensor dscale = dy * upd;  // upd now holds x
    auto grads = vjp({scale, shift}, {dscale, dy}, concat({{src}, psc, psh, lctx.tensors}),
                     wanted_for(true, slots, needs, 1));
    scatter_grads(r, grads, 1, slots, nctx);
    at::Tensor dx = dy * scale.detach();
    return std::make_pair(dx, grads[0]);
  };
  auto [dx2_part, dy1_part] = half(s.b, s.a, *gs_, *gt_, 2, 2, 3, dyb);
  at::Tensor dy1 = dy1_part.defined() ? dya + dy1_part : dya;
  auto [dx1, dx2_f] = half(s.a, s.b, *fs_, *ft_, 0, 0, 1, dy1);
  r.da = dx1.to(s.dtype);
  r.db = (dx2_f.defined() ? dx2_part + dx2_f : dx2_part).to(s.dtype);
  return r;
}

bool AffineCoupling::inverse(Streams& s, const Ctx& ctx) {
  bool finite = ops::affine_inverse_(s.b, scale_of(gs_->call(s.a, ctx)), gt_->call(s.a, ctx),
                                     s.check_finite).item<bool>();
  finite &= ops::affine_inverse_(s.a, scale_of(fs_->call(s.b, ctx)), ft_->call(s.b, ctx),
                                 s.check_finite).item<bool>();
  return finite;
}

// ---------------------------------------------------------------------------------------------

LinearMultistep::LinearMultistep(FnPtr f, double c_prev, double c_cur, double c_f, bool swap, std::string name)
    : f_(std::move(f)), c_prev_(c_prev), c_cur_(c_cur), c_f_(c_f), swap_(swap), name_(std::move(name)) {
  TORCH_CHECK(f_, "revengine: ", name_, " needs a stream function f");
  TORCH_CHECK(c_prev_ != 0.0 && std::isfinite(c_prev_) && std::isfinite(c_cur_) && std::isfinite(c_f_),
              "revengine: ", name_, ": coefficients must be finite and the one of the previous state "
              "non-zero (the inverse divides by it), got c_prev=", c_prev_, ", c_cur=", c_cur_, ", c_f=", c_f_);
}

bool LinearMultistep::supports_exact() const {
  return (c_prev_ == 1.0 || c_prev_ == -1.0) && c_cur_ == std::round(c_cur_) && std::abs(c_cur_) < 1e6;
}

// u <- c_prev*u + c_cur*src + c_f*inc. Exact: integer arithmetic on the fixed-point buffers plus
// the rounded increment, so the inverse below undoes it bit for bit.
void LinearMultistep::step(Streams& s, at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, int) {
  at::NoGradGuard ng;
  if (s.exact) {
    if (c_prev_ == -1.0) u.neg_();
    if (c_cur_ != 0.0) u.add_(src, static_cast<int64_t>(c_cur_));
    ops::fixed_update_(u, c_f_ == 1.0 ? inc : inc * c_f_, s.frac_bits, +1);
    return;
  }
  if (c_prev_ != 1.0) u.mul_(c_prev_);
  if (c_cur_ != 0.0) u.add_(src, c_cur_);
  u.add_(inc.to(u.scalar_type()), c_f_);
}

// u <- (u - c_cur*src - c_f*inc)/c_prev. Returns the finite flag.
bool LinearMultistep::solve(Streams& s, at::Tensor& u, const at::Tensor& src, const at::Tensor& inc) {
  at::NoGradGuard ng;
  if (s.exact) {
    ops::fixed_update_(u, c_f_ == 1.0 ? inc : inc * c_f_, s.frac_bits, -1);
    if (c_cur_ != 0.0) u.sub_(src, static_cast<int64_t>(c_cur_));
    if (c_prev_ == -1.0) u.neg_();
    return true;
  }
  u.sub_(inc.to(u.scalar_type()), c_f_);
  if (c_cur_ != 0.0) u.sub_(src, c_cur_);
  if (c_prev_ != 1.0) u.div_(c_prev_);
  return !s.check_finite || ops::all_finite(u).item<bool>();
}

void LinearMultistep::forward(Streams& s, const Ctx& ctx, LayerRecord& rec) {
  if (s.preserve_rng) rec.rng.push_back(capture_rng(s.a.device()));
  at::Tensor& u = swap_ ? s.a : s.b;
  const at::Tensor& src = swap_ ? s.b : s.a;
  at::Tensor inc = f_->call(s.value(src), ctx);
  check_increment(inc, src, "f", name());
  step(s, u, src, inc, +1);
  if (swap_) std::swap(s.a, s.b);
}

BackwardResult LinearMultistep::backward(Streams& s, const at::Tensor& dya, const at::Tensor& dyb,
                                         const Ctx& ctx, const LayerRecord& rec, const Needs& needs) {
  if (swap_) std::swap(s.a, s.b);  // back to the input layout: (a, b) = (U', S)
  at::Tensor& u = swap_ ? s.a : s.b;
  const at::Tensor& src_buf = swap_ ? s.b : s.a;
  // Either way the outputs are (a', b') = (S, U').
  const at::Tensor& dy_src = dya;
  const at::Tensor& dy_u = dyb;
  BackwardResult r;
  Ctx lctx = leaf_context(ctx, needs.ctx);
  at::Tensor src = grad_leaf(s, src_buf);
  at::Tensor inc = recompute(*f_, src, lctx, s, rec, 0);
  r.finite = solve(s, u, s.exact ? src_buf : src.detach(), inc.detach());
  at::Tensor dsrc_f = single_fn_vjp(r, inc, c_f_ == 1.0 ? dy_u : dy_u * c_f_, src, params_, lctx, needs);
  at::Tensor dsrc = dy_src;
  if (c_cur_ != 0.0) dsrc = dsrc + dy_u * c_cur_;
  if (dsrc_f.defined()) dsrc = dsrc + dsrc_f;
  at::Tensor du = c_prev_ == 1.0 ? dy_u : dy_u * c_prev_;
  // Input streams: with swap (a, b) = (U, S), without swap (a, b) = (S, U).
  r.da = swap_ ? du : dsrc;
  r.db = swap_ ? dsrc : du;
  return r;
}

bool LinearMultistep::inverse(Streams& s, const Ctx& ctx) {
  if (swap_) std::swap(s.a, s.b);
  at::Tensor& u = swap_ ? s.a : s.b;
  const at::Tensor& src = swap_ ? s.b : s.a;
  return solve(s, u, src, f_->call(s.value(src), ctx));
}

}  // namespace revengine

// ---------------------------------------------------------------------------------------------

namespace revengine {
namespace {

constexpr const char* kBdiaSign = "bdia.sign";    // int64 [B]: +-1 per sample
constexpr const char* kBdiaLow = "bdia.low";      // uint8: the k bits >> k dropped, packed 8/k a byte
constexpr const char* kBdiaInput = "bdia.input";  // eval mode: the kept input p_prev

at::Tensor saved_by_tag(const LayerRecord& rec, const char* tag) {
  for (size_t i = 0; i < rec.saved_tags.size(); ++i)
    if (rec.saved_tags[i] == tag) return rec.saved[i];
  return at::Tensor();
}

void save_tagged(LayerRecord& rec, const char* tag, at::Tensor t) {
  rec.saved_tags.emplace_back(tag);
  rec.saved.push_back(std::move(t));
}

// sign [B] -> [B, 1, ..., 1] broadcasting against `like`, in its dtype, times `scale`.
at::Tensor per_sample(const at::Tensor& sign, const at::Tensor& like, double scale = 1.0) {
  std::vector<int64_t> shape(static_cast<size_t>(std::max<int64_t>(like.dim(), 1)), 1);
  shape[0] = sign.size(0);
  at::Tensor t = sign.to(like.scalar_type()).view(shape);
  return scale == 1.0 ? t : t.mul_(scale);
}

}  // namespace

int64_t BDIA::exact_shift(double gamma) {
  for (int64_t k = 1; k <= 8; ++k)
    if (gamma == std::ldexp(1.0, static_cast<int>(-k))) return k;
  return 0;
}

BDIA::BDIA(FnPtr f, double gamma, std::string name)
    : f_(std::move(f)), gamma_(gamma), shift_(exact_shift(gamma)), name_(std::move(name)) {
  TORCH_CHECK(f_, "revengine: ", name_, " needs a stream function f");
  TORCH_CHECK(std::isfinite(gamma_) && gamma_ > 0.0 && gamma_ <= 1.0, "revengine: ", name_,
              ": gamma must be in (0, 1] (g = +-gamma; the inverse divides by it), got ", gamma_);
}

void BDIA::forward(Streams& s, const Ctx& ctx, LayerRecord& rec) {
  at::Tensor& u = s.a;  // p_prev, becomes p_next
  const at::Tensor& src = s.b;
  TORCH_CHECK(src.dim() >= 1 && src.size(0) > 0, "revengine: ", name_,
              " draws one sign per sample along dim 0; got a stream of shape ", src.sizes());
  at::Tensor sign;
  if (training_) {
    // Drawn before the RNG snapshot: f's recompute replays its own randomness, not the draw.
    sign = at::randint(0, 2, {src.size(0)}, src.options().dtype(at::kLong)).mul_(2).sub_(1);
    save_tagged(rec, kBdiaSign, sign);
  }
  if (s.preserve_rng) rec.rng.push_back(capture_rng(src.device()));
  at::Tensor inc = f_->call(s.value(src), ctx);
  check_increment(inc, src, "f", name());
  at::NoGradGuard ng;
  if (!training_) {  // g = 0: p_next = p + f(p); keep p_prev, which cannot be recovered
    if (s.recording) save_tagged(rec, kBdiaInput, u.clone());
    u.copy_(src);
    if (s.exact)
      ops::fixed_update_(u, inc, s.frac_bits, +1);
    else
      u.add_(inc.to(u.scalar_type()));
  } else if (s.exact) {
    // g*P_prev rounded down + (1-g)*P + (1+g)*inc, one fused pass; keeps the bits g*P_prev dropped
    at::Tensor low = ops::bdia_step_(u, src, inc, sign, s.frac_bits, shift_);
    if (s.recording) save_tagged(rec, kBdiaLow, std::move(low));
  } else {
    at::Tensor g = per_sample(sign, u, gamma_);
    u.mul_(g).add_(src * (1.0 - g)).add_(inc.to(u.scalar_type()) * (1.0 + g));
  }
  std::swap(s.a, s.b);
}

BackwardResult BDIA::backward(Streams& s, const at::Tensor& dya, const at::Tensor& dyb, const Ctx& ctx,
                              const LayerRecord& rec, const Needs& needs) {
  std::swap(s.a, s.b);  // (a, b) = (U', S); the outputs were (S, U')
  at::Tensor& u = s.a;
  const at::Tensor& src_buf = s.b;
  const at::Tensor& dy_src = dya;
  const at::Tensor& dy_u = dyb;
  BackwardResult r;
  Ctx lctx = leaf_context(ctx, needs.ctx);
  at::Tensor src = grad_leaf(s, src_buf);
  at::Tensor inc = recompute(*f_, src, lctx, s, rec, 0);
  const at::Tensor kept = saved_by_tag(rec, kBdiaInput);
  const at::Tensor sign = saved_by_tag(rec, kBdiaSign);
  TORCH_CHECK(kept.defined() || sign.defined(), "revengine: ", name_, ": backward found no record of its forward");
  {
    at::NoGradGuard ng;
    if (kept.defined()) {
      u.copy_(kept);
    } else if (s.exact) {
      ops::bdia_unstep_(u, src_buf, inc.detach(), sign, saved_by_tag(rec, kBdiaLow), s.frac_bits, shift_);
    } else {
      at::Tensor g = per_sample(sign, u, gamma_);
      u.sub_(inc.detach().to(u.scalar_type()) * (1.0 + g)).sub_(src.detach() * (1.0 - g)).div_(g);
      r.finite = !s.check_finite || ops::all_finite(u).item<bool>();
    }
  }
  at::Tensor g;  // undefined in eval mode (g = 0)
  if (!kept.defined()) g = per_sample(sign, dy_u, gamma_);
  at::Tensor dsrc_f = single_fn_vjp(r, inc, g.defined() ? dy_u * (1.0 + g) : dy_u, src, params_, lctx, needs);
  at::Tensor dsrc = dy_src + (g.defined() ? dy_u * (1.0 - g) : dy_u);
  if (dsrc_f.defined()) dsrc = dsrc + dsrc_f;
  r.da = g.defined() ? dy_u * g : at::zeros_like(dy_u);
  r.db = dsrc;
  return r;
}

bool BDIA::inverse(Streams&, const Ctx&) {
  TORCH_CHECK(false, "revengine: ", name_, " draws its signs (or, in eval mode, drops its input) at each forward: "
              "its input is reconstructed inside backward from what that forward recorded; Sequential.inverse "
              "cannot undo it");
  return false;
}

}  // namespace revengine
