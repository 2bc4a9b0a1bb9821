// Pre-RoPE pair-layout decode, coded split programs, CUDA C++ (compiled at run time by NVRTC, rope_decode_cuda.py).
//
// Same contract as the Triton `_rope_coded_kernel` (rope_decode.py): one CTA per (sequence, KV head, coded chunk),
// tokens whose anchor bit is set are skipped, the normalized partial (out, log2-sum-exp) of the G*Tq query rows is
// written to slot cidx of po / pl, which the exact programs + fused merge of DecodePlan consume (their arrival
// counter is pre-filled with P_coded: this kernel does not count arrivals).
//
// Per CTA both tables sit in shared memory: the key table (centroids in coding space with the mean folded in, as
// fp16 whatever its stored dtype) and the value centroids (16-bit, one copy, chunks swizzled: vchunk_off). Each
// warp runs its own flash-decoding loop over 32-token tiles (tile j of the chunk -> warp j % NWARP), 4 groups of 8
// tokens each (NOTES.md "CUDA C++ kernel", factored angle):
//   angle  of slot p = T + d (T = p - p % 8, the group's first slot): fl(T w) + fl(d w) (w = inv_freq of the pair),
//          within 1 ulp of HF's fl(p w) (both within 0.5 ulp of the real p w). R(-fl(T w)) rotates the QUERY once
//          per (group, pair): computed once per warp and tile (one entry per lane and (group, pair) / 32: exact
//          Cody-Waite reduction to [-pi, pi], sin.approx / cos.approx) into s_rot, read by every lane with a
//          broadcast. R(fl(d w)) rotates the KEY: d = the lane's token column gq, so each lane keeps its 16 pairs'
//          factors in registers for the whole kernel (exact polynomial cos / sin once). Both rotations are one HMUL2
//          + one HFMA2 per pair on fp16x2 (x.re * (c, s) + x.im * (-s, c)).
//   keys   mma.m16n8k16 with the query rows on M (rows gq < RV real, 8..15 zero), 8 tokens on N, coding dims on K
//          (8 pairs per 16-dim k-slice). The B fragments of two k-slices are one ldmatrix.x4 of the 8 tokens'
//          16-byte key rows: lane (gq, tq) receives pairs tq / tq + 4 of each slice of token gq as (re, im) fp16 and
//          rotates them: the dequantized key is never stored, and one group of keys serves all G query heads.
//   softmax per warp and query row gq, base 2, lazy running max (raised only when a logit exceeds it by > 8). The
//          logits' C fragment (row gq, tokens 2 tq, 2 tq + 1) packed to 16 bits is exactly the value MMA's B
//          fragment: p never goes through shared memory.
//   values ldmatrix.x4.trans of the value centroids of 16 tokens x 16 dims (each lane addresses one centroid row),
//          mma.m16n8k16, fp32 accumulators (dims on M, query rows on N).
//   codes  of the next tile copied by cp.async into a second per-warp buffer while this tile is decoded.
//
// Compile-time constants (rope_decode_cuda.py): D (head dim), SK / MK / SUBK (key sub-spaces, centroids, dims; one
// stage), CV / MV / SUBV (value codes per token, centroids, dims; one stage), CK (key codes per token = SK), RV
// (real query rows, <= 8), TQ, NT (threads), KT (key table dtype: 0 fp16, 1 bf16, 2 fp32), CT (value centroids),
// QT (query dtype: 0 fp16, 1 bf16, 2 fp32), TABB (bytes before the per-warp tiles: the two tables, and at least
// the epilogue's NWARP * 8 * D fp32 accumulators, which overwrite them).

#define NWARP (NT / 32)
#define NEG_INF (__int_as_float(0xff800000))
#define LAZY 8.0f
#define NKS (D / 16)          // k-slices of the logits MMA
#define NCH16 (SUBV / 8)      // 16-byte chunks per value centroid
#define KCH (SUBK / 8)        // 16-byte chunks per key centroid

typedef unsigned char u8;
typedef unsigned short half_t;

template <int C>
__device__ __forceinline__ float to_f32(const void* p, size_t i) {
    if constexpr (C == 0) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(reinterpret_cast<const unsigned short*>(p)[i]));
        return f;
    } else if constexpr (C == 1) {
        return __uint_as_float(((unsigned)reinterpret_cast<const unsigned short*>(p)[i]) << 16);
    } else {
        return reinterpret_cast<const float*>(p)[i];
    }
}

__device__ __forceinline__ unsigned f2_to_h2(float lo, float hi) {  // fp16x2, lo in the low half
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float2 h2_to_f2(unsigned x) {
    float2 r;
    asm("{.reg .f16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\tcvt.f32.f16 %0, lo;\n\tcvt.f32.f16 %1, hi;}"
        : "=f"(r.x), "=f"(r.y) : "r"(x));
    return r;
}

// value MMA operand type follows the value centroids (bf16 for bf16, else fp16)
#if CT == 1
#define CVT_V "cvt.rn.bf16.f32 %0, %1;"
#define MMA_V "bf16.bf16"
#else
#define CVT_V "cvt.rn.f16.f32 %0, %1;"
#define MMA_V "f16.f16"
#endif
__device__ __forceinline__ half_t to_vhalf(float f) {
    unsigned short h;
    asm(CVT_V : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ half_t to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ void mma_k(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                      unsigned b1) {  // logits: fp16 x fp16 -> fp32
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_v(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                      unsigned b1) {  // values
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_V ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& a0, unsigned& a1, unsigned& a2, unsigned& a3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned& a0, unsigned& a1, unsigned& a2, unsigned& a3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3) : "r"(addr));
}

// cos / sin of an fp32 angle x, 0 <= x < 2^24 (Cody-Waite with FMA: x - k * C1 is exact, then two more constants;
// Cephes sinf / cosf polynomials on [-pi/4, pi/4]). Max error ~1e-7 absolute for the angles of 2^24 slots.
__device__ __forceinline__ void cos_sin(float x, float& c, float& s) {
    const float k = rintf(x * 0.636619772367581343f);  // quadrant count (off by one at a boundary: |r| <~ pi/4 + eps)
    const int q = (int)k;
    float r = __fmaf_rn(-k, 1.5703125f, x);
    r = __fmaf_rn(-k, 4.837512969970703125e-4f, r);
    r = __fmaf_rn(-k, 7.54978995489188216e-8f, r);
    const float z = r * r;
    float ps = __fmaf_rn(z, -1.9515295891e-4f, 8.3321608736e-3f);
    ps = __fmaf_rn(ps, z, -1.6666654611e-1f);
    const float sr = __fmaf_rn(ps * z, r, r);
    float pc = __fmaf_rn(z, 2.443315711809948e-5f, -1.388731625493765e-3f);
    pc = __fmaf_rn(pc, z, 4.166664568298827e-2f);
    const float cr = __fmaf_rn(pc * z, z, __fmaf_rn(-0.5f, z, 1.0f));
    // quadrant q: (cos, sin)(r + q pi/2) = (c, s), (-s, c), (-c, -s), (s, -c)
    const float a = (q & 1) ? sr : cr;
    const float b = (q & 1) ? cr : sr;
    c = ((q + 1) & 2) ? -a : a;
    s = (q & 2) ? -b : b;
}

// Byte offset of value chunk ch of centroid (sub-space sv, code k), one copy of the table (the
// 16-byte chunks of a code's CV * NCH16 chunks XOR-swizzled by the code within each group of 8).
__device__ __forceinline__ unsigned vchunk_off(int sv, unsigned k, int ch) {
    const unsigned j = sv * NCH16 + ch;
    return 16u * (k * (CV * NCH16) + ((j >> 3) << 3) + ((j ^ k) & 7u));
}

template <int C> struct Codes;
template <> struct Codes<16> {
    typedef uint4 T;
    static __device__ __forceinline__ unsigned word(const T& w, int i) {
        return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
    }
    static __device__ __forceinline__ T zero() { return make_uint4(0u, 0u, 0u, 0u); }
};
template <> struct Codes<8> {
    typedef uint2 T;
    static __device__ __forceinline__ unsigned word(const T& w, int i) { return i == 0 ? w.x : w.y; }
    static __device__ __forceinline__ T zero() { return make_uint2(0u, 0u); }
};
template <> struct Codes<4> {
    typedef unsigned T;
    static __device__ __forceinline__ unsigned word(const T& w, int) { return w; }
    static __device__ __forceinline__ T zero() { return 0u; }
};
template <typename W>
__device__ __forceinline__ unsigned code_of(const typename W::T& w, int c) {
    return (W::word(w, c >> 2) >> (8 * (c & 3))) & 255u;
}

__device__ __forceinline__ float warp_max8(float v) {  // over the 8 lanes of one tq (lanes tq + 4 gq)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
}
__device__ __forceinline__ float warp_sum8(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 8);
    return v + __shfl_xor_sync(0xffffffffu, v, 16);
}

typedef Codes<CK> KW;
typedef Codes<CV> VW;

// cos / sin of an fp32 angle x, 0 <= x < 2^24, through the special-function unit: the same exact Cody-Waite
// reduction (to [-pi, pi], 2 pi in 3 constants) then sin.approx / cos.approx (|error| <= ~1e-6 absolute). For the
// per-tile factor R(T w) only (one per (8-token group, pair), not per token).
__device__ __forceinline__ void cos_sin_sfu(float x, float& c, float& s) {
    const float k = rintf(x * 0.159154943091895336f);
    float r = __fmaf_rn(-k, 6.28125f, x);
    r = __fmaf_rn(-k, 1.93500518798828125e-3f, r);  // 2 pi = 6.28125 + these two (4 x the pi / 2 tails)
    r = __fmaf_rn(-k, 3.019915981956752864e-7f, r);
    __sincosf(r, &s, &c);
}

// Rotation of one (re, im) fp16 pair x by the angle of (c, s): (re c - im s, im c + re s).
// fp16x2: cs = (c, s), ns = (-s, c) packed: x.re * cs + x.im * ns (HMUL2 + HFMA2 with the .H0_H0 / .H1_H1 operand
// selects of SASS)
__device__ __forceinline__ unsigned rot_pair(unsigned x, unsigned cs, unsigned ns) {
    unsigned r;
    asm("{.reg .b16 lo, hi;\n\t.reg .b32 ll, hh;\n\tmov.b32 {lo, hi}, %1;\n\tmov.b32 ll, {lo, lo};\n\t"
        "mov.b32 hh, {hi, hi};\n\tmul.rn.f16x2 %0, ll, %2;\n\tfma.rn.f16x2 %0, hh, %3, %0;}"
        : "=r"(r) : "r"(x), "r"(cs), "r"(ns));
    return r;
}

extern "C" __global__ void __launch_bounds__(NT, 1)
antkv_rope_coded(const void* __restrict__ q,            // [B, Hq, TQ, D] (strides s_qb, s_qh, s_qt; unit last)
                 const u8* __restrict__ codes_k,        // [pairs, n_cap, CK]
                 const u8* __restrict__ codes_v,        // [pairs, n_cap, CV]
                 const int* __restrict__ bits,          // [pairs, nw] anchor bitmask
                 const int* __restrict__ ncoded,        // [B]
                 const void* __restrict__ table_k,      // [1, H_cb, SK, MK, SUBK]
                 const int* __restrict__ pairs_k,       // [H_cb, D/2]
                 const float* __restrict__ freq_k,      // [H_cb, D/2]
                 const void* __restrict__ cent_v,       // [1, H_cb, CV, MV, SUBV]
                 float* __restrict__ po,                // [pairs, ps, RPAD, D]
                 float* __restrict__ pl,                // [pairs, ps, RPAD]
                 int s_qb, int s_qh, int s_qt, int hkv, int n_cap, int nw, int p_coded, int ps, int rpad,
                 int cbk_per_head, int cbv_per_head, int qk_scale_bits)
{
    static_assert(NKS % 2 == 0, "the key ldmatrix.x4 covers two k-slices");
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned char* s_key = smem;                                                   // SK * MK * SUBK * 2
    unsigned char* s_cent = s_key + SK * MK * SUBK * 2;                            // CV * MV * SUBV * 2
    uint4* s_rot0 = reinterpret_cast<uint4*>(smem + TABB);                         // [NWARP][4][NKS][4] x 16 B
    u8* s_kc0 = reinterpret_cast<u8*>(s_rot0 + NWARP * 4 * NKS * 4);               // [NWARP][2][32][CK]
    u8* s_vc0 = s_kc0 + NWARP * 64 * CK;                                           // [NWARP][2][32][CV]
    float* s_red = reinterpret_cast<float*>(s_vc0 + NWARP * 64 * CV);              // [NWARP][8] max, [NWARP][8] sum

    const int pair = blockIdx.x, cidx = blockIdx.y;
    const int b = pair / hkv, h = pair % hkv;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;
    const float qk_scale = __int_as_float(qk_scale_bits);  // scale * log2(e) * attention_scaling
    int start, end;
    {
        const int n = ncoded[b];
        const int chunk = (((n + p_coded - 1) / p_coded) + 63) & ~63;  // whole 64-token groups
        start = min(cidx * chunk, n);
        end = min(start + chunk, n);
    }
    const size_t slot = ((size_t)pair * ps + cidx) * rpad;
    if (start >= end) {  // an empty chunk: an empty partial (the merge weighs it 0)
        for (int o = tid; o < RV * D; o += NT) {
            po[(slot + o / D) * D + o % D] = 0.f;
            if (o % D == 0) pl[slot + o / D] = NEG_INF;
        }
        return;
    }
    const int hk = h * cbk_per_head, hv = h * cbv_per_head;

    // ------------------------------------------------------------------------ tables into shared memory
    {
        // keys: fp16 rows [SK][MK][SUBK] (chunk i of 8 elements)
        uint4* sk4 = reinterpret_cast<uint4*>(s_key);
        const size_t kbase = (size_t)hk * SK * MK * SUBK;
        for (int i = tid; i < SK * MK * KCH; i += NT) {
#if KT == 0
            sk4[i] = reinterpret_cast<const uint4*>(reinterpret_cast<const half_t*>(table_k) + kbase)[i];
#else
            float f[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) f[e] = to_f32<KT>(table_k, kbase + (size_t)i * 8 + e);
            sk4[i] = make_uint4(f2_to_h2(f[0], f[1]), f2_to_h2(f[2], f[3]), f2_to_h2(f[4], f[5]),
                                f2_to_h2(f[6], f[7]));
#endif
        }
        // values: 16-bit, one copy, swizzled (vchunk_off)
        const size_t vbase = (size_t)hv * CV * MV * SUBV;
        for (int i = tid; i < CV * MV * NCH16; i += NT) {  // i = (sv * MV + k) * NCH16 + ch
            const int ch = i % NCH16, k = (i / NCH16) % MV, sv = i / (NCH16 * MV);
            uint4 v;
#if CT == 2
            float f[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) f[e] = to_f32<2>(cent_v, vbase + (size_t)i * 8 + e);
            v = make_uint4(to_vhalf(f[0]) | ((unsigned)to_vhalf(f[1]) << 16),
                           to_vhalf(f[2]) | ((unsigned)to_vhalf(f[3]) << 16),
                           to_vhalf(f[4]) | ((unsigned)to_vhalf(f[5]) << 16),
                           to_vhalf(f[6]) | ((unsigned)to_vhalf(f[7]) << 16));
#else
            v = reinterpret_cast<const uint4*>(reinterpret_cast<const half_t*>(cent_v) + vbase)[i];
#endif
            *reinterpret_cast<uint4*>(s_cent + vchunk_off(sv, (unsigned)k, ch)) = v;
        }
    }

    // ------------------------------------------------------------------------ per-lane constants
    // Logits: m16n8k16 with the query rows on M (rows gq < RV real, rows 8..15 zero) and 8 tokens on N. A fragment
    // of k-slice ks: a0 = coding pair 8 ks + tq of query row gq as (re, im) = (q[j], q[j + D/2]), a2 = pair
    // 8 ks + 4 + tq; B fragment: b0 / b1 = the same pairs of token gq of the 8-token group. Angle of token
    // T + gq (T = the group's first slot): fl(T w) + fl(gq w); R(-fl(T w)) rotates the query once per group (the
    // cos / sin shared through s_rot), R(fl(gq w)) the key (per lane, constant: kcs / kns).
    const int* pj = pairs_k + (size_t)hk * (D / 2);
    const float* fj = freq_k + (size_t)hk * (D / 2);
    unsigned qh[NKS][2];           // query pairs, fp16x2, scaled
    unsigned kcs[NKS][2], kns[NKS][2];  // (cos, sin), (-sin, cos) of fl(gq w), fp16x2
    {
        const int r = gq, g = r / TQ, t = r % TQ;
        const size_t qoff = (size_t)b * s_qb + (size_t)(h * (RV / TQ) + g) * s_qh + (size_t)t * s_qt;
#pragma unroll
        for (int ks = 0; ks < NKS; ++ks)
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int c = 8 * ks + 4 * u + tq;
                float re = 0.f, im = 0.f;
                if (r < RV) {
                    const int j = pj[c];
                    re = to_f32<QT>(q, qoff + j) * qk_scale;
                    im = to_f32<QT>(q, qoff + j + D / 2) * qk_scale;
                }
                float cs, sn;
                cos_sin((float)gq * fj[c], cs, sn);  // fl(gq w), exact cos / sin
                qh[ks][u] = f2_to_h2(re, im);
                kcs[ks][u] = f2_to_h2(cs, sn);
                kns[ks][u] = f2_to_h2(-sn, cs);
            }
    }
    // s_rot producer: entry e = lane + 32 i of a tile (4 groups x D/2 pairs): group e / (D/2), pair e % (D/2)
#define NPR (4 * (D / 2) / 32)              // entries per lane and tile
#define NWP ((D / 2) >= 32 ? (D / 64) : 1)  // distinct pairs per lane
    float wp[NWP];
#pragma unroll
    for (int m = 0; m < NWP; ++m) wp[m] = fj[(lane + 32 * m) % (D / 2)];

    const u8* ck_base = codes_k + (size_t)pair * n_cap * CK;
    const u8* cv_base = codes_v + (size_t)pair * n_cap * CV;
    const int* bits_base = bits + (size_t)pair * nw;
    uint4* s_rot = s_rot0 + warp * 4 * NKS * 4;
    u8* s_kc = s_kc0 + warp * 64 * CK;
    u8* s_vc = s_vc0 + warp * 64 * CV;
    const unsigned s_key_addr = (unsigned)__cvta_generic_to_shared(s_key);
    const unsigned s_cent_addr = (unsigned)__cvta_generic_to_shared(s_cent);
    // ldmatrix roles. keys (non-trans): matrix i = lane / 8 = 8-dim chunk 4 kk + i, row = token lane & 7 of the
    // group. values (trans): tokens (lane & 7) + 8 (lane >> 4), half hf = (lane >> 3) & 1.
    const int krow = lane & 7, kmat = lane >> 3;
    const int ltok = (lane & 7) + ((lane >> 4) << 3), hf = (lane >> 3) & 1;

    float mrow = NEG_INF;  // running max of query row gq (uniform over its 4 tq lanes)
    float lrow = 0.f;      // this lane's share of its sum
    float acc[D / 16][4];  // value D fragments: dims (mt 16 + gq, + 8) x rows (2 tq, 2 tq + 1)
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;

    // codes: key and value codes of token t0 + lane, copied asynchronously into s_kc / s_vc (two buffers: the next
    // tile's codes are in flight while this one is decoded; zero-filled past the end); the anchor word in a register
    const int stride = 32 * NWARP;
    int t0 = start + 32 * warp;
    const unsigned s_kc_addr = (unsigned)__cvta_generic_to_shared(s_kc), s_vc_addr = (unsigned)__cvta_generic_to_shared(s_vc);
    auto load_tile = [&](int tt, int buf) {
        const bool ok = tt + lane < end;
        const u8* kp = ok ? ck_base + (size_t)(tt + lane) * CK : ck_base;
        const u8* vp = ok ? cv_base + (size_t)(tt + lane) * CV : cv_base;
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;"
                     :: "r"(s_kc_addr + (buf * 32 + lane) * CK), "l"(kp), "n"(CK), "r"(ok ? CK : 0) : "memory");
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;"
                     :: "r"(s_vc_addr + (buf * 32 + lane) * CV), "l"(vp), "n"(CV), "r"(ok ? CV : 0) : "memory");
        asm volatile("cp.async.commit_group;" ::: "memory");
        return tt < end ? bits_base[tt >> 5] : -1;
    };
    int word = load_tile(t0, 0);
    __syncthreads();  // tables ready

    for (int buf = 0; t0 < end; t0 += stride, buf ^= 1) {
        const int wcur = word;
        asm volatile("cp.async.wait_group 0;" ::: "memory");  // this tile's codes (this lane's copies)
        __syncwarp();                                          // ... and every lane's
        word = load_tile(t0 + stride, buf ^ 1);  // prefetch the next tile (into the buffer the previous tile read)
        const u8* kc_t = s_kc + buf * 32 * CK;
        const u8* vc_t = s_vc + buf * 32 * CV;
        // R(-fl(T w)) of the tile's 4 groups (T = t0 + 8 j), one entry per (group, pair)
#pragma unroll
        for (int i = 0; i < NPR; ++i) {
            const int e = lane + 32 * i, jg = e / (D / 2), c = e % (D / 2);
            float cs, sn;
            cos_sin_sfu((float)(t0 + 8 * jg) * wp[i % NWP], cs, sn);
            const int off = ((jg * NKS + (c >> 3)) * 4 + (c & 3)) * 2 + ((c >> 2) & 1);  // 8-byte units
            reinterpret_cast<uint2*>(s_rot)[off] = make_uint2(f2_to_h2(cs, -sn), f2_to_h2(sn, cs));
        }
        __syncwarp();

        // -------------------------------------------------------------------- logits of row gq, tokens 2 tq, +1
        float lg[4][2];
#pragma unroll
        for (int jg = 0; jg < 4; ++jg) {
            float d4[4] = {0.f, 0.f, 0.f, 0.f};
            const typename KW::T cw = *reinterpret_cast<const typename KW::T*>(kc_t + (8 * jg + krow) * CK);
#pragma unroll
            for (int kk = 0; kk < NKS / 2; ++kk) {
                // this lane's ldmatrix row: token krow, 8-dim chunk 4 kk + kmat of sub-space (4 kk + kmat) / KCH
                const int sub0 = 4 * kk / KCH;
                const unsigned sub = sub0 + kmat / KCH;
                unsigned code = (KW::word(cw, sub0 >> 2) >> (8 * ((sub0 & 3) + kmat / KCH))) & 255u;
                const unsigned addr = s_key_addr + ((sub * MK + code) * KCH + kmat % KCH) * 16u;
                unsigned a[4];
                ldsm_x4(addr, a[0], a[1], a[2], a[3]);  // a[2 hh + u]: pair 8 (2 kk + hh) + 4 u + tq of token gq
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int ks = 2 * kk + hh;
                    const uint4 rt = s_rot[(jg * NKS + ks) * 4 + tq];  // R(-fl(T w)) of pairs (ks, u = 0 / 1)
                    const unsigned q0 = rot_pair(qh[ks][0], rt.x, rt.y);
                    const unsigned q1 = rot_pair(qh[ks][1], rt.z, rt.w);
                    const unsigned b0 = rot_pair(a[2 * hh], kcs[ks][0], kns[ks][0]);
                    const unsigned b1 = rot_pair(a[2 * hh + 1], kcs[ks][1], kns[ks][1]);
                    mma_k(d4, q0, 0u, q1, 0u, b0, b1);
                }
            }
            // mask: anchors and tokens past the end (tokens 8 jg + 2 tq, + 1)
            const int d0 = 8 * jg + 2 * tq;
            lg[jg][0] = (t0 + d0 < end && !((wcur >> d0) & 1)) ? d4[0] : NEG_INF;
            lg[jg][1] = (t0 + d0 + 1 < end && !((wcur >> (d0 + 1)) & 1)) ? d4[1] : NEG_INF;
        }
        // -------------------------------------------------------------------- lazy running max of row gq
        {
            float x = fmaxf(fmaxf(lg[0][0], lg[0][1]), fmaxf(lg[1][0], lg[1][1]));
            x = fmaxf(x, fmaxf(fmaxf(lg[2][0], lg[2][1]), fmaxf(lg[3][0], lg[3][1])));
            if (__any_sync(0xffffffffu, x > mrow + LAZY)) {
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
                const float nm = fmaxf(mrow, x);
                const float al = nm == NEG_INF ? 1.f : exp2f(mrow - nm);
                mrow = nm;
                lrow *= al;
                const float alo = __shfl_sync(0xffffffffu, al, 8 * tq), ahi = __shfl_sync(0xffffffffu, al, 8 * tq + 4);
#pragma unroll
                for (int mt = 0; mt < D / 16; ++mt) {
                    acc[mt][0] *= alo; acc[mt][1] *= ahi; acc[mt][2] *= alo; acc[mt][3] *= ahi;
                }
            }
        }
        // p of row gq, tokens 8 jg + 2 tq, + 1: exactly the value MMA's B fragment (b0 = group 2 kv, b1 = 2 kv + 1)
        unsigned pb[4];
        {
            const float u = mrow == NEG_INF ? 0.f : mrow;
#pragma unroll
            for (int jg = 0; jg < 4; ++jg) {
                const float p0 = exp2f(lg[jg][0] - u), p1 = exp2f(lg[jg][1] - u);
                lrow += p0 + p1;
                pb[jg] = (unsigned)to_vhalf(p0) | ((unsigned)to_vhalf(p1) << 16);
            }
        }
        // -------------------------------------------------------------------- values: 2 steps of 16 tokens
#pragma unroll
        for (int kv = 0; kv < 2; ++kv) {
            const typename VW::T cw = *reinterpret_cast<const typename VW::T*>(vc_t + (kv * 16 + ltok) * CV);
#pragma unroll
            for (int mt = 0; mt < D / 16; ++mt) {
                const int sv = SUBV == 8 ? 2 * mt + hf : mt;
                const int ch = SUBV == 8 ? 0 : hf;
                unsigned k = code_of<VW>(cw, sv);
                unsigned a0, a1, a2, a3;
                ldsm_x4_t(s_cent_addr + vchunk_off(sv, k, ch), a0, a1, a2, a3);
                mma_v(acc[mt], a0, a1, a2, a3, pb[2 * kv], pb[2 * kv + 1]);
            }
        }
        __syncwarp();  // s_rot is rewritten by the next tile, this tile's code buffer by the one after
    }

    // ------------------------------------------------------------------------ merge the warps, store the partial
    asm volatile("cp.async.wait_group 0;" ::: "memory");  // the last (empty) prefetch
    __syncthreads();  // every warp done with the tables (the reduction overwrites them)
    lrow += __shfl_xor_sync(0xffffffffu, lrow, 1);
    lrow += __shfl_xor_sync(0xffffffffu, lrow, 2);
    float* s_mx = s_red;               // [NWARP][8]
    float* s_l = s_red + NWARP * 8;    // [NWARP][8]
    if (tq == 0) s_mx[warp * 8 + gq] = mrow;
    __syncthreads();
    float mx_r = NEG_INF, mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll 4
    for (int w = 0; w < NWARP; ++w) {
        mx_r = fmaxf(mx_r, s_mx[w * 8 + gq]);
        mx_lo = fmaxf(mx_lo, s_mx[w * 8 + 2 * tq]);
        mx_hi = fmaxf(mx_hi, s_mx[w * 8 + 2 * tq + 1]);
    }
    const float mlo = s_mx[warp * 8 + 2 * tq], mhi = s_mx[warp * 8 + 2 * tq + 1];
    const float sclo = mlo == NEG_INF ? 0.f : exp2f(mlo - mx_lo), schi = mhi == NEG_INF ? 0.f : exp2f(mhi - mx_hi);
    if (tq == 0) s_l[warp * 8 + gq] = mrow == NEG_INF ? 0.f : lrow * exp2f(mrow - mx_r);
    float* s_acc = reinterpret_cast<float*>(smem);  // [NWARP][8][D] over the tables
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
        const int d0 = mt * 16 + gq;
        s_acc[(warp * 8 + 2 * tq) * D + d0] = acc[mt][0] * sclo;
        s_acc[(warp * 8 + 2 * tq + 1) * D + d0] = acc[mt][1] * schi;
        s_acc[(warp * 8 + 2 * tq) * D + d0 + 8] = acc[mt][2] * sclo;
        s_acc[(warp * 8 + 2 * tq + 1) * D + d0 + 8] = acc[mt][3] * schi;
    }
    __syncthreads();
    for (int o = tid; o < RV * D; o += NT) {
        const int r = o / D, d = o % D;
        float v = 0.f, l = 0.f, mxr = NEG_INF;
#pragma unroll 4
        for (int w = 0; w < NWARP; ++w) {
            v += s_acc[(w * 8 + r) * D + d];
            l += s_l[w * 8 + r];
            mxr = fmaxf(mxr, s_mx[w * 8 + r]);
        }
        po[(slot + r) * D + d] = l > 0.f ? v / l : 0.f;
        if (d == 0) pl[slot + r] = l > 0.f ? mxr + log2f(l) : NEG_INF;
    }
}

// Test probe (tests/test_cuda.py): cos / sin of fl(pos[i / nw] * w[i % nw]) as the kernel computes them, by the
// per-lane key path (cos_sin) or, sfu != 0, the per-group query path (cos_sin_sfu).
extern "C" __global__ void antkv_rope_cos_sin_probe(const float* __restrict__ pos, const float* __restrict__ w,
                                                   float* __restrict__ out, int n, int nw, int sfu)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n * nw) {
        float c, s;
        if (sfu)
            cos_sin_sfu(pos[i / nw] * w[i % nw], c, s);
        else
            cos_sin(pos[i / nw] * w[i % nw], c, s);
        out[2 * i] = c;
        out[2 * i + 1] = s;
    }
}
