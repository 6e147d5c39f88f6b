#include "flux_engine/permute.h"

#include <algorithm>

namespace flux_engine {
namespace cpu {

bool permute_count(const int32_t* topk_ids, int64_t k, const int32_t* expert_map, int64_t num_original,
                   int64_t num_experts, int64_t begin, int64_t end, int32_t* slot_rows, int32_t* counts) {
  std::fill(counts, counts + num_experts, 0);
  for (int64_t t = begin; t < end; ++t) {
    const int32_t* ids = topk_ids + t * k;
    int32_t* row = slot_rows + t * k;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = ids[j];
      if (id < 0 || id >= num_original) return false;
      const int32_t e = expert_map ? expert_map[id] : id;
      if (e < 0 || e >= num_experts) return false;
      // Earlier duplicates hold negative markers, so only a first occurrence can match e.
      int64_t first = 0;
      while (first < j && row[first] != e) ++first;
      if (first < j) {
        row[j] = static_cast<int32_t>(-(first + 1));
      } else {
        row[j] = e;
        ++counts[e];
      }
    }
  }
  return true;
}

void permute_scan(int32_t* counts, int64_t num_chunks, int64_t num_experts, int32_t* expert_offsets,
                  int32_t* sorted_token_ids, int64_t T, int64_t k) {
  int32_t next = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    expert_offsets[e] = next;
    for (int64_t c = 0; c < num_chunks; ++c) {
      int32_t& slot = counts[c * num_experts + e];
      const int32_t rows = slot;
      slot = next;
      next += rows;
    }
  }
  expert_offsets[num_experts] = next;
  std::fill(sorted_token_ids + next, sorted_token_ids + T * k, static_cast<int32_t>(T));
}

void permute_place(int64_t k, int64_t begin, int64_t end, int32_t* cursors, int32_t* slot_rows,
                   int32_t* sorted_token_ids) {
  for (int64_t t = begin; t < end; ++t) {
    int32_t* row = slot_rows + t * k;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t v = row[j];
      if (v >= 0) {
        const int32_t r = cursors[v]++;
        sorted_token_ids[r] = static_cast<int32_t>(t);
        row[j] = r;
      } else {
        // The duplicated slot is earlier in this token, so it already holds its row.
        row[j] = row[-v - 1];
      }
    }
  }
}

}  // namespace cpu
}  // namespace flux_engine
