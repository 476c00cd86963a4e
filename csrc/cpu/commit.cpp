// commit on the CPU: per row, rank the eligible positions by (conf desc, position asc)
// and commit a prefix whose length the mode decides. Rows are short (a block of 32-1024
// positions), so a sort per row costs less than the launch of anything cleverer. Scalar
// code: compiled once, for the baseline, not per instruction set.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "unmask/commit.h"

namespace unmask {
namespace {

int64_t commit_count(const CommitParams& p, int64_t row, const std::vector<std::pair<double, int64_t>>& ranked) {
  const int64_t eligible = static_cast<int64_t>(ranked.size());
  if (eligible == 0) return 0;
  switch (p.mode) {
    case CommitMode::kCount: return std::min(std::max<int64_t>(p.k[row], 0), eligible);
    case CommitMode::kThreshold: {
      int64_t passing = 0;
      while (passing < eligible && ranked[passing].first > p.threshold) ++passing;
      const int64_t floor = p.k != nullptr ? std::max<int64_t>(p.k[row], 0) : 1;
      return std::max(passing, std::min(floor, eligible));
    }
    case CommitMode::kFactor: {
      // (n + 1) * (1 - c_n) grows with n: the n that satisfy the rule form a prefix.
      int64_t n = 0;
      while (n < eligible && (n + 2) * (1.0 - ranked[n].first) < p.factor) ++n;
      return std::max<int64_t>(n, 1);
    }
  }
  return 0;
}

}  // namespace

Status commit_cpu(const CommitParams& p) {
  const Status status = check_commit_params(p);
  if (!status.ok()) return status;
#pragma omp parallel for schedule(static) if (p.batch * p.length > 4096)
  for (int64_t row = 0; row < p.batch; ++row) {
    const int64_t base = row * p.length;
    std::vector<std::pair<double, int64_t>> ranked;  // (conf, position) of eligible positions
    ranked.reserve(p.length);
    for (int64_t j = 0; j < p.length; ++j) {
      p.committed[base + j] = false;
      if (!p.eligible[base + j]) continue;
      const double c = p.conf != nullptr ? static_cast<double>(p.conf[base + j]) : p.conf_f64[base + j];
      ranked.emplace_back(std::isnan(c) ? -std::numeric_limits<double>::infinity() : c, j);
    }
    std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    const int64_t n = commit_count(p, row, ranked);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t j = ranked[r].second;
      p.committed[base + j] = true;
      p.canvas[base + j] = p.tokens[base + j];
    }
  }
  return ok_status();
}

}  // namespace unmask
