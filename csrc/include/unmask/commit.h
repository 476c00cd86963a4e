// commit: confidence-based unmasking of a canvas [B, L], in place (DESIGN.md, commit).
#pragma once

#include <cstdint>

#include "unmask/status.h"

namespace unmask {

enum class CommitMode : int { kCount = 0, kThreshold = 1, kFactor = 2 };

struct CommitParams {
  int64_t* canvas;         // [batch, length], contiguous, int64
  const int64_t* tokens;   // [batch, length]
  const float* conf;       // [batch, length]; NaN ranks as -inf
  const bool* eligible;    // [batch, length]
  bool* committed;         // [batch, length] out
  int64_t batch;
  int64_t length;
  CommitMode mode;
  const int64_t* k;        // [batch], count mode
  double threshold;        // threshold mode
  double factor;           // factor mode
};

Status commit_cpu(const CommitParams& params);
// One block per row; rows up to 4096 positions (longer: Status::kUnsupported).
Status commit_cuda(const CommitParams& params, void* stream);

}  // namespace unmask
