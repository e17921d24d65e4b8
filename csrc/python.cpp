// Python bindings: adapts Python callables / nn.Modules to the executor's Fn and Layer interfaces.
#include <pybind11/gil_safe_call_once.h>
#include <torch/csrc/Exceptions.h>
// not <torch/extension.h>: it pulls in the whole C++ frontend (torch/all.h), 30 s of compile time
#include <pybind11/pybind11.h>
#include <torch/python.h>
#include <torch/version.h>

#include "errors.h"
#include "executor.h"
#include "layers.h"
#include "ops.h"

// setup.py writes the hash of csrc/ into a generated header (build/generated/).
#ifdef REVENGINE_HAVE_HASH_HEADER
#include "revengine_source_hash.h"
#else
#define REVENGINE_SOURCE_HASH "unknown"
#endif

namespace py = pybind11;
using namespace revengine;

namespace {

// Holds a Python object; drops its reference under the GIL from whatever thread frees it.
struct PyRef {
  py::object obj;
  PyRef() = default;
  explicit PyRef(py::object o) : obj(std::move(o)) {}
  PyRef(const PyRef&) = delete;
  PyRef& operator=(const PyRef&) = delete;
  ~PyRef() {
    if (!obj) return;
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      obj = py::object();
    } else {
      obj.release();
    }
  }
};

// The non-tensor part of the context: a Python callable rebuilding the kwargs from the tensors.
struct PyCtxExtra : CtxExtra {
  PyRef builder;
  explicit PyCtxExtra(py::object b) : builder(std::move(b)) {}
};

py::object runtime_attr(const char* name) {
  return py::module_::import("revengine._runtime").attr(name);
}

py::dict build_kwargs(const Ctx& ctx) {
  if (!ctx.extra) return py::dict();
  auto* e = static_cast<PyCtxExtra*>(ctx.extra.get());
  py::list ts;
  for (const auto& t : ctx.tensors) ts.append(t.defined() ? py::cast(t) : py::none());
  return e->builder.obj(ts).cast<py::dict>();
}

// Runs a Python call (GIL held), carrying a Python exception through C++ as torch's python_error:
// it holds the exception object itself, which torch re-raises unchanged where the call came from
// (also across the autograd engine), so a layer's ValueError or ReconstructionError keeps its class.
template <typename F>
auto guarded(F&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (py::error_already_set& e) {
    e.restore();  // back to Python's error indicator, where python_error takes it from
    python_error err;
    err.persist();
    throw err;
  }
}

std::vector<at::Tensor> python_parameters(const py::object& obj) {
  std::vector<at::Tensor> out;
  if (py::hasattr(obj, "parameters")) {
    for (auto p : obj.attr("parameters")()) out.push_back(p.cast<at::Tensor>());
  }
  return out;
}

at::Tensor to_tensor(const py::object& o, const std::string& what) {
  TORCH_CHECK(THPVariable_Check(o.ptr()), "revengine: ", what, " must return a tensor, got ",
              std::string(py::str(o.get_type())));
  return o.cast<at::Tensor>();
}

class PyFn : public Fn {
 public:
  PyFn(py::object fn, std::string label) : fn_(std::move(fn)), label_(std::move(label)) {}
  at::Tensor call(const at::Tensor& x, const Ctx& ctx) override {
    py::gil_scoped_acquire gil;
    side_begin_call(label_);
    return guarded([&] {
      py::dict kw = build_kwargs(ctx);
      py::object out;
      if (is_recomputing()) {
        static py::object* recompute_call = new py::object(runtime_attr("recompute_call"));
        out = (*recompute_call)(fn_.obj, py::make_tuple(x), kw);
      } else {
        out = fn_.obj(x, **kw);
      }
      return to_tensor(out, label_);
    });
  }
  std::vector<at::Tensor> parameters() override {
    py::gil_scoped_acquire gil;
    return guarded([&] { return python_parameters(fn_.obj); });
  }
  std::string name() const override { return label_; }

 private:
  PyRef fn_;
  std::string label_;
};

FnPtr make_fn(py::object f, const std::string& label) {
  TORCH_CHECK(!f.is_none() && PyCallable_Check(f.ptr()), "revengine: ", label, " must be callable");
  return std::make_shared<PyFn>(std::move(f), label);
}

// A user-defined coupling written in Python: module(x1, x2, **ctx) -> (y1, y2) and
// module.inverse(y1, y2, **ctx) -> (x1, x2). Backward inverts without grad, then re-runs the
// forward with grad (two forward evaluations, against one for the fused built-in couplings).
class PyCoupling : public Layer {
 public:
  PyCoupling(py::object module, std::string label) : mod_(std::move(module)), label_(std::move(label)) {}
  std::string name() const override { return label_; }
  std::vector<at::Tensor> parameters() override {
    py::gil_scoped_acquire gil;
    return guarded([&] { return python_parameters(mod_.obj); });
  }
  void forward(Streams& s, const Ctx& ctx, LayerRecord& rec) override {
    if (s.preserve_rng) rec.rng.push_back(capture_rng(s.a.device()));
    auto [a, b] = call2(s.a, s.b, ctx, "forward");
    s.a = a;
    s.b = b;
  }
  BackwardResult backward(Streams& s, const at::Tensor& dya, const at::Tensor& dyb, const Ctx& ctx,
                          const LayerRecord& rec, const Needs& needs) override {
    BackwardResult r;
    {
      at::NoGradGuard ng;
      auto [a, b] = call2(s.a, s.b, ctx, "inverse");
      s.a = a;
      s.b = b;
      if (s.check_finite) {
        r.finite = ops::all_finite(a).item<bool>() && ops::all_finite(b).item<bool>();
        if (!r.finite) return r;
      }
    }
    Ctx lctx = leaf_context(ctx, needs.ctx);
    at::Tensor xa = s.a.detach().requires_grad_(true);
    at::Tensor xb = s.b.detach().requires_grad_(true);
    at::Tensor ya, yb;
    {
      if (s.preserve_rng) restore_rng(rec.rng.at(0));
      RecomputeGuard rg;
      std::tie(ya, yb) = call2(xa, xb, lctx, "forward");
    }
    auto params = parameters();
    std::vector<at::Tensor> inputs{xa, xb};
    inputs.insert(inputs.end(), params.begin(), params.end());
    inputs.insert(inputs.end(), lctx.tensors.begin(), lctx.tensors.end());
    std::vector<bool> wanted{true, true};
    wanted.insert(wanted.end(), needs.params.begin(), needs.params.end());
    wanted.insert(wanted.end(), needs.ctx.begin(), needs.ctx.end());
    auto grads = vjp({ya, yb}, {dya, dyb}, inputs, wanted);
    r.da = grads[0].defined() ? grads[0] : at::zeros_like(dya);
    r.db = grads[1].defined() ? grads[1] : at::zeros_like(dyb);
    r.dparams.assign(grads.begin() + 2, grads.begin() + 2 + params.size());
    r.dctx.assign(grads.begin() + 2 + params.size(), grads.end());
    return r;
  }
  bool inverse(Streams& s, const Ctx& ctx) override {
    auto [a, b] = call2(s.a, s.b, ctx, "inverse");
    s.a = a;
    s.b = b;
    return !s.check_finite || (ops::all_finite(a).item<bool>() && ops::all_finite(b).item<bool>());
  }

 private:
  // what: "forward" calls the module (hooks included), "inverse" its inverse method.
  std::pair<at::Tensor, at::Tensor> call2(const at::Tensor& a, const at::Tensor& b, const Ctx& ctx,
                                          const char* what) {
    py::gil_scoped_acquire gil;
    side_begin_call(label_);
    return guarded([&] {
      static py::object* forward_of = new py::object(runtime_attr("coupling_forward"));
      py::object fn = std::string(what) == "inverse" ? mod_.obj.attr("inverse") : (*forward_of)(mod_.obj);
      py::dict kw = build_kwargs(ctx);
      py::object out;
      if (is_recomputing()) {
        static py::object* recompute_call = new py::object(runtime_attr("recompute_call"));
        out = (*recompute_call)(fn, py::make_tuple(a, b), kw, mod_.obj);
      } else {
        out = fn(a, b, **kw);
      }
      std::string where = label_ + "." + what;
      TORCH_CHECK(py::isinstance<py::tuple>(out) || py::isinstance<py::list>(out),
                  "revengine: ", where, " must return two tensors (y1, y2)");
      auto seq = out.cast<py::sequence>();
      TORCH_CHECK(seq.size() == 2, "revengine: ", where, " must return two tensors, got ", seq.size());
      return std::make_pair(to_tensor(seq[0], where), to_tensor(seq[1], where));
    });
  }
  // The module's inverse runs on the same ctx; a PyRef keeps the module alive across threads.
  PyRef mod_;
  std::string label_;
};

// A layer whose module is managed by FSDP2's fully_shard (or another module-hook wrapper). The
// executor calls the built-in layer's f and g directly, so the module's own hooks would never
// run and f would see sharded parameters. Here forward and backward run inside a call of the
// module (revengine._runtime.hooked_forward / hooked_backward): its pre-forward hook unshards the
// parameters, and backward hands their grads to autograd to accumulate into the parameters the
// module holds at that moment (FSDP's unsharded ones), whose post-backward reduce-scatters and
// reshards them. So the parameters are not inputs of the executor's node (parameters() is empty).
class PyHookedLayer : public Layer {
 public:
  PyHookedLayer(LayerPtr inner, py::object module) : inner_(std::move(inner)), mod_(std::move(module)) {
    TORCH_CHECK(inner_, "revengine: HookedLayer needs a layer");
  }
  std::string name() const override { return inner_->name(); }
  std::vector<at::Tensor> parameters() override { return {}; }
  bool supports_exact() const override { return inner_->supports_exact(); }
  void forward(Streams& s, const Ctx& ctx, LayerRecord& rec) override {
    py::gil_scoped_acquire gil;
    guarded([&] {
      py::cpp_function body([&] {
        py::gil_scoped_release nogil;  // the layer's functions take it back; autograd must not hold it
        inner_->forward(s, ctx, rec);
      });
      static py::object* fn = new py::object(runtime_attr("hooked_forward"));
      (*fn)(mod_.obj, body);
    });
  }
  BackwardResult backward(Streams& s, const at::Tensor& dya, const at::Tensor& dyb, const Ctx& ctx,
                          const LayerRecord& rec, const Needs& needs) override {
    BackwardResult result;
    py::gil_scoped_acquire gil;
    guarded([&] {
      // Called inside the module call (parameters unsharded): the list the grads line up with. It
      // also refreshes the inner layer's parameter index, which its backward uses.
      std::vector<at::Tensor> params;
      py::cpp_function params_fn([&] {
        params = inner_->parameters();
        return params;
      });
      // Called from the autograd node of that call: the fused backward of the inner layer.
      py::cpp_function run([&] {
        std::vector<at::Tensor> dparams;
        {
          py::gil_scoped_release nogil;
          at::AutoGradMode grad_on(true);
          Needs n = needs;
          n.params.assign(params.size(), false);
          for (size_t j = 0; j < params.size(); ++j) n.params[j] = params[j].requires_grad();
          result = inner_->backward(s, dya, dyb, ctx, rec, n);
          dparams = std::move(result.dparams);
          result.dparams.clear();
          dparams.resize(params.size());
        }
        py::list out;
        for (const auto& g : dparams) out.append(g.defined() ? py::cast(g) : py::none());
        return out;
      });
      static py::object* fn = new py::object(runtime_attr("hooked_backward"));
      (*fn)(mod_.obj, params_fn, run);
    });
    return result;
  }
  bool inverse(Streams& s, const Ctx& ctx) override {
    bool finite = true;
    py::gil_scoped_acquire gil;
    guarded([&] {
      py::cpp_function body([&] {
        py::gil_scoped_release nogil;
        finite = inner_->inverse(s, ctx);
      });
      static py::object* fn = new py::object(runtime_attr("hooked_inverse"));
      (*fn)(mod_.obj, body);
    });
    return finite;
  }

 private:
  LayerPtr inner_;
  PyRef mod_;
};

// -- the executor's errors as revengine.errors' Python classes ---------------------------------
// Most errors reach Python through torch rather than through this module's functions: those
// raised in backward cross the autograd engine, which keeps the thrown object (as an
// exception_ptr) and rethrows it in the caller of loss.backward(), where torch's handler turns
// c10::Error into RuntimeError and a torch::PyTorchError into the class its python_type() names.
// So the hook throws a PyTorchError; a translator does the same for this module's own functions.

struct ErrorClasses {
  PyObject* reconstruction;
  PyObject* recompute;
};

// revengine.errors, imported on the first error (it imports nothing, and the classes it holds
// live as long as the interpreter). Call with the GIL.
const ErrorClasses& error_classes() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<ErrorClasses> storage;
  return storage
      .call_once_and_store_result([] {
        py::module_ errors = py::module_::import("revengine.errors");
        return ErrorClasses{py::object(errors.attr("ReconstructionError")).release().ptr(),
                            py::object(errors.attr("RecomputeError")).release().ptr()};
      })
      .get_stored();
}

struct PythonReversibleError : torch::PyTorchError {
  PythonReversibleError(std::string msg, PyObject* type) : torch::PyTorchError(std::move(msg)), type_(type) {}
  PyObject* python_type() override { return type_; }
  PyObject* type_;  // a class of revengine.errors (never freed)
};

void raise_python_error(const ReversibleError& error) {
  PyObject* type = nullptr;
  {
    py::gil_scoped_acquire gil;  // backward runs without the GIL
    try {
      const ErrorClasses& classes = error_classes();
      type = dynamic_cast<const ReconstructionError*>(&error) ? classes.reconstruction : classes.recompute;
    } catch (py::error_already_set& e) {
      return;  // revengine.errors cannot be imported: the C++ error (a RuntimeError) is thrown
    }
  }
  // Without the C++ backtrace, as torch shows a c10::Error when TORCH_SHOW_CPP_STACKTRACES is off.
  throw PythonReversibleError(error.what_without_backtrace(), type);
}

ExecOptions make_options(bool exact, int64_t frac_bits, bool check_finite, bool preserve_rng, bool debug,
                         double debug_tol) {
  ExecOptions o;
  o.exact = exact;
  o.frac_bits = frac_bits;
  o.check_finite = check_finite;
  o.preserve_rng = preserve_rng;
  o.debug = debug;
  o.debug_tol = debug_tol;
  return o;
}

Ctx make_ctx(std::vector<at::Tensor> tensors, py::object builder) {
  Ctx ctx;
  ctx.tensors = std::move(tensors);
  if (!builder.is_none()) ctx.extra = std::make_shared<PyCtxExtra>(std::move(builder));
  return ctx;
}

// The RNG section as a Python context manager (entered and exited on one thread, as `with` does).
struct PyRngSection {
  std::vector<std::unique_ptr<RngSection>> held;
};

// Blocks on the RNG section without the GIL: the thread inside it may need the GIL to finish.
void wait_without_gil(const std::function<void()>& wait) {
  if (Py_IsInitialized() && PyGILState_Check()) {
    py::gil_scoped_release nogil;
    wait();
  } else {
    wait();
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "revengine C++ executor and kernels";
  set_error_hook(&raise_python_error);
  set_blocking_wait(&wait_without_gil);
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (PythonReversibleError& e) {
      PyErr_SetString(e.python_type(), e.what());
    }
  });
  m.attr("SOURCE_HASH") = REVENGINE_SOURCE_HASH;
  m.attr("TORCH_VERSION") = TORCH_VERSION;

  py::class_<Layer, LayerPtr>(m, "Layer")
      .def_property_readonly("name", &Layer::name)
      .def("parameters", &Layer::parameters)
      .def_property_readonly("supports_exact", &Layer::supports_exact);
  py::class_<AdditiveCoupling, Layer, std::shared_ptr<AdditiveCoupling>>(m, "AdditiveCoupling")
      .def(py::init([](py::object f, py::object g, double lam, double beta) {
             return std::make_shared<AdditiveCoupling>(make_fn(f, "f"), make_fn(g, "g"), lam, beta);
           }),
           py::arg("f"), py::arg("g"), py::arg("lam") = 1.0, py::arg("beta") = 1.0);
  py::class_<AffineCoupling, Layer, std::shared_ptr<AffineCoupling>>(m, "AffineCoupling")
      .def(py::init([](py::object fs, py::object ft, py::object gs, py::object gt, double clamp) {
             return std::make_shared<AffineCoupling>(make_fn(fs, "f_scale"), make_fn(ft, "f_shift"),
                                                     make_fn(gs, "g_scale"), make_fn(gt, "g_shift"), clamp);
           }),
           py::arg("f_scale"), py::arg("f_shift"), py::arg("g_scale"), py::arg("g_shift"), py::arg("clamp") = 2.0);
  py::class_<PyCoupling, Layer, std::shared_ptr<PyCoupling>>(m, "PyCoupling")
      .def(py::init([](py::object module, std::string label) {
             return std::make_shared<PyCoupling>(std::move(module), std::move(label));
           }),
           py::arg("module"), py::arg("name"));
  py::class_<PyHookedLayer, Layer, std::shared_ptr<PyHookedLayer>>(m, "HookedLayer")
      .def(py::init([](LayerPtr inner, py::object module) {
             return std::make_shared<PyHookedLayer>(std::move(inner), std::move(module));
           }),
           py::arg("inner"), py::arg("module"));
  py::class_<LinearMultistep, Layer, std::shared_ptr<LinearMultistep>>(m, "LinearMultistep")
      .def(py::init([](py::object f, double c_prev, double c_cur, double c_f, bool swap, std::string name) {
             return std::make_shared<LinearMultistep>(make_fn(f, "f"), c_prev, c_cur, c_f, swap, name);
           }),
           py::arg("f"), py::arg("c_prev"), py::arg("c_cur"), py::arg("c_f"), py::arg("swap"), py::arg("name"));
  py::class_<BDIA, Layer, std::shared_ptr<BDIA>>(m, "BDIA")
      .def(py::init([](py::object f, double gamma, std::string name) {
             return std::make_shared<BDIA>(make_fn(f, "f"), gamma, name);
           }),
           py::arg("f"), py::arg("gamma"), py::arg("name"))
      .def_property("training", &BDIA::training, &BDIA::set_training)
      .def_static("exact_shift", &BDIA::exact_shift, py::arg("gamma"),
                  "k with gamma = 2^-k (k = 1..8), the gammas exact mode supports; 0 for any other");
  py::class_<StackReport, std::shared_ptr<StackReport>>(m, "StackReport")
      .def_readonly("reconstruction_errors", &StackReport::reconstruction_errors);

  m.def(
      "reversible_forward",
      [](const std::vector<LayerPtr>& layers, const at::Tensor& xa, const at::Tensor& xb,
         std::vector<at::Tensor> ctx_tensors, py::object ctx_builder, bool exact, int64_t frac_bits,
         bool check_finite, bool preserve_rng, bool debug, double debug_tol) {
        auto res = reversible_forward(layers, xa, xb, make_ctx(std::move(ctx_tensors), std::move(ctx_builder)),
                                      make_options(exact, frac_bits, check_finite, preserve_rng, debug, debug_tol));
        return py::make_tuple(res.a, res.b, res.report, res.side_tags, res.side);
      },
      py::arg("layers"), py::arg("xa"), py::arg("xb"), py::arg("ctx_tensors"), py::arg("ctx_builder"),
      py::arg("exact") = false, py::arg("frac_bits") = 16, py::arg("check_finite") = true,
      py::arg("preserve_rng") = true, py::arg("debug") = false, py::arg("debug_tol") = -1.0);
  m.def(
      "reversible_inverse",
      [](const std::vector<LayerPtr>& layers, const at::Tensor& ya, const at::Tensor& yb,
         std::vector<at::Tensor> ctx_tensors, py::object ctx_builder, bool exact, int64_t frac_bits,
         bool check_finite) {
        auto res = reversible_inverse(layers, ya, yb, make_ctx(std::move(ctx_tensors), std::move(ctx_builder)),
                                      make_options(exact, frac_bits, check_finite, false, false, -1.0));
        return py::make_tuple(res.first, res.second);
      },
      py::arg("layers"), py::arg("ya"), py::arg("yb"), py::arg("ctx_tensors"), py::arg("ctx_builder"),
      py::arg("exact") = false, py::arg("frac_bits") = 16, py::arg("check_finite") = true);
  m.def("side_mode", [] { return static_cast<int>(side_mode()); },
        "0: no layer running, 1: a layer's forward (recording), 2: its backward (replaying)");
  m.def("side_tag", &side_tag, py::arg("base"));
  m.def("side_save", &side_save, py::arg("tag"), py::arg("tensor"));
  m.def("side_load", [](const std::string& tag) -> py::object {
    at::Tensor t = side_load(tag);
    return t.defined() ? py::cast(t) : py::none();
  }, py::arg("tag"));
  m.def("side_emit", &side_emit, py::arg("tag"), py::arg("value"));
  m.def("side_grad", [](const std::string& tag) -> py::object {
    at::Tensor t = side_grad(tag);
    return t.defined() ? py::cast(t) : py::none();
  }, py::arg("tag"));
  m.def("is_recomputing", &is_recomputing, "True while revengine re-runs a layer during backward");
  // `with _C.RngSection():` for Python-driven recomputes (checkpoint mode): the same section
  // the executor holds around a layer's snapshot and draws.
  py::class_<PyRngSection>(m, "RngSection")
      .def(py::init<>())
      .def("__enter__", [](PyRngSection& self) { self.held.push_back(std::make_unique<RngSection>(true)); })
      .def("__exit__", [](PyRngSection& self, py::args) {
        TORCH_CHECK(!self.held.empty(), "revengine: RngSection exited more often than entered");
        self.held.pop_back();
        return false;
      });
}
