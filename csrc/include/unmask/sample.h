// sample: one token and its confidence per row of logits [N, V] (DESIGN.md, sample).
#pragma once

#include <cstdint>

#include "unmask/status.h"
#include "unmask/types.h"

namespace unmask {

enum class ConfidenceKind : int { kProb = 0, kMargin = 1, kEntropy = 2, kRandom = 3 };

struct SampleParams {
  const void* logits;  // [n_rows, vocab], contiguous
  ScalarType dtype;
  int64_t n_rows;
  int64_t vocab;
  const int64_t* rows;  // the row ids to sample, or nullptr for every row
  int64_t n_selected;
  const int64_t* banned;  // sorted, unique ids in [0, vocab); may be nullptr when n_banned == 0
  int64_t n_banned;
  double temperature;  // 0: argmax
  int64_t top_k;       // 0: no top-k filter
  double top_p;        // 1: no top-p filter
  ConfidenceKind confidence;
  double conf_temperature;
  uint64_t seed;
  uint32_t offset;
  int64_t* tokens;  // [n_rows] out: -1 for rows not sampled or invalid
  float* conf;      // [n_rows] out: -inf for rows not sampled or invalid
};

Status sample_cpu(const SampleParams& params);

}  // namespace unmask
