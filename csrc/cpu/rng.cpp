#include "unmask/rng.h"

#include "kernels.h"
#include "philox_rows.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h

Status fill_draws(const DrawParams& p) {
  const Status status = check_draw_params(p);
  if (!status.ok()) return status;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    const uint32_t row = static_cast<uint32_t>(p.row_begin + r);
    uint32_t* out_row = p.out + r * p.cols;
    const int64_t whole_quads = p.cols / 4;
    cpu::philox_row_words(p.seed, row, p.offset, p.stream, 0, whole_quads, out_row);
    if (p.cols % 4 != 0) {  // a partial last quad: one more block, some of its words
      const Philox4x32 block =
          unmask_draw_quad(p.seed, static_cast<uint32_t>(whole_quads), row, p.offset, p.stream);
      for (int64_t word = 0; word < p.cols % 4; ++word) out_row[whole_quads * 4 + word] = block.v[word];
    }
  }
  return ok_status();
}

Status philox_blocks(const PhiloxBlockParams& p) {
  if (p.n < 0) return invalid_argument("n", static_cast<double>(p.n), "must be >= 0");
  if (p.n > 0 && p.counters == nullptr) return invalid_argument("counters", 0, "must not be null when n > 0");
  if (p.n > 0 && p.out == nullptr) return invalid_argument("out", 0, "must not be null when n > 0");
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < p.n; ++i) {
    const Philox4x32 counter{{p.counters[4 * i], p.counters[4 * i + 1], p.counters[4 * i + 2],
                              p.counters[4 * i + 3]}};
    const Philox4x32 block = philox4x32_10(counter, p.key0, p.key1);
    for (int word = 0; word < 4; ++word) p.out[4 * i + word] = block.v[word];
  }
  return ok_status();
}

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
