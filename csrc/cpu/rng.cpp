#include "unmask/rng.h"

#include "philox_rows.h"

namespace unmask {

Status fill_draws_cpu(const DrawParams& p) {
  if (p.rows < 0 || p.cols < 0 || (p.rows * p.cols > 0 && p.out == nullptr)) {
    return Status::kInvalidArgument;
  }
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
  return Status::kOk;
}

Status philox_blocks_cpu(const PhiloxBlockParams& p) {
  if (p.n < 0 || (p.n > 0 && (p.counters == nullptr || p.out == nullptr))) {
    return Status::kInvalidArgument;
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < p.n; ++i) {
    const Philox4x32 counter{{p.counters[4 * i], p.counters[4 * i + 1], p.counters[4 * i + 2],
                              p.counters[4 * i + 3]}};
    const Philox4x32 block = philox4x32_10(counter, p.key0, p.key1);
    for (int word = 0; word < 4; ++word) p.out[4 * i + word] = block.v[word];
  }
  return Status::kOk;
}

}  // namespace unmask
