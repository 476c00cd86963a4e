// top_k and top_p for the CPU sampler (sample.cpp): the kept ids of a row as a prefix of
// the order (value desc, id asc), as reference.keep_top_k / keep_top_p define them.
//
// The row sits in L2 (the per-thread buffer), and the selection must cost little next to
// reading it from memory, ~10 us per [126464] float32 row at the 2-core machine's
// bandwidth. Sorting the vocabulary is out, and so, measured, is radix selection on the
// float bits (three scalar histogram passes, ~1.5 ns per id each): it left top_k 50 at
// 3% and top_p 0.95 at 1% of the read. So each filter first finds a small superset of
// what it keeps with vector passes, then sorts only that:
//   top_k  the k-th largest maximum of ~4k groups of ids bounds the k-th largest id from
//          below (k groups reach it, so k ids do); the ids at or above it are about
//          1.15 k on random rows (n * -ln(1 - k / n) for n = 4k groups of iid values).
//   top_p  an id whose mass is below (1 - top_p) / (2 V) of the total cannot be kept:
//          all such ids together hold less than (1 - top_p) / 2 of it, so the ids above
//          them reach top_p first. On a sampling distribution with a short head (a
//          trained model's, or any at a low temperature) few ids pass.
//          After top_k, the nucleus is measured over the k sorted ids directly.
// Radix selection stays for the rows these leave too large (many -inf, a top_k above
// ~V / 16, a top_p within 1e-5 of 1, ties no threshold splits): it works whatever the
// row, from per-id float masses summed in double.
//
// Precision of top_p's end: the mass passes use the float 2^z of exp_sums, whose
// polynomial is biased by ~1.4e-8 (1.7e-7 at most) relative, so the target top_p * total
// can sit that far from the float64 reference's. Where the id at the nucleus's end holds
// a large share of the mass (a trained model, a low temperature) that never moves it; on
// flat rows at T = 1 (126k ids, the end's id ~5e-6 of the mass) about one row in a few
// hundred may keep one id more or fewer than the reference. A token differs only if it
// is that id; a confidence moves by its share of the mass.
#pragma once

#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "sample_simd.h"
#include "vec_math.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace sample_filter {

constexpr float kInf = std::numeric_limits<float>::infinity();

constexpr int64_t round_up_to(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// The kept ids: x > value, or x == value and id <= last_tie. With no filter, `all`.
struct Kept {
  float value = -kInf;
  int64_t last_tie = std::numeric_limits<int64_t>::max();
  bool all = true;
  bool contains(float x, int64_t id) const { return x > value || (x == value && id <= last_tie); }
};

// Per-thread buffers, reused across rows and calls.
struct Scratch {
  std::vector<float> maxima;  // top_k's group maxima
  std::vector<int64_t> ids;   // candidates; top_k's kept ids in order, or top_p's band sorted
  std::vector<uint64_t> keys;  // sort_in_order's
  // When nonzero, the kept ids are exactly ids[0, n_sorted), in order: the sampler then
  // draws and sums over them alone (set to 0 before each row's filters).
  int64_t n_sorted = 0;
  std::vector<float> values;  // top_p's band: the values of its ids
  std::vector<float> mass;    // the radix path's per-id mass for top_p
};

// Writes the first `first` ids of ids[0, count) in the order (value desc, id asc) to
// ids[0, first); ids[first, count) is left as it was (stale). The ids are sorted as 64-bit keys, the value's order key above
// the complemented id: std::sort on those ran ~3x faster than on ids compared through
// the row (a heap of 2000 ids took a third of a top_k 2000 row).
constexpr int64_t kMaxSortedVocab = int64_t{1} << 32;  // ids fit sort_in_order's 32 bits

inline void sort_in_order(const float* buf, int64_t* ids, int64_t count, int64_t first, Scratch& s) {
  s.keys.resize(count);
  for (int64_t j = 0; j < count; ++j) {
    s.keys[j] = (static_cast<uint64_t>(order_key(buf[ids[j]])) << 32) | static_cast<uint32_t>(~ids[j]);
  }
  auto end = s.keys.begin() + count;
  if (first < count) std::nth_element(s.keys.begin(), s.keys.begin() + first, end, std::greater<uint64_t>());
  std::sort(s.keys.begin(), s.keys.begin() + first, std::greater<uint64_t>());
  for (int64_t j = 0; j < first; ++j) ids[j] = static_cast<uint32_t>(~s.keys[j]);
}

// Radix selection over order keys, 11 + 11 + 10 bits: `weight(i)` is what each id
// contributes (1 for top-k, its probability mass for top-p); returns the largest value t
// whose cumulative weight from the top reaches `target`, and the weight of the values
// above t. Elements outside `kept` weigh nothing.
template <typename Weight>
float radix_select(const float* buf, int64_t vocab, double target, const Kept& kept, Weight weight,
                   double* weight_above) {
  constexpr int kShifts[3] = {21, 10, 0};
  constexpr int kWidths[3] = {11, 11, 10};
  std::vector<double> hist(1 << 11);
  uint32_t prefix = 0, prefix_mask = 0;
  double above = 0.0;
  for (int level = 0; level < 3; ++level) {
    const int shift = kShifts[level];
    const uint32_t bins = 1u << kWidths[level];
    std::fill(hist.begin(), hist.begin() + bins, 0.0);
    for (int64_t i = 0; i < vocab; ++i) {
      const float x = buf[i];
      if (!kept.contains(x, i)) continue;
      const uint32_t key = order_key(x);
      if ((key & prefix_mask) == prefix) hist[(key >> shift) & (bins - 1)] += weight(i);
    }
    uint32_t chosen = 0;
    bool found = false;
    for (uint32_t bin = bins; bin-- > 0;) {
      if (hist[bin] > 0 && above + hist[bin] >= target) {
        chosen = bin;
        found = true;
        break;
      }
      above += hist[bin];
    }
    if (!found) {  // rounding left the total short of target: keep everything kept so far
      *weight_above = -1.0;
      return kept.value;
    }
    prefix |= chosen << shift;
    prefix_mask |= (bins - 1) << shift;
  }
  *weight_above = above;
  return key_to_float(prefix);
}

// Among ids with value t (in id order), keep while the weight before the id is below
// target; returns the last kept id.
template <typename Weight>
int64_t last_kept_tie(const float* buf, int64_t vocab, float t, double above, double target, const Kept& kept,
                      Weight weight) {
  int64_t last = -1;
  double before = above;
  for (int64_t i = 0; i < vocab && before < target; ++i) {
    if (buf[i] == t && kept.contains(buf[i], i)) {
      before += weight(i);
      last = i;
    }
  }
  return last;
}

// The kept prefix of `within` whose weight reaches target, by radix selection (exact
// whatever the row); `within` itself when rounding leaves its total short of target.
template <typename Weight>
Kept radix_prefix(const float* buf, int64_t vocab, double target, const Kept& within, Weight weight) {
  double above = 0.0;
  const float t = radix_select(buf, vocab, target, within, weight, &above);
  if (above < 0.0) return within;
  Kept kept;
  kept.all = false;
  kept.value = t;
  kept.last_tie = last_kept_tie(buf, vocab, t, above, target, within, weight);
  return kept;
}

inline Kept prefix_ending_at(const float* buf, int64_t id) {
  Kept kept;
  kept.all = false;
  kept.value = buf[id];
  kept.last_tie = id;
  return kept;
}

// top_k through the group maxima; false when the candidates are too many to sort.
// On success s.ids[0, k) holds the kept ids in order.
inline bool top_k_by_candidates(const float* buf, int64_t vocab, int64_t padded, int64_t k, Scratch& s, Kept* kept) {
  if (vocab > kMaxSortedVocab) return false;
  const int64_t group = std::max<int64_t>(1, padded / (4 * k));  // ~4k groups: ~1.15 k candidates
  s.maxima.resize(round_up_to(padded, 16 * group) / group);
  const int64_t n_maxima = strided_group_maxima(buf, padded, group, s.maxima.data());
  std::nth_element(s.maxima.begin(), s.maxima.begin() + (k - 1), s.maxima.begin() + n_maxima, std::greater<float>());
  const float bound = s.maxima[k - 1];  // at least k ids are >= bound
  if (!(bound > -kInf)) return false;   // k ids or fewer above -inf: every id is a candidate
  const int64_t cap = std::max<int64_t>(1024, vocab / 16);  // above, sorting costs more than radix selection
  s.ids.resize(cap);
  const int64_t count = ids_in_range(buf, vocab, bound, kInf, cap, s.ids.data());
  if (count > cap) return false;
  sort_in_order(buf, s.ids.data(), count, k, s);
  s.n_sorted = k;
  *kept = prefix_ending_at(buf, s.ids[k - 1]);
  return true;
}

inline Kept top_k_filter(const float* buf, int64_t vocab, int64_t padded, int64_t k, Scratch& s) {
  Kept kept;
  if (top_k_by_candidates(buf, vocab, padded, k, s, &kept)) return kept;
  return radix_prefix(buf, vocab, static_cast<double>(k), Kept{}, [](int64_t) { return 1.0; });
}

// The nucleus of the ids s.ids[0, n) sorted in the order, after ids whose mass is
// `before`: keep while the mass before an id is below target, masses exp((x - max) / T)
// in double. Returns how many of them are kept, or 0 when none is or they fall short of
// the target (rounding of totals summed elsewhere: the exact path decides then).
inline int64_t nucleus_of_sorted(const float* buf, const int64_t* ids, int64_t n, float max, double temperature,
                                 double before, double target) {
  for (int64_t j = 0; j < n; ++j) {
    if (before >= target) return j;
    const float x = buf[ids[j]];
    if (x == -kInf) return 0;
    before += std::exp((static_cast<double>(x) - max) / temperature);
  }
  return before >= target ? n : 0;
}

// The softmax mass of x[0, n) (n a multiple of 16, padded with -inf) at or above each
// pivot, in float chunks of 2048 added in double.
inline void mass_at_pivots(const float* x, int64_t n, float max, float a, const float* pivots, double* mass) {
  constexpr int64_t kChunk = 2048;
  for (int j = 0; j < kMassPivots; ++j) mass[j] = 0.0;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    float chunk_mass[kMassPivots];
    mass_at_least(x + begin, std::min(kChunk, n - begin), max, a, pivots, chunk_mass);
    for (int j = 0; j < kMassPivots; ++j) mass[j] += chunk_mass[j];
  }
}

// top_p over the whole row, without sorting it; false when it cannot tell (the exact
// path decides then).
//
// The nucleus lies at or above `lo`, the mass bound of the header, and ends in the band
// [lo, hi) whose ids above hi hold less than the target (hi = +inf at first). While the
// band holds more than kBandCap ids, a pass prices eight thresholds across it
// (mass_at_least) and the band shrinks to the gap between the highest threshold whose
// mass reaches the target and the next. The first passes read the row; once the band
// has at most kListCap ids they are copied out, and later passes read only those. On
// random rows at T = 1 (a nucleus of ~10k ids of 126k) one pass over the row and one
// over ~8k listed ids leave a few hundred. Then the band is sorted and walked from hi's
// mass, in double with std::exp per id, against the target from the float total (the
// header says how far that can move the end).
inline bool top_p_by_bands(const float* buf, int64_t vocab, int64_t padded, float max, double top_p,
                           double temperature, Scratch& s, Kept* kept) {
  // The bound's factor of 2 needs the float totals well inside (1 - top_p) / 2.
  if (!(top_p < 1.0 - 1e-5) || vocab > kMaxSortedVocab) return false;
  // T below ~1e-38: 1 / T leaves the float range (checked in double: the cast of an
  // out-of-range double is undefined)
  if (!(1.0 / temperature * kLog2e < std::numeric_limits<float>::max())) return false;
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float a = inv_t * kLog2e;
  constexpr int64_t kBandCap = 1024, kListCap = 16384, kMaxPasses = 8;
  double total = 0.0;
  for (int64_t begin = 0; begin < padded; begin += 2048) {
    float sum = 0.0f, unused = 0.0f;
    exp_sums<false>(buf + begin, std::min<int64_t>(2048, padded - begin), max, inv_t, &sum, &unused);
    total += sum;  // pads and -inf add 2^-126 each: nothing next to the maximum's 1
  }
  const double target = top_p * total;
  // e_i >= delta  <=>  x_i >= max + T ln(delta); the float bound is rounded down, so
  // every id at or above delta is in the band.
  const double delta = (1.0 - top_p) * total / (2.0 * static_cast<double>(vocab));
  const double exact = static_cast<double>(max) + temperature * std::log(delta);
  float lo = exact < -std::numeric_limits<float>::max() ? -kInf : static_cast<float>(exact), hi = kInf;
  if (static_cast<double>(lo) > exact) lo = std::nextafter(lo, -kInf);
  double mass_from_hi = 0.0;
  s.ids.resize(kListCap);
  s.values.resize(kListCap + 16);
  int64_t listed = -1;  // the band's ids (and values) in s.ids (s.values) once it is small
  for (int pass = 0; pass <= kMaxPasses; ++pass) {
    int64_t count = listed;
    if (listed < 0) {  // counted first: collecting ids costs a few cycles each
      count = count_in_range(buf, padded, lo, hi);  // (pads count too when lo is -inf)
      if (count <= kListCap) {
        count = listed = ids_in_range(buf, vocab, lo, hi, kListCap, s.ids.data());
        for (int64_t j = 0; j < count; ++j) s.values[j] = buf[s.ids[j]];
      }
    }
    // A listed band of one value (ties: no threshold splits them) is already in the
    // order: ids increasing.
    const bool one_value = listed > 0 && std::all_of(s.values.begin(), s.values.begin() + listed,
                                                     [&](float x) { return x == s.values[0]; });
    if (count <= kBandCap || one_value) {
      if (!one_value) sort_in_order(buf, s.ids.data(), count, count, s);
      const int64_t n = nucleus_of_sorted(buf, s.ids.data(), count, max, temperature, mass_from_hi, target);
      if (n == 0) return false;
      // Every id at or above hi is kept (their mass is short of the target): the
      // nucleus is listed only when there are none.
      s.n_sorted = hi == kInf ? n : 0;
      *kept = prefix_ending_at(buf, s.ids[n - 1]);
      return true;
    }
    if (pass == kMaxPasses || !(lo > -kInf)) return false;
    float pivots[kMassPivots];
    const float top = hi == kInf ? max : hi;  // with hi = +inf the last pivot is the maximum
    const double step = (static_cast<double>(top) - lo) / (hi == kInf ? kMassPivots : kMassPivots + 1);
    for (int j = 0; j < kMassPivots; ++j) pivots[j] = static_cast<float>(lo + step * (j + 1));
    if (hi == kInf) pivots[kMassPivots - 1] = max;
    double mass[kMassPivots];
    if (listed >= 0) {  // the band's own mass above each pivot, on top of what lies above hi
      const int64_t n = round_up_to(listed, 16);
      std::fill(s.values.begin() + listed, s.values.begin() + n, -kInf);
      mass_at_pivots(s.values.data(), n, max, a, pivots, mass);
      for (double& m : mass) m += mass_from_hi;
    } else {
      mass_at_pivots(buf, padded, max, a, pivots, mass);
    }
    int highest = -1;  // the highest pivot whose mass reaches the target
    for (int j = 0; j < kMassPivots; ++j) {
      if (mass[j] >= target) highest = j;
    }
    const float new_lo = highest >= 0 ? pivots[highest] : lo;
    const float new_hi = highest + 1 < kMassPivots ? pivots[highest + 1] : hi;
    if (!(new_lo > lo || new_hi < hi)) return false;  // the pivots collapsed onto the band's ends
    if (highest + 1 < kMassPivots) mass_from_hi = mass[highest + 1];
    lo = new_lo;
    hi = new_hi;
    if (listed >= 0) {  // keep the listed ids inside the new band, in id order
      // Without a branch: every id is written at the next free place, which advances
      // only for those kept (a branch on random values mispredicted every other id: a
      // fifth of the filter's time on flat rows).
      int64_t kept_count = 0;
      for (int64_t j = 0; j < listed; ++j) {
        const float x = s.values[j];
        s.ids[kept_count] = s.ids[j];
        s.values[kept_count] = x;
        kept_count += static_cast<int64_t>(x >= lo) & static_cast<int64_t>(x < hi);
      }
      listed = kept_count;
    }
  }
  return false;
}

// The nucleus is measured under softmax(x / temperature), the distribution the token is
// drawn from (transformers, vLLM and Dream measure it so); greedy rows pass 1.
inline Kept top_p_filter(const float* buf, int64_t vocab, int64_t padded, float max, double top_p,
                         double temperature, const Kept& kept, Scratch& s) {
  Kept nucleus;
  if (s.n_sorted > 0) {  // after top_k: its k ids, in order
    double total = 0.0;
    for (int64_t j = 0; j < s.n_sorted; ++j) {
      total += std::exp((static_cast<double>(buf[s.ids[j]]) - max) / temperature);
    }
    const int64_t n = nucleus_of_sorted(buf, s.ids.data(), s.n_sorted, max, temperature, 0.0, top_p * total);
    if (n > 0) {
      s.n_sorted = n;
      return prefix_ending_at(buf, s.ids[n - 1]);
    }
    s.n_sorted = 0;  // the radix path below reads `kept`, the top_k prefix
  } else if (kept.all && top_p_by_bands(buf, vocab, padded, max, top_p, temperature, s, &nucleus)) {
    return nucleus;
  }
  s.mass.resize(vocab);
  float* mass = s.mass.data();
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    const float x = buf[i];
    mass[i] = (kept.contains(x, i) && x != -kInf)
                  ? static_cast<float>(std::exp((static_cast<double>(x) - max) / temperature))
                  : 0.0f;
    total += mass[i];
  }
  return radix_prefix(buf, vocab, top_p * total, kept, [mass](int64_t i) { return static_cast<double>(mass[i]); });
}

}  // namespace sample_filter
}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
