// One Adam/AdamW step of one parameter whose moments are stored the way torchao's low-bit
// optimizers store them, fused into a single pass over the parameter (CPU):
//
//   adam_step_(param, grad, exp_avg, exp_avg_scale, exp_avg_qmap,
//              exp_avg_sq, exp_avg_sq_scale, exp_avg_sq_qmap, bits, block_size,
//              lr, lr_wd, beta1, beta2, weight_decay, eps, bias_correction1,
//              bias_correction2_sqrt, adamw, sr_seed, sr_offset=0) -> ()
//
//   bits 8: exp_avg / exp_avg_sq are uint8 codes, one per element (torchao OptimState8bit);
//   bits 4: two codes per byte, element 2i in the high nibble (torchao OptimState4bit);
//   bits 0: the moments are plain float32 / bfloat16 tensors of the parameter's size.
//   A quantized moment's value is qmap[code] * scale[block]; after the update each block is
//   rescaled by its absolute maximum (at least 1e-12) and re-coded as torchao does: the largest
//   code whose qmap entry is <= the value, moved up one when the value is at least halfway to the
//   next entry.
//
// The arithmetic is torchao's single_param_adam, element by element in float32: the scalar
// coefficients (lr * weight_decay, 1 - beta^step, sqrt(1 - beta2^step)) come in computed by torch
// exactly as torchao computes them, and lerp is torch's (fma(w, end - start, start) for w < 0.5).
// What differs: torchao's eager update makes about forty passes over fp32 temporaries the size of
// the parameter; this makes one, block by block, with no temporaries. And bf16 weights are
// rounded stochastically (sr_seed >= 0) with random bits from a counter-based hash of
// (sr_seed, element index) instead of torch.randint: the same distribution, independent of the
// thread count, deterministic given the seed (drawn from torch's generator by the caller). The
// index counts from sr_offset: a row slice of a parameter stepped with the whole step's seed and
// its first element's index as offset rounds its elements as the whole step does.
//
// The file is also compiled into the plain C++ shared library: no pybind11 here.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace revengine {
namespace {

constexpr int64_t kPlainChunk = 4096;  // elements per task when the moments are not quantized

struct Coeffs {
  float lr, lr_wd, w1, w2, weight_decay, eps, bc1, bc2s;
  bool adamw;
  int64_t sr_seed;
  int64_t sr_offset;
};

// torch's lerp in its vectorised form, fma(w, end - start, start) for w < 0.5. The fma is done in
// double (the product is exact there; the sum is rounded twice, which differs from one rounding only
// when the double lands on a float halfway point): a call of libm's fma per element costs more.
inline float lerp(float start, float end, float w) {
  const float d = end - start;
  return w < 0.5f ? static_cast<float>(double(w) * double(d) + double(start))
                  : static_cast<float>(double(w - 1.0f) * double(d) + double(end));
}

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }

// torchao's _fp32_to_bf16_sr: away from zero with probability (low 16 bits) / 2^16.
inline c10::BFloat16 to_bf16(float x, const Coeffs& c, int64_t index) {
  if (c.sr_seed < 0) return c10::BFloat16(x);
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t r = static_cast<uint32_t>(splitmix64(static_cast<uint64_t>(c.sr_seed) ^
                                                      (static_cast<uint64_t>(index + c.sr_offset) * 0xD1B54A32D192ED03ull)) >> 48);
  uint32_t out = bits & 0xFFFF0000u;
  if (r < (bits & 0xFFFFu)) out += 0x10000u;
  return c10::BFloat16(static_cast<uint16_t>(out >> 16), c10::BFloat16::from_bits());
}
inline void store(float* p, int64_t i, float x, const Coeffs&) { p[i] = x; }
inline void store(c10::BFloat16* p, int64_t i, float x, const Coeffs& c) { p[i] = to_bf16(x, c, i); }

// One element's update: p, g in; m, v updated in place; returns the new parameter value.
inline float adam_element(float p, float g, float& m, float& v, const Coeffs& c) {
  if (c.adamw) {
    p = p - c.lr_wd * p;
  } else {
    g = g + c.weight_decay * p;
  }
  m = lerp(m, g, c.w1);
  v = lerp(v, g * g, c.w2);
  const float denom = std::sqrt(v) / c.bc2s + c.eps;
  return p - c.lr * (m / c.bc1) / denom;
}

// torchao's quantizer: the largest code whose qmap entry is <= x (its branchless binary search),
// moved up one when x is at least halfway to the next entry. Slow per element (eight dependent,
// unpredictable branches); CodeTable below gives the same codes and is what the kernel uses.
int64_t code_of(float x, const float* qmap, int64_t levels) {
  int64_t code = 0;
  for (int64_t step = levels / 2; step >= 1; step /= 2) {
    if (x >= qmap[code + step]) code += step;
  }
  const int64_t up = std::min(code + 1, levels - 1);
  const float down_v = qmap[code];
  if (x - down_v >= (qmap[up] - down_v) * 0.5f) code = up;
  return code;
}

// Floats in the order of their values <-> uint32 keys in the same order (NaNs excluded).
inline uint32_t key_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float float_of(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// code_of is non-decreasing in x, so it is the number of thresholds t[c] (the least float whose code
// exceeds c) that are <= x. start[] holds the code of the least value of each bin of floats that share
// their top 16 bits; from there a scan over the few thresholds inside the bin finishes the job.
struct CodeTable {
  std::vector<float> qmap;
  std::vector<float> thresholds;  // levels - 1 entries
  std::vector<uint8_t> start;     // 65536 entries
  int64_t levels = 0;

  inline int64_t code(float x) const {
    if (x != x) return 0;  // NaN: code_of's comparisons are all false
    uint32_t u;
    std::memcpy(&u, &x, 4);
    int64_t c = start[u >> 16];
    while (c < levels - 1 && x >= thresholds[c]) ++c;
    return c;
  }
};

std::unique_ptr<CodeTable> build_table(const float* qmap, int64_t levels) {
  auto t = std::make_unique<CodeTable>();
  t->qmap.assign(qmap, qmap + levels);
  t->levels = levels;
  t->thresholds.resize(levels - 1);
  const uint32_t lo_key = key_of(-INFINITY), hi_key = key_of(INFINITY);
  for (int64_t c = 0; c + 1 < levels; ++c) {  // least key whose code exceeds c (code_of(+inf) = levels - 1)
    uint32_t lo = lo_key, hi = hi_key;
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (code_of(float_of(mid), qmap, levels) > c) hi = mid; else lo = mid + 1;
    }
    t->thresholds[c] = float_of(lo);
  }
  t->start.resize(65536);
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint32_t u = (b & 0x8000u) ? ((b << 16) | 0xFFFFu) : (b << 16);  // the bin's least value
    float x;
    std::memcpy(&x, &u, 4);
    if (x != x) {  // NaN patterns; the bin of -inf also holds NaNs: -inf codes as 0 too
      t->start[b] = 0;
      continue;
    }
    t->start[b] = static_cast<uint8_t>(code_of(x, qmap, levels));
  }
  return t;
}

// One table per distinct qmap (torchao has four: signed and unsigned, 8 and 4 bits), built once.
const CodeTable& code_table(const float* qmap, int64_t levels) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<CodeTable>> tables;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& t : tables) {
    if (t->levels == levels && std::memcmp(t->qmap.data(), qmap, levels * sizeof(float)) == 0) return *t;
  }
  tables.push_back(build_table(qmap, levels));
  return *tables.back();
}

inline int64_t get_code(const uint8_t* codes, int64_t i, int64_t bits) {
  if (bits == 8) return codes[i];
  const uint8_t b = codes[i >> 1];
  return (i & 1) ? (b & 0xF) : (b >> 4);
}

// Rescales values[0, n) by their absolute maximum and writes their codes (element offset i0).
void encode_block(const float* values, int64_t n, int64_t i0, uint8_t* codes, float* scale_out,
                  const CodeTable& table, int64_t bits) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    amax = std::max(amax, std::fabs(values[j]));
    nan |= values[j] != values[j];
  }
  // torchao: abs().amax().clip(1e-12), which a NaN passes through
  const float scale = nan ? NAN : std::max(amax, 1e-12f);
  *scale_out = scale;
  if (bits == 8) {
    for (int64_t j = 0; j < n; ++j) codes[i0 + j] = static_cast<uint8_t>(table.code(values[j] / scale));
  } else {
    for (int64_t j = 0; j < n; j += 2) {
      const int64_t hi = table.code(values[j] / scale);
      const int64_t lo = table.code(values[j + 1] / scale);
      codes[(i0 + j) >> 1] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

template <typename P, typename G>
void step_quantized(P* p, const G* g, uint8_t* m_codes, float* m_scale, const float* m_qmap, uint8_t* v_codes,
                    float* v_scale, const float* v_qmap, int64_t numel, int64_t bits, int64_t block,
                    const Coeffs& c) {
  const int64_t nblocks = numel / block;
  const int64_t levels = int64_t(1) << bits;
  const CodeTable& m_table = code_table(m_qmap, levels);
  const CodeTable& v_table = code_table(v_qmap, levels);
  at::parallel_for(0, nblocks, std::max<int64_t>(1, 16384 / block), [&](int64_t b0, int64_t b1) {
    std::vector<float> m(block), v(block);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * block;
      const float ms = m_scale[b], vs = v_scale[b];
      for (int64_t j = 0; j < block; ++j) {
        const int64_t i = i0 + j;
        m[j] = m_qmap[get_code(m_codes, i, bits)] * ms;
        v[j] = v_qmap[get_code(v_codes, i, bits)] * vs;
        store(p, i, adam_element(load(p, i), load(g, i), m[j], v[j], c), c);
      }
      encode_block(m.data(), block, i0, m_codes, m_scale + b, m_table, bits);
      encode_block(v.data(), block, i0, v_codes, v_scale + b, v_table, bits);
    }
  });
}

template <typename P, typename G, typename M>
void step_plain(P* p, const G* g, M* m, M* v, int64_t numel, const Coeffs& c) {
  Coeffs nearest = c;  // the moments round to nearest, as copy_ does
  nearest.sr_seed = -1;
  at::parallel_for(0, numel, kPlainChunk, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float mf = load(m, i), vf = load(v, i);
      store(p, i, adam_element(load(p, i), load(g, i), mf, vf, c), c);
      store(m, i, mf, nearest);
      store(v, i, vf, nearest);
    }
  });
}

bool is_float_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

void check_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                const c10::optional<at::Tensor>& exp_avg_scale, const c10::optional<at::Tensor>& exp_avg_qmap,
                const at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& exp_avg_sq_scale,
                const c10::optional<at::Tensor>& exp_avg_sq_qmap, int64_t bits, int64_t block_size) {
  TORCH_CHECK(bits == 0 || bits == 4 || bits == 8, "revengine::adam_step_: bits must be 0, 4 or 8, got ", bits);
  TORCH_CHECK(is_float_or_bf16(param) && is_float_or_bf16(grad),
              "revengine::adam_step_: param and grad must be float32 or bfloat16, got ", param.scalar_type(), " and ",
              grad.scalar_type());
  TORCH_CHECK(grad.numel() == param.numel(), "revengine::adam_step_: grad has ", grad.numel(),
              " elements, param ", param.numel());
  TORCH_CHECK(param.is_contiguous() && grad.is_contiguous() && exp_avg.is_contiguous() && exp_avg_sq.is_contiguous(),
              "revengine::adam_step_: param, grad and moments must be contiguous");
  if (bits == 0) {
    TORCH_CHECK(is_float_or_bf16(exp_avg) && exp_avg.scalar_type() == exp_avg_sq.scalar_type() &&
                    exp_avg.numel() == param.numel() && exp_avg_sq.numel() == param.numel(),
                "revengine::adam_step_: plain moments must be float32 or bfloat16 of the parameter's size, got ",
                exp_avg.scalar_type(), " ", exp_avg.numel(), " / ", exp_avg_sq.scalar_type(), " ", exp_avg_sq.numel(),
                " for ", param.numel(), " elements");
    return;
  }
  TORCH_CHECK(block_size > 0 && block_size % 2 == 0 && param.numel() % block_size == 0,
              "revengine::adam_step_: block_size ", block_size, " must be even and divide the parameter's ",
              param.numel(), " elements");
  const int64_t code_bytes = bits == 8 ? param.numel() : param.numel() / 2;
  for (const auto* t : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->scalar_type() == at::kByte && t->numel() == code_bytes, "revengine::adam_step_: ", bits,
                "-bit codes must be uint8 with ", code_bytes, " elements, got ", t->scalar_type(), " with ", t->numel());
  }
  for (const auto* t : {&exp_avg_scale, &exp_avg_sq_scale}) {
    TORCH_CHECK(t->has_value() && (*t)->scalar_type() == at::kFloat && (*t)->is_contiguous() &&
                    (*t)->numel() == param.numel() / block_size,
                "revengine::adam_step_: each quantized moment needs a contiguous float32 scale of ",
                param.numel() / block_size, " blocks");
  }
  for (const auto* t : {&exp_avg_qmap, &exp_avg_sq_qmap}) {
    TORCH_CHECK(t->has_value() && (*t)->scalar_type() == at::kFloat && (*t)->is_contiguous() &&
                    (*t)->numel() == (int64_t(1) << bits),
                "revengine::adam_step_: each quantized moment needs a contiguous float32 qmap of ", int64_t(1) << bits,
                " entries");
  }
}

void adam_step__cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                    const c10::optional<at::Tensor>& exp_avg_scale, const c10::optional<at::Tensor>& exp_avg_qmap,
                    at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& exp_avg_sq_scale,
                    const c10::optional<at::Tensor>& exp_avg_sq_qmap, int64_t bits, int64_t block_size, double lr,
                    double lr_wd, double beta1, double beta2, double weight_decay, double eps, double bias_correction1,
                    double bias_correction2_sqrt, bool adamw, int64_t sr_seed, int64_t sr_offset) {
  check_args(param, grad, exp_avg, exp_avg_scale, exp_avg_qmap, exp_avg_sq, exp_avg_sq_scale, exp_avg_sq_qmap, bits,
             block_size);
  TORCH_CHECK(sr_seed < 0 || param.scalar_type() == at::kBFloat16,
              "revengine::adam_step_: stochastic rounding (sr_seed >= 0) needs bfloat16 weights");
  // torch casts a Python scalar to the op's float32 before using it (1 - beta: computed in double first)
  const Coeffs c{static_cast<float>(lr), static_cast<float>(lr_wd), static_cast<float>(1.0 - beta1),
                 static_cast<float>(1.0 - beta2), static_cast<float>(weight_decay), static_cast<float>(eps),
                 static_cast<float>(bias_correction1), static_cast<float>(bias_correction2_sqrt), adamw, sr_seed,
                 sr_offset};
  TORCH_CHECK(sr_offset >= 0, "revengine::adam_step_: sr_offset must be >= 0, got ", sr_offset);
  const int64_t n = param.numel();
  if (n == 0) return;
  auto run = [&](auto* p, const auto* g) {
    if (bits == 0) {
      if (exp_avg.scalar_type() == at::kFloat) {
        step_plain(p, g, exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), n, c);
      } else {
        step_plain(p, g, exp_avg.data_ptr<c10::BFloat16>(), exp_avg_sq.data_ptr<c10::BFloat16>(), n, c);
      }
    } else {
      step_quantized(p, g, exp_avg.data_ptr<uint8_t>(), exp_avg_scale->data_ptr<float>(),
                     exp_avg_qmap->data_ptr<float>(), exp_avg_sq.data_ptr<uint8_t>(),
                     exp_avg_sq_scale->data_ptr<float>(), exp_avg_sq_qmap->data_ptr<float>(), n, bits, block_size, c);
    }
  };
  auto with_grad = [&](auto* p) {
    if (grad.scalar_type() == at::kFloat) {
      run(p, grad.data_ptr<float>());
    } else {
      run(p, grad.data_ptr<c10::BFloat16>());
    }
  };
  if (param.scalar_type() == at::kFloat) {
    with_grad(param.data_ptr<float>());
  } else {
    with_grad(param.data_ptr<c10::BFloat16>());
  }
}

// The codes of x (values already rescaled to [-1, 1]) under a qmap of 16 or 256 entries, one per byte:
// the quantizer the kernel uses, exposed so that tests hold it to torchao's.
at::Tensor qmap_codes_cpu(const at::Tensor& x, const at::Tensor& qmap) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && qmap.scalar_type() == at::kFloat && qmap.is_contiguous() &&
                  (qmap.numel() == 16 || qmap.numel() == 256),
              "revengine::qmap_codes: x and qmap must be float32 and qmap contiguous with 16 or 256 entries");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  const CodeTable& table = code_table(qmap.data_ptr<float>(), qmap.numel());
  const float* src = xc.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, xc.numel(), kPlainChunk, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dst[i] = static_cast<uint8_t>(table.code(src[i]));
  });
  return out;
}

at::Tensor qmap_codes_meta(const at::Tensor& x, const at::Tensor&) {
  return at::empty(x.sizes(), x.options().dtype(at::kByte));
}

void adam_step__meta(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                     const c10::optional<at::Tensor>& exp_avg_scale, const c10::optional<at::Tensor>& exp_avg_qmap,
                     at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& exp_avg_sq_scale,
                     const c10::optional<at::Tensor>& exp_avg_sq_qmap, int64_t bits, int64_t block_size, double,
                     double, double, double, double, double, double, double, bool, int64_t, int64_t) {
  check_args(param, grad, exp_avg, exp_avg_scale, exp_avg_qmap, exp_avg_sq, exp_avg_sq_scale, exp_avg_sq_qmap, bits,
             block_size);
}

// An optimizer step: never differentiated. Below autograd, then the versions of what it mutated
// are bumped, as torch's own in-place updates do.
void adam_step__autograd(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                         const c10::optional<at::Tensor>& exp_avg_scale, const c10::optional<at::Tensor>& exp_avg_qmap,
                         at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& exp_avg_sq_scale,
                         const c10::optional<at::Tensor>& exp_avg_sq_qmap, int64_t bits, int64_t block_size, double lr,
                         double lr_wd, double beta1, double beta2, double weight_decay, double eps,
                         double bias_correction1, double bias_correction2_sqrt, bool adamw, int64_t sr_seed,
                         int64_t sr_offset) {
  TORCH_CHECK(!at::GradMode::is_enabled() || !param.requires_grad(),
              "revengine::adam_step_ is an optimizer step: call it under torch.no_grad()");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("revengine::adam_step_", "")
                         .typed<decltype(adam_step__cpu)>();
    op.call(param, grad, exp_avg, exp_avg_scale, exp_avg_qmap, exp_avg_sq, exp_avg_sq_scale, exp_avg_sq_qmap, bits,
            block_size, lr, lr_wd, beta1, beta2, weight_decay, eps, bias_correction1, bias_correction2_sqrt, adamw,
            sr_seed, sr_offset);
  }
  torch::autograd::impl::bump_version(param);
  torch::autograd::impl::bump_version(exp_avg);
  torch::autograd::impl::bump_version(exp_avg_sq);
}

}  // namespace
}  // namespace revengine

TORCH_LIBRARY_FRAGMENT(revengine, m) {
  m.def(
      "adam_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!)? exp_avg_scale, Tensor? exp_avg_qmap, "
      "Tensor(d!) exp_avg_sq, Tensor(e!)? exp_avg_sq_scale, Tensor? exp_avg_sq_qmap, int bits, int block_size, "
      "float lr, float lr_wd, float beta1, float beta2, float weight_decay, float eps, float bias_correction1, "
      "float bias_correction2_sqrt, bool adamw, int sr_seed, int sr_offset=0) -> ()");
  m.def("qmap_codes(Tensor x, Tensor qmap) -> Tensor");
}

TORCH_LIBRARY_IMPL(revengine, CPU, m) {
  m.impl("adam_step_", TORCH_FN(revengine::adam_step__cpu));
  m.impl("qmap_codes", TORCH_FN(revengine::qmap_codes_cpu));
}
TORCH_LIBRARY_IMPL(revengine, Meta, m) {
  m.impl("adam_step_", TORCH_FN(revengine::adam_step__meta));
  m.impl("qmap_codes", TORCH_FN(revengine::qmap_codes_meta));
}
TORCH_LIBRARY_IMPL(revengine, Autograd, m) { m.impl("adam_step_", TORCH_FN(revengine::adam_step__autograd)); }
