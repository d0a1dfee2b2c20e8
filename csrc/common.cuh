// Device helpers shared by the statistics and gradient kernels. CUDA headers only (no torch).
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "taopd_launch.h"

namespace taopd {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

// Storage type and 16-byte vector width of each logit dtype; to_float is exact for all three.
template <DType DT>
struct Elem;

template <>
struct Elem<DType::kFloat32> {
  using raw = float;
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_float(float v) { return v; }
};

template <>
struct Elem<DType::kBFloat16> {
  using raw = unsigned short;
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(unsigned short v) {
    return __uint_as_float(static_cast<unsigned>(v) << 16);
  }
};

template <>
struct Elem<DType::kFloat16> {
  using raw = unsigned short;
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(unsigned short v) { return __half2float(__ushort_as_half(v)); }
};

template <typename Raw, int E>
struct alignas(16) Pack {
  Raw v[E];
};
static_assert(sizeof(Pack<float, 4>) == 16, "a pack is one 16-byte load");
static_assert(sizeof(Pack<unsigned short, 8>) == 16, "a pack is one 16-byte load");

// Columns [col, col + E) of one row. vector (uniform over the grid): the row start is 16-byte aligned,
// so a full pack is one 16-byte load; a pack that crosses `limit` (and every pack when !vector) is
// loaded element by element, never touching a column >= limit. Elements at columns >= limit are left 0
// (callers mask them).
template <typename Raw, int E>
__device__ __forceinline__ void load_pack(bool vector, const Raw* __restrict__ row, int col, int limit,
                                          Pack<Raw, E>& out) {
  if (vector && col + E <= limit) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(row + col));
    memcpy(&out, &u, sizeof(u));
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) out.v[j] = (col + j < limit) ? __ldg(row + col + j) : Raw(0);
  }
}

// ---- top-K keys --------------------------------------------------------------------------------
// 64-bit keys ordered by (value descending, id ascending): high word = order-preserving bits of the
// float value (-0.0 canonicalised to +0.0 so that equal floats tie), low word = 0xffffffff - id.
// Every real key is >= 2^32 (even for -inf: high word 0x007fffff); values < 2^32 are free for
// sentinels ("empty slot"), which therefore lose to every real element.
constexpr unsigned long long kRealKeyMin = 1ull << 32;

__device__ __forceinline__ unsigned long long make_key(float v, int id) {
  unsigned b = __float_as_uint(v);
  if (b == 0x80000000u) b = 0u;
  const unsigned ord = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<unsigned long long>(ord) << 32) | static_cast<unsigned long long>(0xffffffffu - static_cast<unsigned>(id));
}

__device__ __forceinline__ float key_value(unsigned long long key) {
  const unsigned ord = static_cast<unsigned>(key >> 32);
  const unsigned b = (ord & 0x80000000u) ? (ord & 0x7fffffffu) : ~ord;
  return __uint_as_float(b);
}

__device__ __forceinline__ int key_id(unsigned long long key) {
  return static_cast<int>(0xffffffffu - static_cast<unsigned>(key & 0xffffffffull));
}

// ---- warp reductions ---------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

}  // namespace taopd
