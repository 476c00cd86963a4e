// pybind11 module unmask._C: raw pointers, shapes, strides and streams in; no
// validation beyond what keeps the process alive (python/unmask/ops.py validates).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include <cstdint>
#include <string>

#include "unmask/attention.h"
#include "unmask/attention_cuda.h"
#include "unmask/commit.h"
#include "unmask/cuda_info.h"
#include "unmask/rng.h"
#include "unmask/sample.h"
#include "unmask/sample_cuda.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace unmask;

namespace {

template <typename T>
T* as_pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void raise_on_error(Status status, const char* op) {
  if (status == Status::kOk) return;
  const std::string where = std::string("unmask._C.") + op + ": ";
  switch (status) {
    case Status::kInvalidArgument: throw py::value_error(where + "invalid argument");
    case Status::kCudaError: throw std::runtime_error(where + last_cuda_error());
    case Status::kUnsupported:
      PyErr_SetString(PyExc_NotImplementedError, (where + "not supported by this build").c_str());
      throw py::error_already_set();
    default: throw std::runtime_error(where + status_name(status));
  }
}

DrawParams draw_params(std::uintptr_t out, int64_t rows, int64_t cols, int64_t row_begin,
                       uint64_t seed, uint32_t offset, uint32_t stream) {
  return DrawParams{as_pointer<uint32_t>(out), rows, cols, row_begin, seed, offset,
                    static_cast<RngStream>(stream)};
}

SampleParams sample_params(std::uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab, std::uintptr_t rows,
                           int64_t n_selected, std::uintptr_t banned, int64_t n_banned, double temperature,
                           int64_t top_k, double top_p, int confidence, double conf_temperature, uint64_t seed,
                           uint32_t offset, std::uintptr_t tokens, std::uintptr_t conf) {
  return SampleParams{as_pointer<const void>(logits), static_cast<ScalarType>(dtype), n_rows, vocab,
                      as_pointer<const int64_t>(rows), n_selected, as_pointer<const int64_t>(banned), n_banned,
                      temperature, top_k, top_p, static_cast<ConfidenceKind>(confidence), conf_temperature, seed,
                      offset, as_pointer<int64_t>(tokens), as_pointer<float>(conf)};
}

CommitParams commit_params(std::uintptr_t canvas, std::uintptr_t tokens, std::uintptr_t conf, std::uintptr_t eligible,
                           std::uintptr_t committed, int64_t batch, int64_t length, int mode, std::uintptr_t k,
                           double threshold, double factor) {
  return CommitParams{as_pointer<int64_t>(canvas), as_pointer<const int64_t>(tokens), as_pointer<const float>(conf),
                      as_pointer<const bool>(eligible), as_pointer<bool>(committed), batch, length,
                      static_cast<CommitMode>(mode), as_pointer<const int64_t>(k), threshold, factor};
}

AttentionParams attention_params(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, int dtype,
                                 const std::array<int64_t, 6>& sizes, const std::array<int64_t, 3>& q_stride,
                                 const std::array<int64_t, 3>& k_stride, const std::array<int64_t, 3>& v_stride,
                                 const std::array<int64_t, 3>& out_stride, std::uintptr_t kv_len,
                                 std::uintptr_t key_valid, int64_t block_size, int64_t q_offset, float scale) {
  return AttentionParams{as_pointer<const void>(q), as_pointer<const void>(k), as_pointer<const void>(v),
                         as_pointer<void>(out), static_cast<ScalarType>(dtype), sizes[0], sizes[1], sizes[2],
                         sizes[3], sizes[4], sizes[5], {q_stride[0], q_stride[1], q_stride[2]},
                         {k_stride[0], k_stride[1], k_stride[2]}, {v_stride[0], v_stride[1], v_stride[2]},
                         {out_stride[0], out_stride[1], out_stride[2]}, as_pointer<const int64_t>(kv_len),
                         as_pointer<const bool>(key_valid), block_size, q_offset, scale};
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

  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("openmp_threads", &openmp_threads);

  m.def(
      "fill_draws_cpu",
      [](std::uintptr_t out, int64_t rows, int64_t cols, int64_t row_begin, uint64_t seed,
         uint32_t offset, uint32_t stream) {
        py::gil_scoped_release release;
        raise_on_error(fill_draws_cpu(draw_params(out, rows, cols, row_begin, seed, offset, stream)),
                       "fill_draws_cpu");
      },
      py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("row_begin"), py::arg("seed"),
      py::arg("offset"), py::arg("stream"));

  m.def(
      "fill_draws_cuda",
      [](std::uintptr_t out, int64_t rows, int64_t cols, int64_t row_begin, uint64_t seed,
         uint32_t offset, uint32_t stream, std::uintptr_t cuda_stream) {
        raise_on_error(fill_draws_cuda(draw_params(out, rows, cols, row_begin, seed, offset, stream),
                                       as_pointer<void>(cuda_stream)),
                       "fill_draws_cuda");
      },
      py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("row_begin"), py::arg("seed"),
      py::arg("offset"), py::arg("stream"), py::arg("cuda_stream"));

  m.def(
      "sample_cpu",
      [](std::uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab, std::uintptr_t rows, int64_t n_selected,
         std::uintptr_t banned, int64_t n_banned, double temperature, int64_t top_k, double top_p, int confidence,
         double conf_temperature, uint64_t seed, uint32_t offset, std::uintptr_t tokens, std::uintptr_t conf) {
        const SampleParams params = sample_params(logits, dtype, n_rows, vocab, rows, n_selected, banned, n_banned,
                                                  temperature, top_k, top_p, confidence, conf_temperature, seed,
                                                  offset, tokens, conf);
        py::gil_scoped_release release;
        raise_on_error(sample_cpu(params), "sample_cpu");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"), py::arg("rows"),
      py::arg("n_selected"), py::arg("banned"), py::arg("n_banned"), py::arg("temperature"), py::arg("top_k"),
      py::arg("top_p"), py::arg("confidence"), py::arg("conf_temperature"), py::arg("seed"), py::arg("offset"),
      py::arg("tokens"), py::arg("conf"));

  m.def(
      "sample_cuda",
      [](std::uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab, std::uintptr_t rows, int64_t n_selected,
         std::uintptr_t banned, int64_t n_banned, double temperature, double conf_temperature, int confidence,
         uint64_t seed, uint32_t offset, std::uintptr_t seed_device, std::uintptr_t offset_device,
         std::uintptr_t workspace, int64_t workspace_bytes, std::uintptr_t tokens, std::uintptr_t conf,
         std::uintptr_t cuda_stream) {
        const SampleParams params = sample_params(logits, dtype, n_rows, vocab, rows, n_selected, banned, n_banned,
                                                  temperature, 0, 1.0, confidence, conf_temperature, seed, offset,
                                                  tokens, conf);
        SampleCudaExtras extras;
        extras.seed_device = as_pointer<const uint64_t>(seed_device);
        extras.offset_device = as_pointer<const uint32_t>(offset_device);
        extras.workspace = as_pointer<void>(workspace);
        extras.workspace_bytes = workspace_bytes;
        raise_on_error(sample_cuda(params, extras, as_pointer<void>(cuda_stream)), "sample_cuda");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"), py::arg("rows"),
      py::arg("n_selected"), py::arg("banned"), py::arg("n_banned"), py::arg("temperature"),
      py::arg("conf_temperature"), py::arg("confidence"), py::arg("seed"), py::arg("offset"), py::arg("seed_device"),
      py::arg("offset_device"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("tokens"), py::arg("conf"),
      py::arg("cuda_stream"));

  m.def("sample_cuda_workspace_bytes", &sample_cuda_workspace_bytes, py::arg("rows"), py::arg("vocab"));

  m.def(
      "attention_cpu",
      [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, int dtype,
         std::array<int64_t, 6> sizes, std::array<int64_t, 3> q_stride, std::array<int64_t, 3> k_stride,
         std::array<int64_t, 3> v_stride, std::array<int64_t, 3> out_stride, std::uintptr_t kv_len,
         std::uintptr_t key_valid, int64_t block_size, int64_t q_offset, float scale) {
        const AttentionParams params = attention_params(q, k, v, out, dtype, sizes, q_stride, k_stride, v_stride,
                                                        out_stride, kv_len, key_valid, block_size, q_offset, scale);
        py::gil_scoped_release release;
        raise_on_error(attention_cpu(params), "attention_cpu");
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("dtype"),
      py::arg("sizes"), py::arg("q_stride"), py::arg("k_stride"), py::arg("v_stride"), py::arg("out_stride"),
      py::arg("kv_len"), py::arg("key_valid"), py::arg("block_size"), py::arg("q_offset"), py::arg("scale"));

  m.def(
      "attention_cuda",
      [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, int dtype,
         std::array<int64_t, 6> sizes, std::array<int64_t, 3> q_stride, std::array<int64_t, 3> k_stride,
         std::array<int64_t, 3> v_stride, std::array<int64_t, 3> out_stride, std::uintptr_t kv_len,
         std::uintptr_t key_valid, int64_t block_size, int64_t q_offset, float scale, std::uintptr_t workspace,
         int64_t workspace_bytes, std::uintptr_t cuda_stream) {
        const AttentionParams params = attention_params(q, k, v, out, dtype, sizes, q_stride, k_stride, v_stride,
                                                        out_stride, kv_len, key_valid, block_size, q_offset, scale);
        raise_on_error(attention_cuda(params, as_pointer<void>(workspace), workspace_bytes,
                                      as_pointer<void>(cuda_stream)),
                       "attention_cuda");
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("dtype"),
      py::arg("sizes"), py::arg("q_stride"), py::arg("k_stride"), py::arg("v_stride"), py::arg("out_stride"),
      py::arg("kv_len"), py::arg("key_valid"), py::arg("block_size"), py::arg("q_offset"), py::arg("scale"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("cuda_stream"));

  // The shapes, block_size, q_offset and the current device's SM count decide the split
  // count and so the workspace: no pointers needed.
  m.def(
      "attention_cuda_workspace_bytes",
      [](std::array<int64_t, 6> sizes, int64_t block_size, int64_t q_offset) {
        AttentionParams params{};
        params.batch = sizes[0];
        params.q_len = sizes[1];
        params.k_len = sizes[2];
        params.q_heads = sizes[3];
        params.kv_heads = sizes[4];
        params.head_dim = sizes[5];
        params.block_size = block_size;
        params.q_offset = q_offset;
        return attention_cuda_workspace_bytes(params);
      },
      py::arg("sizes"), py::arg("block_size"), py::arg("q_offset"));

  m.def(
      "commit_cpu",
      [](std::uintptr_t canvas, std::uintptr_t tokens, std::uintptr_t conf, std::uintptr_t eligible,
         std::uintptr_t committed, int64_t batch, int64_t length, int mode, std::uintptr_t k, double threshold,
         double factor) {
        const CommitParams params =
            commit_params(canvas, tokens, conf, eligible, committed, batch, length, mode, k, threshold, factor);
        py::gil_scoped_release release;
        raise_on_error(commit_cpu(params), "commit_cpu");
      },
      py::arg("canvas"), py::arg("tokens"), py::arg("conf"), py::arg("eligible"), py::arg("committed"),
      py::arg("batch"), py::arg("length"), py::arg("mode"), py::arg("k"), py::arg("threshold"), py::arg("factor"));

  m.def(
      "commit_cuda",
      [](std::uintptr_t canvas, std::uintptr_t tokens, std::uintptr_t conf, std::uintptr_t eligible,
         std::uintptr_t committed, int64_t batch, int64_t length, int mode, std::uintptr_t k, double threshold,
         double factor, std::uintptr_t cuda_stream) {
        const CommitParams params =
            commit_params(canvas, tokens, conf, eligible, committed, batch, length, mode, k, threshold, factor);
        raise_on_error(commit_cuda(params, as_pointer<void>(cuda_stream)), "commit_cuda");
      },
      py::arg("canvas"), py::arg("tokens"), py::arg("conf"), py::arg("eligible"), py::arg("committed"),
      py::arg("batch"), py::arg("length"), py::arg("mode"), py::arg("k"), py::arg("threshold"), py::arg("factor"),
      py::arg("cuda_stream"));

  m.def(
      "philox_blocks_cpu",
      [](std::uintptr_t counters, std::uintptr_t out, int64_t n, uint32_t key0, uint32_t key1) {
        py::gil_scoped_release release;
        raise_on_error(philox_blocks_cpu(PhiloxBlockParams{as_pointer<const uint32_t>(counters),
                                                           as_pointer<uint32_t>(out), n, key0, key1}),
                       "philox_blocks_cpu");
      },
      py::arg("counters"), py::arg("out"), py::arg("n"), py::arg("key0"), py::arg("key1"));
}
