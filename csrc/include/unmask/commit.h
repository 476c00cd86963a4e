// commit: confidence-based unmasking of a canvas [B, L], in place (docs/design.md, commit).
#pragma once

#include <cmath>
#include <cstdint>

#include "unmask/status.h"

namespace unmask {

// Bound to Python as unmask._C.CommitMode (count, threshold, factor).
// The count each row commits, given its eligible positions and how many pass the
// threshold or factor rule: count mode takes k; the others commit what passes, and at
// least min(floor, eligible) where floor is k in threshold mode when given, else 1.
enum class CommitMode : int { kCount = 0, kThreshold = 1, kFactor = 2 };

struct CommitParams {
  int64_t* canvas;         // [batch, length], contiguous, int64
  const int64_t* tokens;   // [batch, length]
  const float* conf;       // [batch, length]; NaN ranks as -inf
  const double* conf_f64;  // instead of conf: float64 confidences ranked as they are (CPU kernel only)
  const bool* eligible;    // [batch, length]
  bool* committed;         // [batch, length] out
  int64_t batch;
  int64_t length;
  CommitMode mode;
  // [batch]: count mode's counts (a negative count commits nothing), or threshold mode's
  // floor, at least min(k, eligible) committed (null: at least one; SDAR's and LLaDA
  // 2.0's rule, a step's planned count plus whatever else passes the threshold)
  const int64_t* k;
  double threshold;        // threshold mode
  double factor;           // factor mode
};

UNMASK_BUILD_NAMESPACE_BEGIN

inline Status check_commit_params(const CommitParams& p) {
  const int mode = static_cast<int>(p.mode);
  if (mode < 0 || mode > 2) return invalid_argument("mode", mode, "must be a CommitMode");
  if (p.batch < 0) return invalid_argument("batch", static_cast<double>(p.batch), "must be >= 0");
  if (p.length < 0) return invalid_argument("length", static_cast<double>(p.length), "must be >= 0");
  if (p.batch * p.length > 0) {
    if (p.canvas == nullptr) return invalid_argument("canvas", 0, "must not be null");
    if (p.tokens == nullptr) return invalid_argument("tokens", 0, "must not be null");
    if ((p.conf == nullptr) == (p.conf_f64 == nullptr)) {
      return invalid_argument("conf", 0, "exactly one of conf and conf_f64 must be set");
    }
    if (p.eligible == nullptr) return invalid_argument("eligible", 0, "must not be null");
    if (p.committed == nullptr) return invalid_argument("committed", 0, "must not be null");
  }
  if (p.mode == CommitMode::kCount && p.batch > 0 && p.k == nullptr) {
    return invalid_argument("k", 0, "must not be null in count mode");
  }
  if (p.mode == CommitMode::kThreshold && std::isnan(p.threshold)) {
    return invalid_argument("threshold", p.threshold, "must not be NaN");
  }
  if (p.mode == CommitMode::kFactor && !(p.factor > 0.0)) return invalid_argument("factor", p.factor, "must be > 0");
  return ok_status();
}

UNMASK_BUILD_NAMESPACE_END

Status commit_cpu(const CommitParams& params);

UNMASK_BUILD_NAMESPACE_BEGIN
// One block per row; rows up to 4096 positions (longer: unsupported).
Status commit_cuda(const CommitParams& params, void* stream);
UNMASK_BUILD_NAMESPACE_END

}  // namespace unmask
