// Native CPU kernel of allo_kernels.SparseAdamW (plain C ABI, loaded with ctypes; no torch headers).
//
// One call updates one parameter tensor on a table of selected segments (see allo_kernels/optim/_layout.py):
// segment s covers param elements [seg_param[s], seg_param[s] + seg_len[s]) and compact state elements
// [seg_state[s], seg_state[s] + seg_len[s]). The compact range is cut into fixed-size chunks that OpenMP threads
// take statically, so one huge dense segment and many short rows balance alike.
//
// Arithmetic mirrors torch.optim.AdamW's single-tensor CPU path op for op, in fp32 (same order, fma where torch's
// vectorised kernels use one); the only known difference is sqrt, which is correctly rounded here while torch's CPU
// sqrt can be one ulp off, so results agree with the torch reference to about one ulp:
//   p = p * decay;  m = fma(w, g - m, m) (torch's vectorised lerp);  v = fma((1 - b2) * g, g, v * b2) (addcmul);
//   denom = sqrt(v) / bc2_sqrt + eps;  p = p + ((-step_size) * m) / denom.
// Hence -ffp-contract=off (no implicit fma) and an explicit fmaf where torch uses one.
// Vector code: a default build plus AVX2+FMA and AVX-512 builds of the chunk loop, chosen at run time from cpuid (no
// -march=native, so one wheel runs everywhere). The step streams 28 bytes per fp32 element and is close to memory
// bound with a few threads, but sqrt and two divides per element still cost: on a 2-core AMD EPYC (Zen 4), 4x4096x4096
// fp32, the AVX-512 build's best step was ~18% faster than the AVX2 build's with 1 thread and 10-14% with 2.
// ALLO_NATIVE_ISA=avx512|avx2|default caps the choice (for benchmarks and bug reports); the list of accepted values
// is owned by allo_kernels/optim/_native.py, which refuses any other non-empty value before this library loads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct Scalars {
  float decay, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size, grad_sign;
  int weight_decay_on, amsgrad, lerp_small;
};

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7FC0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#if defined(__FLT16_MAX__)
#define ALLO_HAS_F16 1
inline float f16_to_f32(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}
inline uint16_t f32_to_f16(float f) {
  _Float16 x = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}
#else
#define ALLO_HAS_F16 0
inline float f16_to_f32(uint16_t) { return 0.f; }
inline uint16_t f32_to_f16(float) { return 0; }
#endif

template <int DT>
inline float load_as_f32(const void* base, int64_t i) {
  if constexpr (DT == F32) return static_cast<const float*>(base)[i];
  else if constexpr (DT == BF16) return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
  else return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
}

template <int DT>
inline void store_from_f32(void* base, int64_t i, float x) {
  if constexpr (DT == F32) static_cast<float*>(base)[i] = x;
  else if constexpr (DT == BF16) static_cast<uint16_t*>(base)[i] = f32_to_bf16(x);
  else static_cast<uint16_t*>(base)[i] = f32_to_f16(x);
}

// One contiguous run: `n` elements starting at param element `pi` and compact element `si`.
template <int PDT, int GDT, bool MASTER, bool AMS, bool EMASK, bool SMALL>
__attribute__((always_inline)) inline void update_run(void* __restrict param, const void* __restrict grad,
                                                      float* __restrict m, float* __restrict v,
                                                      float* __restrict vmax, float* __restrict master,
                                                      const uint8_t* __restrict emask, int64_t pi, int64_t si,
                                                      int64_t n, const Scalars& s) {
  const float decay = s.decay, w = s.lerp_w, b2 = s.beta2, omb2 = s.one_minus_beta2, bc2 = s.bc2_sqrt, eps = s.eps,
              nss = s.neg_step_size, gs = s.grad_sign;
  const bool wd = s.weight_decay_on != 0;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const int64_t pj = pi + j, sj = si + j;
    float p = MASTER ? master[sj] : load_as_f32<PDT>(param, pj);
    const float g = load_as_f32<GDT>(grad, pj) * gs;
    const float m0 = m[sj], v0 = v[sj];
    float pn = wd ? p * decay : p;
    // torch's lerp: weight < 0.5 -> fma(w, g - m, m); else fma(w - 1, g - m, g)
    const float mn = SMALL ? std::fma(w, g - m0, m0) : std::fma(w - 1.0f, g - m0, g);
    const float vn = std::fma(omb2 * g, g, v0 * b2);  // torch's vectorised addcmul: fmadd(value * t1, t2, self)
    float vm = vn;
    float vmax_n = 0.f;
    if constexpr (AMS) {
      const float vx = vmax[sj];
      vmax_n = vx > vn ? vx : vn;
      if (std::isnan(vn) || std::isnan(vx)) vmax_n = vx + vn;  // torch.maximum propagates NaN
      vm = vmax_n;
    }
    const float denom = std::sqrt(vm) / bc2 + eps;
    pn = pn + (nss * mn) / denom;
    if constexpr (EMASK) {
      const bool on = emask[sj] != 0;
      m[sj] = on ? mn : m0;
      v[sj] = on ? vn : v0;
      if constexpr (AMS) vmax[sj] = on ? vmax_n : vmax[sj];
      pn = on ? pn : p;
    } else {
      m[sj] = mn;
      v[sj] = vn;
      if constexpr (AMS) vmax[sj] = vmax_n;
    }
    if constexpr (MASTER) master[sj] = pn;
    if constexpr (EMASK) {
      if (emask[sj]) store_from_f32<PDT>(param, pj, pn);
    } else {
      store_from_f32<PDT>(param, pj, pn);
    }
  }
}

struct Call {
  void* param;
  const void* grad;
  float *m, *v, *vmax, *master;
  const uint8_t* emask;
  const int64_t *seg_param, *seg_state, *seg_len;
  int64_t n_seg;
  Scalars s;
};

// Process compact elements [c0, c1).
template <int PDT, int GDT, bool MASTER, bool AMS, bool EMASK, bool SMALL>
__attribute__((always_inline)) inline void run_chunk(const Call& c, int64_t c0, int64_t c1) {
  // last segment whose state start is <= c0
  int64_t sidx = std::upper_bound(c.seg_state, c.seg_state + c.n_seg, c0) - c.seg_state - 1;
  for (int64_t pos = c0; pos < c1 && sidx < c.n_seg; ++sidx) {
    const int64_t s0 = c.seg_state[sidx], len = c.seg_len[sidx];
    const int64_t end = std::min(c1, s0 + len);
    if (end <= pos) continue;
    const int64_t pi = c.seg_param[sidx] + (pos - s0);
    update_run<PDT, GDT, MASTER, AMS, EMASK, SMALL>(c.param, c.grad, c.m, c.v, c.vmax, c.master, c.emask, pi, pos,
                                                    end - pos, c.s);
    pos = end;
  }
}

template <int PDT, int GDT, bool MASTER, bool AMS, bool EMASK, bool SMALL>
void chunk_default(const Call& c, int64_t c0, int64_t c1) {
  run_chunk<PDT, GDT, MASTER, AMS, EMASK, SMALL>(c, c0, c1);
}

#if defined(__x86_64__) || defined(__i386__)
#define ALLO_X86 1
template <int PDT, int GDT, bool MASTER, bool AMS, bool EMASK, bool SMALL>
__attribute__((target("avx2,fma,f16c"))) void chunk_avx2(const Call& c, int64_t c0, int64_t c1) {
  run_chunk<PDT, GDT, MASTER, AMS, EMASK, SMALL>(c, c0, c1);
}
#if defined(__GNUC__) && !defined(__clang__)
#define ALLO_AVX512_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,prefer-vector-width=512"
#else
#define ALLO_AVX512_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"
#endif
template <int PDT, int GDT, bool MASTER, bool AMS, bool EMASK, bool SMALL>
__attribute__((target(ALLO_AVX512_TARGET)))
#if defined(__clang__)
__attribute__((min_vector_width(512)))
#endif
void chunk_avx512(const Call& c, int64_t c0, int64_t c1) {
  run_chunk<PDT, GDT, MASTER, AMS, EMASK, SMALL>(c, c0, c1);
}
#else
#define ALLO_X86 0
#endif

using ChunkFn = void (*)(const Call&, int64_t, int64_t);

// 0 = portable build, 1 = AVX2+FMA, 2 = AVX-512; the best the CPU has, capped by ALLO_NATIVE_ISA.
int isa_level() {
#if ALLO_X86
  static const int level = [] {
    int best = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = 1;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        best = 2;
    }
    const char* cap = std::getenv("ALLO_NATIVE_ISA");
    if (cap != nullptr) {
      if (std::strcmp(cap, "default") == 0) best = 0;
      else if (std::strcmp(cap, "avx2") == 0) best = std::min(best, 1);
    }
    return best;
  }();
  return level;
#else
  return 0;
#endif
}

template <int PDT, int GDT, bool MASTER, bool AMS, bool EMASK, bool SMALL>
ChunkFn pick4() {
#if ALLO_X86
  if (isa_level() >= 2) return &chunk_avx512<PDT, GDT, MASTER, AMS, EMASK, SMALL>;
  if (isa_level() >= 1) return &chunk_avx2<PDT, GDT, MASTER, AMS, EMASK, SMALL>;
#endif
  return &chunk_default<PDT, GDT, MASTER, AMS, EMASK, SMALL>;
}

template <int PDT, int GDT>
ChunkFn pick_flags(bool master, bool ams, bool emask, bool small) {
  const int key = (master << 3) | (ams << 2) | (emask << 1) | int(small);
  switch (key) {
#define ALLO_CASE(K) \
  case K: return pick4<PDT, GDT, bool((K) & 8), bool((K) & 4), bool((K) & 2), bool((K) & 1)>();
    ALLO_CASE(0) ALLO_CASE(1) ALLO_CASE(2) ALLO_CASE(3) ALLO_CASE(4) ALLO_CASE(5) ALLO_CASE(6) ALLO_CASE(7)
    ALLO_CASE(8) ALLO_CASE(9) ALLO_CASE(10) ALLO_CASE(11) ALLO_CASE(12) ALLO_CASE(13) ALLO_CASE(14) ALLO_CASE(15)
#undef ALLO_CASE
  }
  return nullptr;
}

ChunkFn pick(int pdt, int gdt, bool master, bool ams, bool emask, bool small) {
  if (pdt == F32 && gdt == F32) return pick_flags<F32, F32>(master, ams, emask, small);
  if (pdt == BF16 && gdt == BF16) return pick_flags<BF16, BF16>(master, ams, emask, small);
  if (pdt == BF16 && gdt == F32) return pick_flags<BF16, F32>(master, ams, emask, small);
#if ALLO_HAS_F16
  if (pdt == F16 && gdt == F16) return pick_flags<F16, F16>(master, ams, emask, small);
  if (pdt == F16 && gdt == F32) return pick_flags<F16, F32>(master, ams, emask, small);
#endif
  return nullptr;
}

constexpr int64_t kChunk = 16384;

}  // namespace

extern "C" {

int allo_native_abi_version() { return 1; }

int allo_native_has_avx2() { return isa_level() >= 1 ? 1 : 0; }

// The vector build in use: 0 portable, 1 AVX2+FMA, 2 AVX-512.
int allo_native_isa_level() { return isa_level(); }

int allo_native_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Returns 0 on success, -1 for an unsupported dtype combination (the caller then uses its torch fallback).
int allo_sparse_adamw_step(int param_dtype, int grad_dtype, void* param, const void* grad, float* exp_avg,
                           float* exp_avg_sq, float* max_exp_avg_sq, float* master, const uint8_t* elem_mask,
                           const int64_t* seg_param, const int64_t* seg_state, const int64_t* seg_len, int64_t n_seg,
                           int64_t n_compact, float decay, float lerp_w, float beta2, float one_minus_beta2,
                           float bc2_sqrt, float eps, float neg_step_size, int weight_decay_on, int maximize,
                           int num_threads) {
  const bool small = std::fabs(lerp_w) < 0.5f;
  ChunkFn fn = pick(param_dtype, grad_dtype, master != nullptr, max_exp_avg_sq != nullptr, elem_mask != nullptr,
                    small);
  if (fn == nullptr) return -1;
  if (n_compact <= 0 || n_seg <= 0) return 0;
  Call c{param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, elem_mask, seg_param, seg_state, seg_len, n_seg,
         Scalars{decay, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size, maximize ? -1.0f : 1.0f,
                 weight_decay_on, max_exp_avg_sq != nullptr, small}};
  const int64_t n_chunks = (n_compact + kChunk - 1) / kChunk;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (n_chunks > 1)
#endif
  for (int64_t k = 0; k < n_chunks; ++k) {
    const int64_t c0 = k * kChunk;
    fn(c, c0, std::min(n_compact, c0 + kChunk));
  }
  return 0;
}

}  // extern "C"
