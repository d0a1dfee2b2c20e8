// Statistics of docs/math.md, Per-position statistics from logits: one thread block per row, each logit read once.
//
// Per thread: online softmax accumulators with max-rescaling, the same as backends/pytorch.py _OnlineSoftmax
// (reference point m = running max):
//     S0 = sum e^(x - m),  S1 = sum e^(x - m) (x - m),  Q = sum e^(x - m) (x - other)
// -> lse = m + log S0, H = log S0 - S1 / S0, KL_rev = Q_s / S0_s - lse_s + lse_t (KL_fwd likewise).
// Partial accumulators are merged across the warp (shuffles) and the block (shared memory).
//
// Top-K per warp and model: a sorted list of K 64-bit keys (value desc, id asc; see common.cuh) in
// shared memory plus a candidate buffer. A lane whose 16-byte pack holds a value >= the warp's
// threshold (the K-th key) makes the warp append the packs' exact candidates (key > threshold) to the
// buffer with ballots; a full buffer is merged into the list by ranking (keys are unique, so ranks
// are exact and ties go to the lower id). Each entry carries the other model's logit at its id. At
// the end the warp lists are merged by rank (binary searches), then warp 0 forms C, D and the outputs.
#include "common.cuh"

namespace taopd {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCap = 64;  // candidate buffer per warp and model

struct Soft {
  float m, s0, s1, q;
};

// Q may be +inf (mass of one model where the other is -inf); keep it, never make inf * 0 = NaN.
__device__ __forceinline__ float scale_q(float q, float sc) { return q == INFINITY ? q : q * sc; }

// r += a, with a moved to r's reference point r.m >= a.m.
__device__ __forceinline__ void soft_add(Soft& r, const Soft& a) {
  if (a.s0 > 0.f) {
    const float sh = a.m - r.m;
    const float sc = expf(sh);
    r.s0 += sc * a.s0;
    r.s1 += sc * (a.s1 + a.s0 * sh);
    r.q += scale_q(a.q, sc);
  }
}

// Move the reference point of a to m_new > a.m.
__device__ __forceinline__ void soft_rescale(Soft& a, float m_new) {
  Soft r{m_new, 0.f, 0.f, 0.f};
  soft_add(r, a);
  a = r;
}

__device__ __forceinline__ Soft soft_merge(const Soft& a, const Soft& b) {
  Soft r{fmaxf(a.m, b.m), 0.f, 0.f, 0.f};
  soft_add(r, a);
  soft_add(r, b);
  return r;
}

__device__ __forceinline__ Soft soft_warp_merge(Soft a) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Soft b;
    b.m = __shfl_xor_sync(kFullMask, a.m, o);
    b.s0 = __shfl_xor_sync(kFullMask, a.s0, o);
    b.s1 = __shfl_xor_sync(kFullMask, a.s1, o);
    b.q = __shfl_xor_sync(kFullMask, a.q, o);
    a = soft_merge(a, b);
  }
  return a;
}

// Fold one pack (x: this model's scaled logits, o: the other model's; -inf where not a column).
template <int E, bool WITH_S1>
__device__ __forceinline__ void soft_update(Soft& a, const float (&x)[E], const float (&o)[E]) {
  float vmax = x[0];
#pragma unroll
  for (int j = 1; j < E; ++j) vmax = fmaxf(vmax, x[j]);
  if (vmax > a.m) soft_rescale(a, vmax);
  const float base = (a.m == -INFINITY) ? 0.f : a.m;  // a.m == -inf: every x so far is -inf
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const float c = x[j] - base;
    const float e = exp2f(c * kLog2e);
    a.s0 += e;
    if (WITH_S1) a.s1 += e * fmaxf(c, -FLT_MAX);  // c = -inf only where e = 0
    a.q += (e > 0.f) ? e * (x[j] - o[j]) : 0.f;   // x = o = -inf would be NaN
  }
}

template <int KMAX>
struct TopKSmem {
  unsigned long long keys[kWarps][2][KMAX + kCap];  // [0, K): sorted list; [KMAX, KMAX + kCap): buffer
  float other[kWarps][2][KMAX + kCap];
  unsigned long long fkeys[2][KMAX];  // block result, sorted
  float fother[2][KMAX];
  float red[kWarps][7];
};

// Distinct sentinel keys (< 2^32) for the empty slots of warp w's list, descending in the slot.
__device__ __forceinline__ unsigned long long sentinel(int warp, int slot) {
  return static_cast<unsigned long long>(warp * kMaxTopK + (kMaxTopK - slot));
}

// Merge the warp's buffer [KMAX, KMAX + count) into its list [0, K); whole warp, uniform arguments.
template <int KMAX>
__device__ __noinline__ void warp_merge(unsigned long long* keys, float* other, int K, int count, int lane) {
  constexpr int kItems = (KMAX + kCap + 31) / 32;
  __syncwarp();
  const int total = K + count;
  unsigned long long mk[kItems];
  float mo[kItems];
  int rk[kItems];
#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const int i = lane + 32 * it;
    const int s = i < K ? i : KMAX + (i - K);
    const bool in = i < total;
    mk[it] = in ? keys[s] : 0ull;
    mo[it] = in ? other[s] : 0.f;
    rk[it] = 0;
  }
  for (int j = 0; j < total; ++j) {
    const unsigned long long kj = keys[j < K ? j : KMAX + (j - K)];
#pragma unroll
    for (int it = 0; it < kItems; ++it) rk[it] += (kj > mk[it]) ? 1 : 0;
  }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const int i = lane + 32 * it;
    if (i < total && rk[it] < K) {
      keys[rk[it]] = mk[it];
      other[rk[it]] = mo[it];
    }
  }
  __syncwarp();
}

struct Threshold {
  unsigned long long key;  // the list's K-th key: a candidate must beat it
  float value;             // its value, or -inf while the list still holds sentinels (pre-filter)
  int count;               // entries in the buffer
};

__device__ __forceinline__ void refresh(Threshold& t, const unsigned long long* keys, int K) {
  t.key = keys[K - 1];
  t.value = t.key >= kRealKeyMin ? key_value(t.key) : -INFINITY;
  t.count = 0;
}

// Append this pack's candidates to the warp's buffer (whole warp; called when any lane may have one).
template <int KMAX, int E>
__device__ __forceinline__ void push_candidates(unsigned long long* keys, float* other, Threshold& t, int K,
                                                int lane, const float (&x)[E], const float (&o)[E], int col,
                                                int vocab) {
  const unsigned lt_mask = (1u << lane) - 1u;
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const bool valid = col + j < vocab;
    const unsigned long long key = make_key(x[j], col + j);
    bool c = valid && key > t.key;
    unsigned b = __ballot_sync(kFullMask, c);
    if (b == 0u) continue;
    if (t.count + __popc(b) > kCap) {
      warp_merge<KMAX>(keys, other, K, t.count, lane);
      refresh(t, keys, K);
      c = valid && key > t.key;
      b = __ballot_sync(kFullMask, c);
    }
    if (c) {
      const int pos = KMAX + t.count + __popc(b & lt_mask);
      keys[pos] = key;
      other[pos] = o[j];
    }
    t.count += __popc(b);
  }
}

template <DType DT, int KMAX>
__global__ void __launch_bounds__(kThreads, 2) stats_kernel(const StatsParams p, const bool vector) {
  using Tr = Elem<DT>;
  using Raw = typename Tr::raw;
  constexpr int E = Tr::kVec;
  __shared__ TopKSmem<KMAX> sm;

  const int64_t row = blockIdx.x;
  const Raw* __restrict__ zs = static_cast<const Raw*>(p.zs) + row * p.stride_s;
  const Raw* __restrict__ zt = static_cast<const Raw*>(p.zt) + row * p.stride_t;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int K = p.k;
  const int vocab = p.vocab;
  const float inv_tau = p.inv_tau;

  unsigned long long* keys_s = sm.keys[warp][0];
  unsigned long long* keys_t = sm.keys[warp][1];
  float* oth_s = sm.other[warp][0];
  float* oth_t = sm.other[warp][1];
  for (int i = lane; i < K; i += 32) {
    keys_s[i] = sentinel(warp, i);
    keys_t[i] = sentinel(warp, i);
    oth_s[i] = -INFINITY;
    oth_t[i] = -INFINITY;
  }
  __syncwarp();
  Threshold th_s, th_t;
  refresh(th_s, keys_s, K);
  refresh(th_t, keys_t, K);

  Soft acc_s{-INFINITY, 0.f, 0.f, 0.f};
  Soft acc_t{-INFINITY, 0.f, 0.f, 0.f};

  const int nvec = (vocab + E - 1) / E;
  const int iters = (nvec + kThreads - 1) / kThreads;  // uniform over the block: ballots stay legal
  constexpr int kStep = kThreads * E;
  int col = tid * E;
  Pack<Raw, E> cur_s, cur_t, nxt_s, nxt_t;
  load_pack(vector, zs, col, vocab, cur_s);
  load_pack(vector, zt, col, vocab, cur_t);
  for (int it = 0; it < iters; ++it, col += kStep) {
    if (it + 1 < iters) {  // prefetch the next packs before working on these
      load_pack(vector, zs, col + kStep, vocab, nxt_s);
      load_pack(vector, zt, col + kStep, vocab, nxt_t);
    }
    float xs[E], xt[E];
    bool pre_s = false, pre_t = false;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const bool valid = col + j < vocab;
      xs[j] = valid ? Tr::to_float(cur_s.v[j]) * inv_tau : -INFINITY;
      xt[j] = valid ? Tr::to_float(cur_t.v[j]) * inv_tau : -INFINITY;
      pre_s |= valid && xs[j] >= th_s.value;
      pre_t |= valid && xt[j] >= th_t.value;
    }
    soft_update<E, true>(acc_s, xs, xt);
    soft_update<E, false>(acc_t, xt, xs);
    if (__any_sync(kFullMask, pre_s)) push_candidates<KMAX, E>(keys_s, oth_s, th_s, K, lane, xs, xt, col, vocab);
    if (__any_sync(kFullMask, pre_t)) push_candidates<KMAX, E>(keys_t, oth_t, th_t, K, lane, xt, xs, col, vocab);
    cur_s = nxt_s;
    cur_t = nxt_t;
  }
  if (th_s.count > 0) warp_merge<KMAX>(keys_s, oth_s, K, th_s.count, lane);
  if (th_t.count > 0) warp_merge<KMAX>(keys_t, oth_t, K, th_t.count, lane);

  // ---- block reduction of the softmax accumulators
  acc_s = soft_warp_merge(acc_s);
  acc_t = soft_warp_merge(acc_t);
  if (lane == 0) {
    float* r = sm.red[warp];
    r[0] = acc_s.m; r[1] = acc_s.s0; r[2] = acc_s.s1; r[3] = acc_s.q;
    r[4] = acc_t.m; r[5] = acc_t.s0; r[6] = acc_t.q;
  }
  __syncthreads();

  // ---- block merge of the warp lists: rank of each entry among all kWarps * K (unique keys)
  const int per_model = kWarps * K;
  for (int e = tid; e < 2 * per_model; e += kThreads) {
    const int m = e / per_model;
    const int r = e - m * per_model;
    const int w = r / K;
    const int pos = r - w * K;
    const unsigned long long key = sm.keys[w][m][pos];
    int rank = pos;
    for (int w2 = 0; w2 < kWarps; ++w2) {
      if (w2 == w) continue;
      const unsigned long long* list = sm.keys[w2][m];
      int lo = 0, hi = K;  // entries of list greater than key (list is sorted descending)
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (list[mid] > key) lo = mid + 1; else hi = mid;
      }
      rank += lo;
    }
    if (rank < K) {
      sm.fkeys[m][rank] = key;
      sm.fother[m][rank] = sm.other[w][m][pos];
    }
  }
  __syncthreads();
  if (warp != 0) return;

  // ---- warp 0: final softmax numbers, C, D, outputs
  Soft fs{-INFINITY, 0.f, 0.f, 0.f}, ft{-INFINITY, 0.f, 0.f, 0.f};
  if (lane < kWarps) {
    const float* r = sm.red[lane];
    fs = Soft{r[0], r[1], r[2], r[3]};
    ft = Soft{r[4], r[5], 0.f, r[6]};
  }
  fs = soft_warp_merge(fs);
  ft = soft_warp_merge(ft);
  const float log_s0s = logf(fs.s0), log_s0t = logf(ft.s0);
  const float lse_s = fs.m + log_s0s;
  const float lse_t = ft.m + log_s0t;

  // C = sum over the student's top-K of p_t (the teacher logit is carried with each entry)
  float c_part = 0.f;
  for (int r = lane; r < K; r += 32) c_part += expf((sm.fother[0][r] - ft.m) - log_s0t);
  const float mass = warp_sum(c_part);

  // D on U = S_s union S_t: teacher entries whose id is already in S_s are left out
  constexpr int kUItems = (2 * KMAX + 31) / 32;
  float us[kUItems], ut[kUItems];
  bool uin[kUItems];
  float mu_s = -INFINITY, mu_t = -INFINITY;
#pragma unroll
  for (int i = 0; i < kUItems; ++i) {
    const int u = lane + 32 * i;
    uin[i] = false;
    us[i] = -INFINITY;
    ut[i] = -INFINITY;
    if (u < K) {
      us[i] = key_value(sm.fkeys[0][u]);
      ut[i] = sm.fother[0][u];
      uin[i] = true;
    } else if (u < 2 * K) {
      const unsigned long long kt = sm.fkeys[1][u - K];
      const int id = key_id(kt);
      bool dup = false;
      for (int r = 0; r < K; ++r) dup |= key_id(sm.fkeys[0][r]) == id;
      if (!dup) {
        ut[i] = key_value(kt);
        us[i] = sm.fother[1][u - K];
        uin[i] = true;
      }
    }
    if (uin[i]) {
      mu_s = fmaxf(mu_s, us[i]);
      mu_t = fmaxf(mu_t, ut[i]);
    }
  }
  mu_s = warp_max(mu_s);
  mu_t = warp_max(mu_t);
  const float bs = mu_s == -INFINITY ? 0.f : mu_s;
  const float bt = mu_t == -INFINITY ? 0.f : mu_t;
  float zsum_s = 0.f, zsum_t = 0.f;
#pragma unroll
  for (int i = 0; i < kUItems; ++i) {
    if (uin[i]) {
      zsum_s += expf(us[i] - bs);
      zsum_t += expf(ut[i] - bt);
    }
  }
  const float lz_s = bs + logf(warp_sum(zsum_s));
  const float lz_t = bt + logf(warp_sum(zsum_t));
  float d_part = 0.f;
#pragma unroll
  for (int i = 0; i < kUItems; ++i) {
    if (uin[i]) {
      const float lpt = ut[i] - lz_t;
      const float pt = expf(lpt);
      d_part += (pt > 0.f) ? pt * (lpt - (us[i] - lz_s)) : 0.f;
    }
  }
  const float disagreement = warp_sum(d_part);

  for (int r = lane; r < K; r += 32) {
    p.ids_s[row * K + r] = key_id(sm.fkeys[0][r]);
    p.ids_t[row * K + r] = key_id(sm.fkeys[1][r]);
  }
  if (lane == 0) {
    p.lse_s[row] = lse_s;
    p.lse_t[row] = lse_t;
    p.entropy_s[row] = log_s0s - fs.s1 / fs.s0;
    // Cancellation-free: logit differences against the row maxima first, then the small log-sums.
    const float max_gap = fs.m - ft.m;
    p.expected_gap[row] = fs.q / fs.s0;
    p.kl_rev[row] = (fs.q / fs.s0 - max_gap) - (log_s0s - log_s0t);
    p.kl_fwd[row] = (ft.q / ft.s0 + max_gap) - (log_s0t - log_s0s);
    p.teacher_mass[row] = mass;
    p.disagreement[row] = disagreement;
    if (p.sampled != nullptr) {
      const int64_t y = p.sampled[row];
      float lp_s = __int_as_float(0x7fc00000), lp_t = __int_as_float(0x7fc00000);  // NaN if out of range
      if (y >= 0 && y < vocab) {
        lp_s = (Tr::to_float(zs[y]) * inv_tau - fs.m) - log_s0s;
        lp_t = (Tr::to_float(zt[y]) * inv_tau - ft.m) - log_s0t;
      }
      p.logp_s_y[row] = lp_s;
      p.logp_t_y[row] = lp_t;
    }
  }
}

template <DType DT, int KMAX>
cudaError_t launch_k(const StatsParams& p, bool vector, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.rows));
  stats_kernel<DT, KMAX><<<grid, kThreads, 0, stream>>>(p, vector);
  return cudaGetLastError();
}

template <DType DT>
cudaError_t launch_dt(const StatsParams& p, bool vector, cudaStream_t stream) {
  if (p.k <= 16) return launch_k<DT, 16>(p, vector, stream);
  if (p.k <= 32) return launch_k<DT, 32>(p, vector, stream);
  return launch_k<DT, 64>(p, vector, stream);
}

bool aligned16(const void* ptr, int64_t stride_elems, int64_t elem_bytes, int64_t rows) {
  const bool base = (reinterpret_cast<uintptr_t>(ptr) % 16) == 0;
  return base && (rows <= 1 || (stride_elems * elem_bytes) % 16 == 0);
}

}  // namespace

cudaError_t launch_teachability_stats(const StatsParams& p, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  if (p.k < 1 || p.k > kMaxTopK || p.k > p.vocab || p.rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  const int64_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  const bool vector = aligned16(p.zs, p.stride_s, es, p.rows) && aligned16(p.zt, p.stride_t, es, p.rows);
  switch (p.dtype) {
    case DType::kFloat32: return launch_dt<DType::kFloat32>(p, vector, stream);
    case DType::kFloat16: return launch_dt<DType::kFloat16>(p, vector, stream);
    case DType::kBFloat16: return launch_dt<DType::kBFloat16>(p, vector, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace taopd
