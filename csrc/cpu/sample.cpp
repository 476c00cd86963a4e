// sample on the CPU: every row of logits is read from memory once.
//
// Per row (one OpenMP thread per row), in chunks of kChunk ids that stay in L1:
//   load    convert to float, ban ids, and find max, first argmax and NaN/+inf, then
//           the softmax sums of the chunk (online, rescaled when the maximum rises);
//           most chunks in a single pass that prefetches 4 KiB ahead (load_and_scan).
//           Rows that are read again below keep the whole row in a per-thread buffer
//           that stays in L2 (V = 152064 floats = 594 KiB); greedy rows reuse one
//           chunk-sized slot.
//   filter  top_k / top_p as a kept prefix of the order (value desc, id asc): vector
//           passes find a few candidates, and only those are sorted (sample_filter.h);
//   sums    for filtered rows and margin: one pass for the softmax denominator, sum
//           e*z (entropy) and the runner-up (margin) under conf_temperature;
//   token   temperature 0: the first argmax. T > 0: Gumbel-max over the kept ids; a
//           vectorised bound on each id's draw leaves only the ids that can still win
//           for the exact float64 score (see gumbel_max).
//   When a filter leaves its kept ids sorted (a few hundred, usually), the token and the
//   sums are taken over that list instead of the row (gumbel_max_of_listed).
// DRAM traffic is N * V * element size. The vector loops are in sample_simd.h.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "philox_rows.h"
#include "sample_filter.h"
#include "sample_simd.h"
#include "unmask/philox.h"
#include "unmask/sample.h"
#include "vec_math.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace {

using sample_filter::Kept;
constexpr float kInf = std::numeric_limits<float>::infinity();
// The largest Gumbel draw is -log(-log(1 - 2^-25)) = 17.33; 17.5 leaves margin.
constexpr double kGumbelMax = 17.5;
constexpr int64_t kChunk = 2048;  // 8 KiB of floats: a chunk stays in L1 between its passes
// The row buffer is padded with -inf to a multiple of kPad floats, so the vector loops of
// sample_simd.h (8 or 16 floats; 32 for the Gumbel candidates) never need a scalar tail.
constexpr int64_t kPad = 32;

constexpr int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

struct RowScan {
  float max = -kInf;
  int64_t argmax = 0;
  bool bad = false;  // a NaN or +inf logit outside the banned ids
  // With the confidence sums fused into the load: sum of e_i = exp(z_i) and of e_i * z_i,
  // z_i = (x_i - max) * inv_t, over every id (valid only when nothing is filtered).
  bool has_sums = false;
  double sum = 0.0;
  double weighted = 0.0;
};

int64_t element_size(ScalarType dtype) { return dtype == ScalarType::kFloat32 ? 4 : 2; }

const void* source(const SampleParams& p, int64_t row, int64_t col) {
  return static_cast<const char*>(p.logits) + (row * p.vocab + col) * element_size(p.dtype);
}

// Load the row one L1-sized chunk at a time, into buf at the chunk's place (keep_row)
// or into one reused chunk slot, with banned ids and the pad past the vocabulary at
// -inf, and scan it: max, first argmax and NaN/+inf, and with fuse_sums the softmax
// sums as an online softmax (Milakov and Gimelshein, 2018) rescaled whenever a chunk
// raises the maximum, so the row costs a single trip from memory.
//
// With fuse_sums, a chunk after the first (with no banned id in it) takes a single pass
// (cpu::convert_max_and_sums) with the row maximum so far as its reference. The first
// chunk, chunks with banned ids and chunks that raise the maximum take two passes over
// the L1 copy: convert and max, then the sums against the new maximum, so that every
// term is formed with z <= 0 and the maximum adds exactly 1 (a term summed against the
// old maximum and rescaled would carry its z's rounding, z * 2^-24, into the sum, and
// cancel in the entropy's sum e * z). Random rows raise the maximum in ~4 of 62 chunks.
template <ScalarType kType>
RowScan load_and_scan(const SampleParams& p, int64_t row, float* buf, bool keep_row, bool fuse_sums,
                      bool with_weighted, float inv_t) {
  RowScan scan;
  scan.has_sums = fuse_sums;
  const float base2 = inv_t * cpu::kLog2e;  // z in base 2, as convert_max_and_sums forms it
  // A chunk raised the row maximum to new_max at `id`: the sums so far, formed against the
  // old maximum, are rescaled to the new one (the weighted sum is only read for entropy).
  auto raise_maximum = [&](float new_max, int64_t id) {
    if (scan.max > -kInf) {
      const double shift = (static_cast<double>(scan.max) - new_max) * inv_t;
      const double factor = std::exp(shift);
      scan.weighted = factor * (scan.weighted + shift * scan.sum);
      scan.sum *= factor;
    }
    scan.max = new_max;
    scan.argmax = id;
  };
  const int64_t* banned = p.banned;
  const int64_t* banned_end = p.banned + p.n_banned;
  for (int64_t begin = 0; begin < p.vocab; begin += kChunk) {
    const int64_t count = std::min(kChunk, p.vocab - begin);
    const int64_t padded = round_up(count, kPad);
    const bool has_banned = banned != banned_end && *banned < begin + count;
    const void* src = source(p, row, begin);
    float* chunk = keep_row ? buf + begin : buf;
    // (+inf has returned: a bad row; scan.max * a past the float range takes two passes)
    if (fuse_sums && !has_banned && scan.max > -kInf && std::isfinite(scan.max * base2)) {
      float sum = 0.0f, weighted = 0.0f;
      float* out = keep_row ? chunk : nullptr;
      const float chunk_max =
          with_weighted ? cpu::convert_max_and_sums<kType, true>(src, count, scan.max, inv_t, out, &sum, &weighted)
                        : cpu::convert_max_and_sums<kType, false>(src, count, scan.max, inv_t, out, &sum, &weighted);
      if (chunk_max <= scan.max) {  // no rise (and no +inf): every z <= 0
        if (std::isnan(sum)) {      // a NaN logit: the row is invalid, and the rest need not be read
          scan.bad = true;
          return scan;
        }
        if (keep_row) std::fill(chunk + count, chunk + padded, -kInf);
        scan.sum += sum;  // chunk partials in float, the row total in double
        scan.weighted += weighted;
        continue;
      }
      // A small rise without the entropy's sum: the chunk's terms, formed against the old
      // maximum, have z <= cpu::kRescaleLimit and so at most 8 * 2^-24 * ln 2 = 3.3e-7 relative
      // error each; rescaled in double instead of redone (random rows rise ~4 times in 62
      // chunks, and the redo cost ~10% of a bfloat16 row).
      if (!with_weighted && !std::isnan(sum) && (chunk_max - scan.max) * base2 <= cpu::kRescaleLimit) {
        if (keep_row) std::fill(chunk + count, chunk + padded, -kInf);
        scan.sum += sum;
        raise_maximum(chunk_max, begin + cpu::first_index_of<kType>(src, count, chunk_max));
        continue;
      }
    }
    bool chunk_bad = false;
    float chunk_max = cpu::convert_max_and_bad<kType>(src, count, chunk, &chunk_bad);
    std::fill(chunk + count, chunk + padded, -kInf);
    if (has_banned) {  // rare: ban, then rescan the chunk
      for (; banned != banned_end && *banned < begin + count; ++banned) chunk[*banned - begin] = -kInf;
      chunk_max = cpu::max_and_bad(chunk, padded, &chunk_bad);
    }
    if (chunk_bad) {  // a NaN or +inf logit: the row is invalid, and the rest need not be read
      scan.bad = true;
      return scan;
    }
    if (chunk_max > scan.max) {  // rare after the first chunks
      raise_maximum(chunk_max, begin + cpu::first_index_of<ScalarType::kFloat32>(chunk, padded, chunk_max));
    }
    if (fuse_sums && scan.max > -kInf) {
      float sum = 0.0f, weighted = 0.0f;
      if (with_weighted) {
        cpu::exp_sums<true>(chunk, padded, scan.max, inv_t, &sum, &weighted);
      } else {
        cpu::exp_sums<false>(chunk, padded, scan.max, inv_t, &sum, &weighted);
      }
      scan.sum += sum;
      scan.weighted += weighted;
    }
  }
  return scan;
}

RowScan load_and_scan(const SampleParams& p, int64_t row, float* buf, bool keep_row, bool fuse_sums,
                      bool with_weighted, float inv_t) {
  switch (p.dtype) {
    case ScalarType::kFloat32:
      return load_and_scan<ScalarType::kFloat32>(p, row, buf, keep_row, fuse_sums, with_weighted, inv_t);
    case ScalarType::kBFloat16:
      return load_and_scan<ScalarType::kBFloat16>(p, row, buf, keep_row, fuse_sums, with_weighted, inv_t);
    case ScalarType::kFloat16: break;
  }
  return load_and_scan<ScalarType::kFloat16>(p, row, buf, keep_row, fuse_sums, with_weighted, inv_t);
}

struct ConfidenceSums {
  double sum = 0.0;       // sum of e_i = exp(z_i), z_i = (x_i - max) / conf_temperature, over kept ids
  double weighted = 0.0;  // sum of e_i * z_i
  float runner_up = -kInf;  // the largest kept logit other than the argmax id
};

// One pass over ids [begin, end) of the row; kStrict: only ids above `bound` count
// (else at or above it). The kept prefix is two such runs (ids up to its last tie, then
// the rest), so the loop compares values only: an id compare inside it kept the compiler
// from vectorising it (3.5 ms for [32, 126464] rows, 6x the unfiltered pass).
template <bool kStrict>
void confidence_sums_run(const float* buf, int64_t begin, int64_t end, float max, float inv_t, float bound,
                         int64_t argmax, ConfidenceSums* sums) {
  // Base 2 as in cpu::exp_sums: z2 = (x - max) * inv_t * log2(e), e^z = 2^z2.
  const float a = inv_t * cpu::kLog2e;
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    const int64_t chunk_end = std::min(end, chunk + kChunk);
    float sum = 0.0f, weighted = 0.0f, runner_up = -kInf;
#pragma omp simd reduction(+ : sum, weighted) reduction(max : runner_up)
    for (int64_t i = chunk; i < chunk_end; ++i) {
      const float x = buf[i];
      const bool in = kStrict ? x > bound : x >= bound;
      const bool counts = in && x != -kInf;
      const float z = counts ? (x - max) * a : 0.0f;
      const float e = counts ? cpu::exp2_poly(z) : 0.0f;
      sum += e;
      weighted += e * z;
      runner_up = (in && i != argmax && x > runner_up) ? x : runner_up;
    }
    sums->sum += sum;  // chunk partials in float, the row total in double
    sums->weighted += static_cast<double>(weighted) * cpu::kLn2;
    sums->runner_up = std::max(sums->runner_up, runner_up);
  }
}

ConfidenceSums confidence_sums(const float* buf, int64_t vocab, float max, double conf_temperature,
                               const Kept& kept, int64_t argmax) {
  const float inv_t = static_cast<float>(1.0 / conf_temperature);
  ConfidenceSums sums;
  if (kept.all) {
    confidence_sums_run<false>(buf, 0, vocab, max, inv_t, -kInf, argmax, &sums);
    return sums;
  }
  const int64_t ties_end = std::min(vocab, kept.last_tie + 1);  // ids up to the last tie keep value ties
  confidence_sums_run<false>(buf, 0, ties_end, max, inv_t, kept.value, argmax, &sums);
  confidence_sums_run<true>(buf, ties_end, vocab, max, inv_t, kept.value, argmax, &sums);
  return sums;
}

double gumbel_from_word(uint32_t word) { return -std::log(-std::log(uniform_from_draw(word))); }

double gumbel(uint64_t seed, int64_t col, uint32_t row, uint32_t offset) {
  return gumbel_from_word(unmask_draw(seed, static_cast<uint32_t>(col), row, offset, RngStream::kGumbel));
}

// argmax over kept ids of x / T + g, ties to the lower id (the reference's argmax).
//
// Exact, with the float64 scores of the reference, but without two float64 logs per id:
// a vectorised pass compares x_i / T plus a log-free upper bound on g_i (see
// cpu::gumbel_candidates32) against the best score so far, loosened by a margin that
// covers float rounding, and only the few ids that pass get the exact float64 score.
// Blocks of 32 ids whose largest logit cannot reach best - kGumbelMax are skipped
// without drawing noise at all. buf is padded with -inf to a multiple of kPad.
int64_t gumbel_max(const float* buf, int64_t vocab, double temperature, const Kept& kept, int64_t argmax,
                   uint64_t seed, uint32_t row, uint32_t offset) {
  constexpr int64_t kNoiseChunk = 1024;  // a multiple of kPad: whole Philox blocks
  static_assert(kPad == 32, "blocks of 32 ids: one candidate mask each");
  alignas(64) uint32_t words[kNoiseChunk];
  int64_t best_id = argmax;
  double best = static_cast<double>(buf[argmax]) / temperature + gumbel(seed, argmax, row, offset);
  // x / T in float carries |x / T| and |best| times 2^-24 of error: a margin of
  // 1e-4 (1 + |best|) keeps every id that could win.
  auto loosened = [](double score) { return static_cast<float>(score - 1e-4 * (1.0 + std::fabs(score))); };
  float best_low = loosened(best);
  const float inv_t = static_cast<float>(1.0 / temperature);
  // Ids [first, last) of the row, a run of whole 32-id blocks inside one chunk: their
  // draws, then the exact score of each candidate.
  auto score_run = [&](int64_t first, int64_t last) {
    cpu::philox_row_words(seed, row, offset, RngStream::kGumbel, static_cast<uint32_t>(first / 4), (last - first) / 4,
                          words);
    for (int64_t block = first; block < last; block += 32) {
      uint32_t candidates = cpu::gumbel_candidates32(buf + block, words + (block - first), inv_t, best_low);
      for (; candidates != 0; candidates &= candidates - 1) {
        const int64_t id = block + cpu::lowest_set_bit(candidates);
        const float x = buf[id];  // pads are -inf and never candidates
        if (id == argmax || x == -kInf || !(kept.all || kept.contains(x, id))) continue;
        const double score = static_cast<double>(x) / temperature + gumbel_from_word(words[id - first]);
        if (score > best || (score == best && id < best_id)) {
          best = score;
          best_id = id;
          best_low = loosened(best);
        }
      }
    }
  };
  // A block of 32 ids whose largest logit cannot reach the best score even with the
  // largest draw needs no noise at all. Flat logits skip nothing; on peaked ones (a few
  // ids far above the rest, as a trained model's usually are) most blocks are skipped,
  // where a whole-chunk test skipped none: 17.5 above a 1024-id chunk's maximum reaches
  // further than above a 32-id block's.
  auto can_win = [&](int64_t block) {
    bool unused_bad = false;
    return static_cast<double>(cpu::max_and_bad(buf + block, 32, &unused_bad)) / temperature + kGumbelMax > best;
  };
  for (int64_t begin = 0; begin < vocab; begin += kNoiseChunk) {
    const int64_t end = begin + round_up(std::min(kNoiseChunk, vocab - begin), kPad);
    int64_t run = -1;  // first block of the current run of blocks that can win
    for (int64_t block = begin; block < end; block += 32) {
      if (can_win(block)) {
        if (run < 0) run = block;
      } else if (run >= 0) {
        score_run(run, block);
        run = -1;
      }
    }
    if (run >= 0) score_run(run, end);
  }
  return best_id;
}

// The kept ids listed by a filter, ids[0, n) in the order (value desc, id asc; ids[0] is
// the row's first argmax): the draw and the confidence sums over them alone, in float64,
// where the row passes read the whole vocabulary.
//
// Gumbel-max as gumbel_max, the same draws: the ids come in decreasing value, so once
// x / T + kGumbelMax falls to the best score no later id can reach it.
int64_t gumbel_max_of_listed(const float* buf, const int64_t* ids, int64_t n, double temperature, uint64_t seed,
                             uint32_t row, uint32_t offset) {
  int64_t best_id = ids[0];
  double best = static_cast<double>(buf[best_id]) / temperature + gumbel(seed, best_id, row, offset);
  for (int64_t j = 1; j < n; ++j) {
    const int64_t id = ids[j];
    const double scaled = static_cast<double>(buf[id]) / temperature;
    if (!(scaled + kGumbelMax > best)) break;  // also ends at -inf
    const double score = scaled + gumbel(seed, id, row, offset);
    if (score > best || (score == best && id < best_id)) {
      best = score;
      best_id = id;
    }
  }
  return best_id;
}

ConfidenceSums confidence_sums_of_listed(const float* buf, const int64_t* ids, int64_t n, float max,
                                         double conf_temperature) {
  ConfidenceSums sums;
  for (int64_t j = 0; j < n; ++j) {
    const float x = buf[ids[j]];  // (never -inf: the filters' lists hold finite values)
    const double z = (static_cast<double>(x) - max) / conf_temperature;
    const double e = std::exp(z);
    sums.sum += e;
    sums.weighted += e * z;
  }
  if (n > 1) sums.runner_up = buf[ids[1]];
  return sums;
}

void sample_row(const SampleParams& p, int64_t row, float* buf, sample_filter::Scratch& scratch) {
  const bool filtered = (p.top_k > 0 && p.top_k < p.vocab) || p.top_p < 1.0;
  const bool fuse_sums = !filtered && (p.confidence == ConfidenceKind::kProb || p.confidence == ConfidenceKind::kEntropy);
  const float inv_t = static_cast<float>(1.0 / p.conf_temperature);
  // Only the Gumbel pass, the filters and the margin's runner-up read the row again; the
  // rest (greedy with prob, entropy or random confidence) needs nothing past each chunk,
  // so the chunks reuse one L1-sized slot instead of writing 500 KiB a row to L2 and L3.
  const bool keep_row = filtered || p.temperature > 0.0 || p.confidence == ConfidenceKind::kMargin;
  const RowScan scan =
      load_and_scan(p, row, buf, keep_row, fuse_sums, p.confidence == ConfidenceKind::kEntropy, inv_t);
  if (scan.bad || !(scan.max > -kInf)) {
    p.tokens[row] = -1;
    p.conf[row] = -kInf;
    return;
  }
  Kept kept;
  scratch.n_sorted = 0;
  const int64_t padded = round_up(p.vocab, kPad);
  if (p.top_k > 0 && p.top_k < p.vocab) kept = sample_filter::top_k_filter(buf, p.vocab, padded, p.top_k, scratch);
  if (p.top_p < 1.0) {
    const double temperature = p.temperature > 0.0 ? p.temperature : 1.0;
    kept = sample_filter::top_p_filter(buf, p.vocab, padded, scan.max, p.top_p, temperature, kept, scratch);
  }

  const int64_t n_listed = scratch.n_sorted;
  const int64_t* listed = scratch.ids.data();
  const uint32_t row_id = static_cast<uint32_t>(row), offset = row_offset(p, row);
  int64_t token = scan.argmax;
  if (p.temperature > 0.0) {
    token = n_listed > 0 ? gumbel_max_of_listed(buf, listed, n_listed, p.temperature, p.seed, row_id, offset)
                         : gumbel_max(buf, p.vocab, p.temperature, kept, scan.argmax, p.seed, row_id, offset);
  }
  double conf;
  if (p.confidence == ConfidenceKind::kRandom) {
    conf = uniform_from_draw(unmask_draw(p.seed, 0, row_id, offset, RngStream::kRandomConfidence));
  } else {
    ConfidenceSums sums;
    if (scan.has_sums) {
      sums.sum = scan.sum;
      sums.weighted = scan.weighted;
    } else if (n_listed > 0) {
      sums = confidence_sums_of_listed(buf, listed, n_listed, scan.max, p.conf_temperature);
    } else {
      sums = confidence_sums(buf, p.vocab, scan.max, p.conf_temperature, kept, scan.argmax);
    }
    auto prob_of = [&](float x) { return std::exp((static_cast<double>(x) - scan.max) / p.conf_temperature) / sums.sum; };
    switch (p.confidence) {
      case ConfidenceKind::kProb: conf = prob_of(token == scan.argmax ? scan.max : buf[token]); break;
      case ConfidenceKind::kMargin:
        conf = 1.0 / sums.sum - (sums.runner_up == -kInf ? 0.0 : prob_of(sums.runner_up));
        break;
      default: conf = sums.weighted / sums.sum - std::log(sums.sum); break;  // sum p log p
    }
  }
  p.tokens[row] = token;
  p.conf[row] = static_cast<float>(conf);
}

}  // namespace

Status sample(const SampleParams& params) {
  const Status status = check_sample_params(params);
  if (!status.ok()) return status;
  // The chunk loop walks the banned ids in increasing order: an unsorted or repeated list
  // (rare: unmask.ops passes them sorted) is sorted into a copy first.
  SampleParams p = params;
  std::vector<int64_t> sorted_banned;
  for (int64_t i = 0; i < p.n_banned; ++i) {
    if (p.banned[i] < 0 || p.banned[i] >= p.vocab) {
      return invalid_argument("banned[i]", static_cast<double>(p.banned[i]), "must lie in [0, vocab)");
    }
    if (i > 0 && p.banned[i] <= p.banned[i - 1] && sorted_banned.empty()) {
      sorted_banned.assign(p.banned, p.banned + p.n_banned);
      std::sort(sorted_banned.begin(), sorted_banned.end());
      sorted_banned.erase(std::unique(sorted_banned.begin(), sorted_banned.end()), sorted_banned.end());
    }
  }
  if (!sorted_banned.empty()) {
    p.banned = sorted_banned.data();
    p.n_banned = static_cast<int64_t>(sorted_banned.size());
  }
  // Every row id is checked before anything is written: a bad one leaves the outputs as they were.
  for (int64_t i = 0; p.select_rows && i < p.n_selected; ++i) {
    if (p.rows[i] < 0 || p.rows[i] >= p.n_rows) {
      return invalid_argument("rows[i]", static_cast<double>(p.rows[i]), "must lie in [0, n_rows)");
    }
  }
  const int64_t work = p.select_rows ? p.n_selected : p.n_rows;
  if (p.select_rows) {
    for (int64_t i = 0; i < p.n_rows; ++i) {
      p.tokens[i] = -1;
      p.conf[i] = -kInf;
    }
  }
#pragma omp parallel if (work > 1)
  {
    // Reused across calls: a fresh 600 KiB buffer per call would page-fault every step.
    thread_local std::vector<float> buf;
    thread_local sample_filter::Scratch scratch;
    buf.resize(round_up(p.vocab, kPad));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < work; ++i) {
      sample_row(p, p.select_rows ? p.rows[i] : i, buf.data(), scratch);
    }
  }
  return ok_status();
}

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
