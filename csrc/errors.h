// The errors the executor detects, as C++ types callers can tell apart. Python-free: the Python
// binding (python.cpp) installs a hook that raises them as revengine.errors' classes of the same
// names instead.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <string>

namespace revengine {

// They derive from c10::Error, what TORCH_CHECK threw at these sites before: code catching
// c10::Error (and torch, which shows it as a RuntimeError) sees them as before.
class ReversibleError : public c10::Error {
 public:
  using c10::Error::Error;
};

// A layer's inverse did not give back its input: a non-finite reconstruction, or (debug mode) one
// that differs from the true input.
class ReconstructionError : public ReversibleError {
 public:
  using ReversibleError::ReversibleError;
};

// The backward cannot recompute what it needs: outputs modified in place or already freed, or a
// double backward.
class RecomputeError : public ReversibleError {
 public:
  using ReversibleError::ReversibleError;
};

// Called with every error before it is thrown; it may throw something else in its place (python.cpp
// throws an exception that torch turns into the Python class, also across the autograd engine,
// which would make any c10::Error a RuntimeError). If it returns, the C++ error is thrown.
using ErrorHook = void (*)(const ReversibleError& error);
void set_error_hook(ErrorHook hook);

[[noreturn]] void throw_error(const ReconstructionError& error);
[[noreturn]] void throw_error(const RecomputeError& error);

}  // namespace revengine

// TORCH_CHECK for these errors: REVENGINE_CHECK(ReconstructionError, cond, message parts...).
#define REVENGINE_CHECK(error_t, cond, ...)                                                   \
  if (C10_UNLIKELY(!(cond))) {                                                                \
    ::revengine::throw_error(::revengine::error_t(                                            \
        {__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, ::c10::str(__VA_ARGS__)));      \
  }
