// Routing plan kernels: group (token, slot) pairs by physical expert without copying activations.
//
// Torch-free API on raw pointers. Inputs (T tokens, k slots, E physical experts, E_orig original experts):
//   topk_ids         [T, k]    int32, original expert ids in [0, E_orig)
//   expert_map       [E_orig]  int32, original -> physical expert in [0, E), or nullptr (E_orig == E)
// Outputs:
//   sorted_token_ids [T*k]     int32, token of each row; rows grouped by physical expert ascending, tokens
//                              ascending within an expert; rows r >= N hold the filler value T
//   expert_offsets   [E+1]     int32, rows of expert e are [expert_offsets[e], expert_offsets[e+1]);
//                              expert_offsets[E] = N, the number of unique (token, physical expert) pairs
//   slot_rows        [T, k]    int32, the row of pair (t, phys[t][j]); slots of a token that map to the same
//                              physical expert share one row
// All buffers are contiguous and T*k must fit in int32. The result is fully determined by the inputs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(FLUX_ENGINE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace flux_engine {
namespace cpu {

// The CPU plan is a parallel counting sort in three phases over C contiguous token chunks
// [begin_c, end_c), C >= 0, chunk c + 1 starting where chunk c ends. Phases 1 and 3 run the chunks
// concurrently; chunk order fixes the row order, so the result does not depend on C.

// Phase 1 for tokens [begin, end): writes the physical expert of each first occurrence of a (token, expert)
// pair into slot_rows, -(j'+1) for a slot duplicating the earlier slot j' of the same token, and this chunk's
// rows per expert into counts [E]. Returns false when an id (or a mapped id) is out of range.
bool permute_count(const int32_t* topk_ids, int64_t k, const int32_t* expert_map, int64_t num_original,
                   int64_t num_experts, int64_t begin, int64_t end, int32_t* slot_rows, int32_t* counts);

// Phase 2, serial: turns counts [C, E] into each chunk's first row per expert (in place), writes
// expert_offsets [E+1] and the filler T into sorted_token_ids [N, T*k).
void permute_scan(int32_t* counts, int64_t num_chunks, int64_t num_experts, int32_t* expert_offsets,
                  int32_t* sorted_token_ids, int64_t T, int64_t k);

// Phase 3 for tokens [begin, end) with this chunk's cursors [E] from phase 2: writes sorted_token_ids and
// replaces phase 1's markers in slot_rows by row indices.
void permute_place(int64_t k, int64_t begin, int64_t end, int32_t* cursors, int32_t* slot_rows,
                   int32_t* sorted_token_ids);

}  // namespace cpu

#if defined(__CUDACC__) || defined(FLUX_ENGINE_WITH_CUDA)
namespace cuda {

// Bytes of device scratch permute() needs for T tokens, k slots and E physical experts. Host-only.
size_t permute_workspace_bytes(int64_t T, int64_t k, int64_t num_experts);

// Enqueues the whole plan on `stream` without synchronising the host. `workspace` holds at least
// permute_workspace_bytes(T, k, E) bytes, 256-byte aligned. Ids must be in range (callers validate them
// asynchronously). Returns the launch status.
cudaError_t permute(const int32_t* topk_ids, int64_t T, int64_t k, const int32_t* expert_map,
                    int64_t num_experts, int32_t* sorted_token_ids, int32_t* expert_offsets,
                    int32_t* slot_rows, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
#endif

}  // namespace flux_engine
