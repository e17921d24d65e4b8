#include "errors.h"

#include <atomic>

namespace revengine {

namespace {
std::atomic<ErrorHook> error_hook{nullptr};

template <typename E>
[[noreturn]] void throw_with_hook(const E& error) {
  if (ErrorHook hook = error_hook.load()) hook(error);
  throw error;
}
}  // namespace

void set_error_hook(ErrorHook hook) { error_hook.store(hook); }

void throw_error(const ReconstructionError& error) { throw_with_hook(error); }
void throw_error(const RecomputeError& error) { throw_with_hook(error); }

}  // namespace revengine
