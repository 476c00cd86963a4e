// pybind11 module unmask._C: the params structs and enums of csrc/include/unmask bound
// as classes whose fields are set by name (a swapped argument cannot pass silently), and
// the launchers taking them. A refused call becomes ValueError (invalid argument),
// NotImplementedError (unsupported) or RuntimeError (CUDA), naming the field and value.
// python/unmask/native.py fills the structs; python/unmask/validation.py checks the
// arguments before that.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "unmask/attention.h"
#include "unmask/attention_cuda.h"
#include "unmask/commit.h"
#include "unmask/cpu_isa.h"
#include "unmask/cuda_info.h"
#include "unmask/rms_norm.h"
#include "unmask/rng.h"
#include "unmask/rotary.h"
#include "unmask/sample.h"
#include "unmask/sample_cuda.h"
#include "simt/launchers.h"
#include "simt/runtime.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace unmask;

namespace {

// Thrown for an unsupported status; translated to NotImplementedError (with the GIL held).
struct Unsupported : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string format_value(double value) {
  char text[64];
  if (std::isfinite(value) && value == std::floor(value) && std::fabs(value) < 1e18) {
    std::snprintf(text, sizeof(text), "%lld", static_cast<long long>(value));
  } else {
    std::snprintf(text, sizeof(text), "%.17g", value);
  }
  return text;
}

// Call after the GIL is back: the exceptions are turned into Python ones by pybind11.
void raise_on_error(const Status& status, const char* op) {
  if (status.ok()) return;
  std::string message = std::string("unmask._C.") + op + ": ";
  if (status.code == StatusCode::kCudaError) throw std::runtime_error(message + last_cuda_error());
  if (status.field != nullptr) {
    message += std::string("params.") + status.field + " = " + format_value(status.value) + " " +
               (status.rule != nullptr ? status.rule : "");
  } else {
    message += status.rule != nullptr ? status.rule : "refused";
  }
  if (status.code == StatusCode::kUnsupported) throw Unsupported(message);
  throw py::value_error(message);
}

// Runs a CPU launcher without the GIL (it may take milliseconds), then raises. The
// params are copied first: another Python thread may change the bound object meanwhile.
template <typename Params>
void run_released(Status (*launcher)(const Params&), const Params& bound_params, const char* op) {
  const Params params = bound_params;
  Status status;
  {
    py::gil_scoped_release release;
    status = launcher(params);
  }
  raise_on_error(status, op);
}

template <typename T>
T* as_pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// A params struct bound field by field. FIELDS lists every bound name, and the keyword
// constructor Struct(**fields) requires each of them exactly (a field left at zero would
// pass unnoticed; a misspelt one would be ignored): one call where setting the fields one
// attribute at a time cost ~0.3 us each, a third of a small kernel call's fixed cost.
template <typename Struct>
class StructBinder {
 public:
  StructBinder(py::module_& m, const char* name, const char* doc)
      : cls_(m, name, doc, py::module_local()), setters_(std::make_shared<Setters>()) {
    cls_.def(py::init<>());
  }
  template <typename T>
  StructBinder& value(const char* name, T Struct::*field) {
    cls_.def_readwrite(name, field);
    return add(name, [field](Struct& s, py::handle value) { s.*field = strict_cast<T>(value); });
  }
  // Pointer fields hold device or host addresses as Python ints (tensor.data_ptr()).
  template <typename T>
  StructBinder& pointer(const char* name, T* Struct::*field) {
    cls_.def_property(
        name, [field](const Struct& s) { return reinterpret_cast<std::uintptr_t>(s.*field); },
        [field](Struct& s, std::uintptr_t address) { s.*field = as_pointer<T>(address); });
    return add(name, [field](Struct& s, py::handle value) { s.*field = as_pointer<T>(strict_cast<std::uintptr_t>(value)); });
  }
  StructBinder& strides(const char* name, int64_t (Struct::*field)[3]) {
    cls_.def_property(
        name,
        [field](const Struct& s) { return std::array<int64_t, 3>{(s.*field)[0], (s.*field)[1], (s.*field)[2]}; },
        [field](Struct& s, const std::array<int64_t, 3>& strides) {
          for (int i = 0; i < 3; ++i) (s.*field)[i] = strides[i];
        });
    return add(name, [field](Struct& s, py::handle value) {
      const auto strides = value.cast<std::array<int64_t, 3>>();
      for (int i = 0; i < 3; ++i) (s.*field)[i] = strides[i];
    });
  }
  // Call last: records FIELDS, the keyword constructor and a repr that shows every field.
  void finish() {
    const std::shared_ptr<const Setters> setters = setters_;
    cls_.attr("FIELDS") = py::tuple(py::cast(setters->names));
    const std::string struct_name = py::str(cls_.attr("__name__"));
    cls_.def(py::init([setters, struct_name](const py::kwargs& fields) {
      Struct s{};
      std::vector<bool> given(setters->names.size(), false);
      std::vector<std::string> unknown;
      for (const auto& [key, value] : fields) {
        const std::string name = py::str(key);
        const auto found = setters->index.find(name);
        if (found == setters->index.end()) {
          unknown.push_back(name);
          continue;
        }
        try {
          setters->set[found->second](s, value);
        } catch (const py::cast_error&) {
          throw py::type_error(struct_name + "." + name + ": cannot take " + std::string(py::repr(value)) + " (a " +
                               std::string(py::str(value.get_type().attr("__name__"))) + ")");
        }
        given[found->second] = true;
      }
      std::vector<std::string> missing;
      for (size_t i = 0; i < given.size(); ++i) {
        if (!given[i]) missing.push_back(setters->names[i]);
      }
      if (!missing.empty() || !unknown.empty()) {
        std::sort(missing.begin(), missing.end());
        std::sort(unknown.begin(), unknown.end());
        throw py::type_error(struct_name + ": missing fields " + python_list(missing) + ", unknown fields " +
                             python_list(unknown));
      }
      return s;
    }));
    // A template's copy, for a prepared launch (unmask.dispatch, plans): the fields a call
    // signature fixes are kept and only its addresses are set, ~1 us where the keyword
    // constructor takes 2-6.
    cls_.def("copy", [](const Struct& s) { return s; });
    const std::vector<std::string> names = setters->names;
    cls_.def("__repr__", [names](const py::object& self) {
      std::string text = py::str(self.get_type().attr("__name__")).cast<std::string>() + "(";
      for (size_t i = 0; i < names.size(); ++i) {
        text += (i ? ", " : "") + names[i] + "=" + py::repr(self.attr(names[i].c_str())).cast<std::string>();
      }
      return text + ")";
    });
  }

 private:
  struct Setters {
    std::vector<std::string> names;  // in binding order
    std::unordered_map<std::string, size_t> index;
    std::vector<std::function<void(Struct&, py::handle)>> set;
  };
  StructBinder& add(const char* name, std::function<void(Struct&, py::handle)> setter) {
    setters_->index.emplace(name, setters_->names.size());
    setters_->names.emplace_back(name);
    setters_->set.push_back(std::move(setter));
    return *this;
  }
  // value as T, converting no more than a field should: a bool field takes True or False
  // only (not None, 2 or a float), an int or address field no bool (an int that does not
  // fit is refused too); floats and enums as pybind11 casts them.
  template <typename T>
  static T strict_cast(py::handle value) {
    if constexpr (std::is_same_v<T, bool>) {
      if (!PyBool_Check(value.ptr())) throw py::cast_error("not a bool");
    } else if constexpr (std::is_integral_v<T>) {
      if (PyBool_Check(value.ptr())) throw py::cast_error("a bool for an int");
    }
    return value.cast<T>();
  }
  // ['a', 'b'], as Python prints a list of names.
  static std::string python_list(const std::vector<std::string>& names) {
    std::string text = "[";
    for (size_t i = 0; i < names.size(); ++i) text += (i ? ", '" : "'") + names[i] + "'";
    return text + "]";
  }

  py::class_<Struct> cls_;
  std::shared_ptr<Setters> setters_;
};

void bind_enums(py::module_& m) {
  py::enum_<ScalarType>(m, "ScalarType", py::module_local())
      .value("float32", ScalarType::kFloat32)
      .value("float16", ScalarType::kFloat16)
      .value("bfloat16", ScalarType::kBFloat16);
  py::enum_<ConfidenceKind>(m, "ConfidenceKind", py::module_local())
      .value("prob", ConfidenceKind::kProb)
      .value("margin", ConfidenceKind::kMargin)
      .value("entropy", ConfidenceKind::kEntropy)
      .value("random", ConfidenceKind::kRandom);
  py::enum_<CommitMode>(m, "CommitMode", py::module_local())
      .value("count", CommitMode::kCount)
      .value("threshold", CommitMode::kThreshold)
      .value("factor", CommitMode::kFactor);
  py::enum_<RngStream>(m, "RngStream", py::module_local())
      .value("gumbel", RngStream::kGumbel)
      .value("random_confidence", RngStream::kRandomConfidence);
}

void bind_structs(py::module_& m) {
  StructBinder<SampleParams>(m, "SampleParams", "unmask/sample.h: one sample launch")
      .pointer("logits", &SampleParams::logits)
      .value("dtype", &SampleParams::dtype)
      .value("n_rows", &SampleParams::n_rows)
      .value("vocab", &SampleParams::vocab)
      .value("select_rows", &SampleParams::select_rows)
      .pointer("rows", &SampleParams::rows)
      .value("n_selected", &SampleParams::n_selected)
      .pointer("banned", &SampleParams::banned)
      .value("n_banned", &SampleParams::n_banned)
      .value("temperature", &SampleParams::temperature)
      .value("top_k", &SampleParams::top_k)
      .value("top_p", &SampleParams::top_p)
      .value("confidence", &SampleParams::confidence)
      .value("conf_temperature", &SampleParams::conf_temperature)
      .value("seed", &SampleParams::seed)
      .value("offset", &SampleParams::offset)
      .pointer("offsets", &SampleParams::offsets)
      .value("offsets_stride", &SampleParams::offsets_stride)
      .pointer("tokens", &SampleParams::tokens)
      .pointer("conf", &SampleParams::conf)
      .finish();

  StructBinder<SampleCudaExtras>(m, "SampleCudaExtras", "unmask/sample_cuda.h: what only the GPU launch needs")
      .pointer("workspace", &SampleCudaExtras::workspace)
      .value("workspace_bytes", &SampleCudaExtras::workspace_bytes)
      .finish();

  StructBinder<CommitParams>(m, "CommitParams", "unmask/commit.h: one commit launch")
      .pointer("canvas", &CommitParams::canvas)
      .pointer("tokens", &CommitParams::tokens)
      .pointer("conf", &CommitParams::conf)
      .pointer("conf_f64", &CommitParams::conf_f64)
      .pointer("eligible", &CommitParams::eligible)
      .pointer("committed", &CommitParams::committed)
      .value("batch", &CommitParams::batch)
      .value("length", &CommitParams::length)
      .value("mode", &CommitParams::mode)
      .pointer("k", &CommitParams::k)
      .value("threshold", &CommitParams::threshold)
      .value("factor", &CommitParams::factor)
      .finish();

  StructBinder<AttentionParams>(m, "AttentionParams", "unmask/attention.h: one attention launch")
      .pointer("q", &AttentionParams::q)
      .pointer("k", &AttentionParams::k)
      .pointer("v", &AttentionParams::v)
      .pointer("out", &AttentionParams::out)
      .value("dtype", &AttentionParams::dtype)
      .value("batch", &AttentionParams::batch)
      .value("q_len", &AttentionParams::q_len)
      .value("k_len", &AttentionParams::k_len)
      .value("q_heads", &AttentionParams::q_heads)
      .value("kv_heads", &AttentionParams::kv_heads)
      .value("head_dim", &AttentionParams::head_dim)
      .strides("q_stride", &AttentionParams::q_stride)
      .strides("k_stride", &AttentionParams::k_stride)
      .strides("v_stride", &AttentionParams::v_stride)
      .strides("out_stride", &AttentionParams::out_stride)
      .pointer("kv_len", &AttentionParams::kv_len)
      .pointer("key_valid", &AttentionParams::key_valid)
      .value("block_size", &AttentionParams::block_size)
      .value("q_offset", &AttentionParams::q_offset)
      .value("scale", &AttentionParams::scale)
      .finish();

  StructBinder<RmsNormParams>(m, "RmsNormParams", "unmask/rms_norm.h: one rms_norm launch")
      .pointer("x", &RmsNormParams::x)
      .pointer("weight", &RmsNormParams::weight)
      .pointer("out", &RmsNormParams::out)
      .value("dtype", &RmsNormParams::dtype)
      .value("weight_dtype", &RmsNormParams::weight_dtype)
      .value("rows", &RmsNormParams::rows)
      .value("dim", &RmsNormParams::dim)
      .value("x_row_stride", &RmsNormParams::x_row_stride)
      .value("eps", &RmsNormParams::eps)
      .finish();

  StructBinder<RotaryParams>(m, "RotaryParams", "unmask/rotary.h: one rotary launch")
      .pointer("x", &RotaryParams::x)
      .pointer("out", &RotaryParams::out)
      .value("dtype", &RotaryParams::dtype)
      .value("batch", &RotaryParams::batch)
      .value("length", &RotaryParams::length)
      .value("heads", &RotaryParams::heads)
      .value("head_dim", &RotaryParams::head_dim)
      .strides("x_stride", &RotaryParams::x_stride)
      .strides("out_stride", &RotaryParams::out_stride)
      .pointer("cos", &RotaryParams::cos)
      .pointer("sin", &RotaryParams::sin)
      .value("table_batch", &RotaryParams::table_batch)
      .finish();

  StructBinder<DrawParams>(m, "DrawParams", "unmask/rng.h: raw Philox draws")
      .pointer("out", &DrawParams::out)
      .value("rows", &DrawParams::rows)
      .value("cols", &DrawParams::cols)
      .value("row_begin", &DrawParams::row_begin)
      .value("seed", &DrawParams::seed)
      .value("offset", &DrawParams::offset)
      .value("stream", &DrawParams::stream)
      .finish();

  StructBinder<PhiloxBlockParams>(m, "PhiloxBlockParams", "unmask/rng.h: the plain generator over counters")
      .pointer("counters", &PhiloxBlockParams::counters)
      .pointer("out", &PhiloxBlockParams::out)
      .value("n", &PhiloxBlockParams::n)
      .value("key0", &PhiloxBlockParams::key0)
      .value("key1", &PhiloxBlockParams::key1)
      .finish();
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (int i = 0; i < cpu_isa_count(); ++i) names.emplace_back(cpu_isa_name(i));
  return names;
}

void select_isa(const std::string& name) {
  if (select_cpu_isa(name.c_str()).ok()) return;
  std::string runnable;
  for (const std::string& isa : cpu_isas()) {
    if (cpu_isa_supported(isa.c_str())) runnable += (runnable.empty() ? "" : ", ") + isa;
  }
  throw py::value_error("isa " + name + " is not available: this module and CPU run " + runnable);
}

// (host pointer, bytes, name) of each tensor an interpreted launch may touch.
using BufferList = std::vector<std::tuple<std::uintptr_t, int64_t, std::string>>;

// Runs interpreted launches in a session over `buffers` without the GIL; a failed check
// raises RuntimeError with the interpreter's report, a refused call as the real launcher.
template <typename Launch>
void run_interpreted(const BufferList& buffers, const char* op, Launch launch) {
  std::vector<simt::Buffer> regions;
  for (const auto& [address, bytes, name] : buffers) {
    regions.push_back(simt::Buffer{address, static_cast<size_t>(bytes), name});
  }
  Status status;
  bool failed = false;
  std::string report;
  {
    py::gil_scoped_release release;
    simt::Session session(std::move(regions));
    status = launch();
    failed = session.failed();
    report = session.error();
  }
  if (failed) throw std::runtime_error(std::string("unmask._C.") + op + ": " + report);
  if (status.code == StatusCode::kCudaError) throw std::runtime_error(std::string("unmask._C.") + op + ": launch failed");
  raise_on_error(status, op);
}

void bind_interpreter(py::module_& m) {
  m.def("simt_available", &simt::available, "whether this module holds the SIMT interpreter");
  m.def("simt_set_sm_count", &simt::set_sm_count, py::arg("count"));
  m.def("simt_sm_count", &simt::sm_count);
  m.def("simt_reset_stats", &simt::reset_stats);
  m.def("simt_stats", []() {
    const simt::Stats s = simt::stats();
    py::dict stats;
    stats["launches"] = s.launches;
    stats["blocks"] = s.blocks;
    stats["threads"] = s.threads;
    stats["switches"] = s.switches;
    stats["seconds"] = s.seconds;
    return stats;
  });
  m.def(
      "sample_cuda_interpret",
      [](const SampleParams& params, const SampleCudaExtras& extras, const BufferList& buffers) {
        const SampleParams p = params;
        const SampleCudaExtras e = extras;
        run_interpreted(buffers, "sample_cuda_interpret", [&] { return simt::sample_cuda(p, e); });
      },
      py::arg("params"), py::kw_only(), py::arg("extras"), py::arg("buffers"));
  m.def("sample_cuda_interpret_workspace_bytes", &simt::sample_cuda_workspace_bytes, py::arg("params"));
  m.def(
      "commit_cuda_interpret",
      [](const CommitParams& params, const BufferList& buffers) {
        const CommitParams p = params;
        run_interpreted(buffers, "commit_cuda_interpret", [&] { return simt::commit_cuda(p); });
      },
      py::arg("params"), py::kw_only(), py::arg("buffers"));
  m.def(
      "attention_cuda_interpret",
      [](const AttentionParams& params, std::uintptr_t workspace, int64_t workspace_bytes, const BufferList& buffers) {
        const AttentionParams p = params;
        run_interpreted(buffers, "attention_cuda_interpret", [&] {
          return simt::attention_cuda(p, as_pointer<void>(workspace), workspace_bytes);
        });
      },
      py::arg("params"), py::kw_only(), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("buffers"));
  m.def("attention_cuda_interpret_workspace_bytes", &simt::attention_cuda_workspace_bytes, py::arg("params"));
  m.def(
      "fill_draws_cuda_interpret",
      [](const DrawParams& params, const BufferList& buffers) {
        const DrawParams p = params;
        run_interpreted(buffers, "fill_draws_cuda_interpret", [&] { return simt::fill_draws_cuda(p); });
      },
      py::arg("params"), py::kw_only(), py::arg("buffers"));
  m.def(
      "simt_test_kernel",
      [](const std::string& name, std::uintptr_t data, int64_t data_bytes, std::uintptr_t out, int64_t out_bytes) {
        const BufferList buffers = {{data, data_bytes, "data"}, {out, out_bytes, "out"}};
        run_interpreted(buffers, "simt_test_kernel", [&] {
          return simt::test_kernel(name, as_pointer<void>(data), data_bytes, as_pointer<void>(out), out_bytes);
        });
      },
      py::arg("name"), py::arg("data"), py::arg("data_bytes"), py::arg("out"), py::arg("out_bytes"));
}

int openmp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "unmask native kernels (C++ CPU, CUDA where built)";
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const Unsupported& unsupported) {
      PyErr_SetString(PyExc_NotImplementedError, unsupported.what());
    }
  });

  bind_enums(m);
  bind_structs(m);
  bind_interpreter(m);

  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("openmp_threads", &openmp_threads);
  m.def("cpu_isas", &cpu_isas, "the CPU instruction-set builds compiled in, best first");
  m.def("cpu_isa_supported", [](const std::string& name) { return cpu_isa_supported(name.c_str()); },
        py::arg("name"));
  m.def("select_cpu_isa", &select_isa, py::arg("name"));
  m.def("cpu_isa", []() { return std::string(active_cpu_isa()); }, "the build the CPU kernels run");
  m.def("cpu_vendor", []() { return std::string(cpu_vendor()); }, "CPUID's vendor string (empty off x86-64)");

  m.def("sample_cpu", [](const SampleParams& params) { run_released(&sample_cpu, params, "sample_cpu"); },
        py::arg("params"));
  m.def("attention_cpu", [](const AttentionParams& params) { run_released(&attention_cpu, params, "attention_cpu"); },
        py::arg("params"));
  m.def("commit_cpu", [](const CommitParams& params) { run_released(&commit_cpu, params, "commit_cpu"); },
        py::arg("params"));
  m.def("rms_norm_cpu", [](const RmsNormParams& params) { run_released(&rms_norm_cpu, params, "rms_norm_cpu"); },
        py::arg("params"));
  m.def("rotary_cpu", [](const RotaryParams& params) { run_released(&rotary_cpu, params, "rotary_cpu"); },
        py::arg("params"));
  m.def("fill_draws_cpu", [](const DrawParams& params) { run_released(&fill_draws_cpu, params, "fill_draws_cpu"); },
        py::arg("params"));
  m.def("philox_blocks_cpu",
        [](const PhiloxBlockParams& params) { run_released(&philox_blocks_cpu, params, "philox_blocks_cpu"); },
        py::arg("params"));

  // CUDA launchers only enqueue work (no synchronisation), so they keep the GIL.
  m.def(
      "sample_cuda",
      [](const SampleParams& params, const SampleCudaExtras& extras, std::uintptr_t stream) {
        raise_on_error(sample_cuda(params, extras, as_pointer<void>(stream)), "sample_cuda");
      },
      py::arg("params"), py::kw_only(), py::arg("extras"), py::arg("stream"));
  m.def("sample_cuda_workspace_bytes", &sample_cuda_workspace_bytes, py::arg("params"));
  m.def(
      "attention_cuda",
      [](const AttentionParams& params, std::uintptr_t workspace, int64_t workspace_bytes, std::uintptr_t stream) {
        raise_on_error(attention_cuda(params, as_pointer<void>(workspace), workspace_bytes, as_pointer<void>(stream)),
                       "attention_cuda");
      },
      py::arg("params"), py::kw_only(), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));
  // The shapes, block_size, q_offset and the current device's SM count decide the split
  // count and so the workspace; the pointers are not read.
  m.def("attention_cuda_workspace_bytes", &attention_cuda_workspace_bytes, py::arg("params"));
  m.def(
      "commit_cuda",
      [](const CommitParams& params, std::uintptr_t stream) {
        raise_on_error(commit_cuda(params, as_pointer<void>(stream)), "commit_cuda");
      },
      py::arg("params"), py::kw_only(), py::arg("stream"));
  m.def(
      "fill_draws_cuda",
      [](const DrawParams& params, std::uintptr_t stream) {
        raise_on_error(fill_draws_cuda(params, as_pointer<void>(stream)), "fill_draws_cuda");
      },
      py::arg("params"), py::kw_only(), py::arg("stream"));
}
