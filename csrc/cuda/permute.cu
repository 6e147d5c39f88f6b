// Routing plan on the GPU without host synchronisation: every buffer is sized by the host-known bound
// n = T*k, and the row count N only ever lives in device memory (expert_offsets[E]).
//
// Plan: one key per (token, slot) pair, its physical expert, or E for a slot duplicating an earlier slot
// of the same token; a stable radix sort of (key, pair index) then yields rows grouped by expert with
// tokens ascending, and the collapsed duplicates sorted past every real row.
#include "flux_engine/permute.h"

#include <cub/device/device_radix_sort.cuh>

namespace flux_engine {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kAlign = 256;

size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// One thread per item: grids of ceil(n / kThreads) blocks.
unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

__device__ int64_t item_index() { return blockIdx.x * int64_t{blockDim.x} + threadIdx.x; }

// Keys lie in [0, E]; sorting only their low bits saves radix passes.
int key_bits(int64_t num_experts) {
  int bits = 1;
  while ((int64_t{1} << bits) <= num_experts) ++bits;
  return bits;
}

size_t sort_temp_bytes(int64_t n, int64_t num_experts) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint32_t*>(nullptr),
                                  static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<int>(n), 0, key_bits(num_experts));
  return bytes;
}

__device__ int32_t physical(const int32_t* topk_ids, const int32_t* expert_map, int64_t pair) {
  const int32_t id = topk_ids[pair];
  return expert_map ? expert_map[id] : id;
}

// Pair i = t*k + j. Duplicates of an earlier slot j' get key E and leave -(j'+1) in slot_rows for
// resolve_duplicates; first occurrences get their row from scatter_rows.
__global__ void make_keys(const int32_t* topk_ids, const int32_t* expert_map, int64_t n, int64_t k,
                          uint32_t num_experts, uint32_t* keys, int32_t* pairs, int32_t* slot_rows) {
  const int64_t i = item_index();
  if (i >= n) return;
  const int64_t j = i % k;
  const int64_t token_base = i - j;
  const int32_t e = physical(topk_ids, expert_map, i);
  int64_t first = 0;
  while (first < j && physical(topk_ids, expert_map, token_base + first) != e) ++first;
  pairs[i] = static_cast<int32_t>(i);
  if (first < j) {
    keys[i] = num_experts;
    slot_rows[i] = static_cast<int32_t>(-(first + 1));
  } else {
    keys[i] = static_cast<uint32_t>(e);
  }
}

// rows holds the sorted pair indices on entry and the token of each row on exit (read and written by the
// same thread at the same index).
__global__ void scatter_rows(const uint32_t* sorted_keys, int64_t n, int64_t k, uint32_t num_experts,
                             int32_t filler, int32_t* rows, int32_t* slot_rows) {
  const int64_t r = item_index();
  if (r >= n) return;
  const int32_t pair = rows[r];
  if (sorted_keys[r] < num_experts) {
    slot_rows[pair] = static_cast<int32_t>(r);
    rows[r] = static_cast<int32_t>(pair / k);
  } else {
    rows[r] = filler;
  }
}

// expert_offsets[e] = first row whose key is >= e, so expert_offsets[E] counts the real rows.
__global__ void find_offsets(const uint32_t* sorted_keys, int64_t n, int64_t num_experts, int32_t* expert_offsets) {
  const int64_t e = item_index();
  if (e > num_experts) return;
  int64_t lo = 0;
  int64_t hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted_keys[mid] < static_cast<uint32_t>(e)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  expert_offsets[e] = static_cast<int32_t>(lo);
}

// Only duplicate slots are written and only first occurrences are read, so threads never race.
__global__ void resolve_duplicates(int64_t n, int64_t k, int32_t* slot_rows) {
  const int64_t i = item_index();
  if (i >= n) return;
  const int32_t v = slot_rows[i];
  if (v < 0) slot_rows[i] = slot_rows[i - i % k + (-v - 1)];
}

}  // namespace

size_t permute_workspace_bytes(int64_t T, int64_t k, int64_t num_experts) {
  const int64_t n = T * k;
  return 3 * align_up(n * sizeof(int32_t)) + sort_temp_bytes(n, num_experts);
}

cudaError_t permute(const int32_t* topk_ids, int64_t T, int64_t k, const int32_t* expert_map,
                    int64_t num_experts, int32_t* sorted_token_ids, int32_t* expert_offsets,
                    int32_t* slot_rows, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const int64_t n = T * k;
  if (workspace_bytes < permute_workspace_bytes(T, k, num_experts)) return cudaErrorInvalidValue;
  const uint32_t experts = static_cast<uint32_t>(num_experts);
  char* base = static_cast<char*>(workspace);
  const size_t slice = align_up(n * sizeof(int32_t));
  uint32_t* keys = reinterpret_cast<uint32_t*>(base);
  uint32_t* sorted_keys = reinterpret_cast<uint32_t*>(base + slice);
  int32_t* pairs = reinterpret_cast<int32_t*>(base + 2 * slice);
  void* sort_temp = base + 3 * slice;
  size_t sort_bytes = workspace_bytes - 3 * slice;

  if (n > 0) {
    make_keys<<<blocks_for(n), kThreads, 0, stream>>>(topk_ids, expert_map, n, k, experts, keys, pairs, slot_rows);
    const cudaError_t sorted =
        cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, keys, sorted_keys, pairs, sorted_token_ids,
                                        static_cast<int>(n), 0, key_bits(num_experts), stream);
    if (sorted != cudaSuccess) return sorted;
    scatter_rows<<<blocks_for(n), kThreads, 0, stream>>>(sorted_keys, n, k, experts, static_cast<int32_t>(T),
                                                         sorted_token_ids, slot_rows);
    resolve_duplicates<<<blocks_for(n), kThreads, 0, stream>>>(n, k, slot_rows);
  }
  find_offsets<<<blocks_for(num_experts + 1), kThreads, 0, stream>>>(sorted_keys, n, num_experts, expert_offsets);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace flux_engine
