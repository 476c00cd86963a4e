// sample: one token and its confidence per row of logits [N, V] (docs/design.md, sample).
#pragma once

#include <cmath>
#include <cstdint>

#include "unmask/philox.h"
#include "unmask/status.h"
#include "unmask/types.h"

namespace unmask {

// Bound to Python as unmask._C.ConfidenceKind, whose names are the confidence kinds of
// unmask.validation.CONFIDENCE_KINDS (tested).
enum class ConfidenceKind : int { kProb = 0, kMargin = 1, kEntropy = 2, kRandom = 3 };

struct SampleParams {
  const void* logits;  // [n_rows, vocab], contiguous
  ScalarType dtype;
  int64_t n_rows;
  int64_t vocab;
  // select_rows false: every row. true: only the n_selected row ids at rows (n_selected
  // may be 0: nothing is sampled); the other rows get -1 and -inf. An explicit flag, not
  // a null pointer, says which: an empty index tensor has a null data pointer too.
  bool select_rows;
  const int64_t* rows;  // [n_selected], each in [0, n_rows)
  int64_t n_selected;
  const int64_t* banned;  // ids in [0, vocab), any order; may be nullptr when n_banned == 0
  int64_t n_banned;
  double temperature;  // 0: argmax
  int64_t top_k;       // 0: no top-k filter
  double top_p;        // 1: no top-p filter
  ConfidenceKind confidence;
  double conf_temperature;
  uint64_t seed;
  uint32_t offset;
  // Optional step offsets read by the kernels instead of `offset` (their low 32 bits):
  // offsets[row * offsets_stride], stride 0 for one shared value, 1 for one per row. In
  // the memory of the launch's device (so a captured CUDA graph replays with the values
  // they hold then, and rows of one call may sit at different steps of their schedules).
  const int64_t* offsets;
  int64_t offsets_stride;
  int64_t* tokens;  // [n_rows] out: -1 for rows not sampled or invalid
  float* conf;      // [n_rows] out: -inf for rows not sampled or invalid
};

UNMASK_BUILD_NAMESPACE_BEGIN

// The rules every sample launcher applies to its params (what the arrays hold on the
// device is checked by each launcher where it can read it).
inline Status check_sample_params(const SampleParams& p) {
  const int dtype = static_cast<int>(p.dtype), confidence = static_cast<int>(p.confidence);
  if (dtype < 0 || dtype > 2) return invalid_argument("dtype", dtype, "must be a ScalarType");
  if (p.n_rows < 0) return invalid_argument("n_rows", static_cast<double>(p.n_rows), "must be >= 0");
  if (p.vocab < 1) return invalid_argument("vocab", static_cast<double>(p.vocab), "must be >= 1");
  if (p.n_rows > 0 && p.logits == nullptr) return invalid_argument("logits", 0, "must not be null when n_rows > 0");
  if (p.n_rows > 0 && p.tokens == nullptr) return invalid_argument("tokens", 0, "must not be null when n_rows > 0");
  if (p.n_rows > 0 && p.conf == nullptr) return invalid_argument("conf", 0, "must not be null when n_rows > 0");
  if (p.select_rows && p.n_selected < 0) {
    return invalid_argument("n_selected", static_cast<double>(p.n_selected), "must be >= 0");
  }
  if (p.select_rows && p.n_selected > 0 && p.rows == nullptr) {
    return invalid_argument("rows", 0, "must not be null when n_selected > 0");
  }
  if (p.offsets_stride != 0 && p.offsets_stride != 1) {
    return invalid_argument("offsets_stride", static_cast<double>(p.offsets_stride), "must be 0 or 1");
  }
  if (p.n_banned < 0) return invalid_argument("n_banned", static_cast<double>(p.n_banned), "must be >= 0");
  if (p.n_banned > 0 && p.banned == nullptr) return invalid_argument("banned", 0, "must not be null when n_banned > 0");
  if (!(p.temperature >= 0.0) || !std::isfinite(p.temperature)) {
    return invalid_argument("temperature", p.temperature, "must be finite and >= 0");
  }
  if (p.top_k < 0) return invalid_argument("top_k", static_cast<double>(p.top_k), "must be >= 0");
  if (!(p.top_p > 0.0 && p.top_p <= 1.0)) return invalid_argument("top_p", p.top_p, "must lie in (0, 1]");
  if (confidence < 0 || confidence > 3) return invalid_argument("confidence", confidence, "must be a ConfidenceKind");
  // The kernels scale by 1 / conf_temperature in float32, which overflows below ~3e-39.
  if (!(p.conf_temperature >= 1e-30) || !std::isfinite(p.conf_temperature)) {
    return invalid_argument("conf_temperature", p.conf_temperature, "must be finite and >= 1e-30");
  }
  return ok_status();
}

// The step offset of one row (SampleParams::offsets, else SampleParams::offset).
UNMASK_HOST_DEVICE uint32_t row_offset(const SampleParams& p, int64_t row) {
  return p.offsets != nullptr ? static_cast<uint32_t>(p.offsets[row * p.offsets_stride]) : p.offset;
}

UNMASK_BUILD_NAMESPACE_END

// Rows and banned ids are checked before anything is written: an id outside [0, n_rows)
// or [0, vocab) is an invalid argument naming it.
Status sample_cpu(const SampleParams& params);

}  // namespace unmask
