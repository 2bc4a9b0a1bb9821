// TEMPORARY: the previous pre-RoPE kernel (exact cos / sin per (token, pair)), kept for ONE benchmark comparison
// against rope_decode.cu (kernels_bench variant "rope_old", launcher flag rope_decode_cuda.OLD_KERNEL); delete after.
//
// Pre-RoPE pair-layout decode, coded split programs, CUDA C++ (compiled at run time by NVRTC, rope_decode_cuda.py).
//
// Same contract as the Triton `_rope_coded_kernel` (rope_decode.py): one CTA per (sequence, KV head, coded chunk),
// tokens whose anchor bit is set are skipped, the normalized partial (out, log2-sum-exp) of the G*Tq query rows is
// written to slot cidx of po / pl, which the exact programs + fused merge of DecodePlan consume (their arrival
// counter is pre-filled with P_coded: this kernel does not count arrivals).
//
// Per CTA both tables sit in shared memory: the key table (centroids in coding space with the mean folded in, as
// fp16 whatever its stored dtype) and the value centroids (16-bit, as coded_decode.cu stores them, one copy). Each
// warp runs its own flash-decoding loop over 32-token tiles (tile j of the chunk -> warp j % NWARP):
//   keys   tokens on M of mma.m16n8k16 (2 groups of 16 tokens), coding dims on K (8 pairs per 16-dim k-slice),
//          query rows on N (8 columns, RV <= 8 real). The A fragment of a k-slice is one ldmatrix.x4 of the
//          tokens' 16-byte key rows: lane (gq, tq) receives pair tq / tq + 4 of the slice as (re, im) fp16, rotates
//          it in fp32 by the token's angle and packs it back (cvt.rn.f16x2): the rotated, dequantized key is never
//          stored, and one tile of keys serves all G query heads (the query rows are the B operand, in coding
//          order, scaled by scale * log2(e) * attention_scaling).
//   angle  theta = fl(p * w) in fp32 exactly as Hugging Face computes it (p the slot, w = inv_freq of the pair), then
//          cos / sin by a 3-constant Cody-Waite reduction to [-pi/4, pi/4] with FMAs (exact for theta < 2^24: the
//          first step's difference is representable) and the Cephes minimax polynomials: |error| ~1e-7, no
//          transcendental unit, no libdevice slow path (libdevice leaves its fast path above ~1.05e5 rad).
//   softmax per warp, base 2, lazy running max (raised only when a logit exceeds it by > 8).
//   values as coded_decode.cu's antkv_coded_warp: p through per-warp shared memory into B fragments,
//          ldmatrix.x4.trans of the value centroids of 16 tokens x 16 dims, mma.m16n8k16, fp32 accumulators.
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

// value MMA operand type follows the value centroids (bf16 for bf16, else fp16), as coded_decode.cu
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

// Byte offset of value chunk ch of centroid (sub-space sv, code k): coded_decode.cu's vchunk_off with one copy (the
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
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned char* s_key = smem;                                                   // SK * MK * SUBK * 2
    unsigned char* s_cent = s_key + SK * MK * SUBK * 2;                            // CV * MV * SUBV * 2
    half_t* s_p0 = reinterpret_cast<half_t*>(smem + TABB);  // [NWARP][8][32] (TABB >= tables, >= the epilogue's)
    u8* s_vc0 = reinterpret_cast<u8*>(s_p0 + NWARP * 8 * 32);                      // [NWARP][32][CV]
    float* s_red = reinterpret_cast<float*>(s_vc0 + NWARP * 32 * CV);              // [NWARP][8] max, [NWARP][8] sum

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
    // B fragments of the query (fp16): k-slice ks, column n = gq = query row r (g = r / TQ, t = r % TQ); b0 = coding
    // pair 8 ks + tq as (re, im) = (q[j], q[j + D/2]), b1 = pair 8 ks + 4 + tq. Frequencies of the lane's pairs.
    unsigned qb[NKS][2];
    float wf[NKS][2];
    {
        const int* pj = pairs_k + (size_t)hk * (D / 2);
        const float* fj = freq_k + (size_t)hk * (D / 2);
        const int r = gq, g = r / TQ, t = r % TQ;
        const size_t qoff = (size_t)b * s_qb + (size_t)(h * (RV / TQ) + g) * s_qh + (size_t)t * s_qt;
#pragma unroll
        for (int ks = 0; ks < NKS; ++ks)
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int c = 8 * ks + 4 * u + tq;
                wf[ks][u] = fj[c];
                float re = 0.f, im = 0.f;
                if (r < RV) {
                    const int j = pj[c];
                    re = to_f32<QT>(q, qoff + j) * qk_scale;
                    im = to_f32<QT>(q, qoff + j + D / 2) * qk_scale;
                }
                qb[ks][u] = f2_to_h2(re, im);
            }
    }

    const u8* ck_base = codes_k + (size_t)pair * n_cap * CK;
    const u8* cv_base = codes_v + (size_t)pair * n_cap * CV;
    const int* bits_base = bits + (size_t)pair * nw;
    half_t* s_p = s_p0 + warp * 8 * 32;
    u8* s_vc = s_vc0 + warp * 32 * CV;
    const unsigned s_key_addr = (unsigned)__cvta_generic_to_shared(s_key);
    const unsigned s_cent_addr = (unsigned)__cvta_generic_to_shared(s_cent);
    // ldmatrix roles. keys (non-trans): matrix i = lane / 8: tokens (lane & 7) + 8 (i & 1) of the M-group, 8-dim
    // chunk 2 ks + (i >> 1). values (trans): tokens (lane & 7) + 8 (lane >> 4), half hf = (lane >> 3) & 1.
    const int krow = (lane & 7) + (((lane >> 3) & 1) << 3), khalf = lane >> 4;
    const int ltok = (lane & 7) + ((lane >> 4) << 3), hf = (lane >> 3) & 1;

    float mlo = NEG_INF, mhi = NEG_INF;  // running max of rows 2 tq, 2 tq + 1 (warp-uniform per tq)
    float llo = 0.f, lhi = 0.f;          // this lane's share of their sums
    float acc[D / 16][4];                // value D fragments: dims (mt 16 + gq, + 8) x rows (2 tq, 2 tq + 1)
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;

    // codes of the first tile: key codes of tokens krow and 16 + krow (lane), value codes of token lane, anchor word
    const int stride = 32 * NWARP;
    int t0 = start + 32 * warp;
    typename KW::T kc0 = KW::zero(), kc1 = KW::zero();
    typename VW::T vcw = VW::zero();
    int word = 0;
    auto load_tile = [&](int tt, typename KW::T& a0, typename KW::T& a1, typename VW::T& v, int& wd) {
        a0 = KW::zero(); a1 = KW::zero(); v = VW::zero(); wd = -1;
        if (tt < end) {
            if (tt + krow < end) a0 = *reinterpret_cast<const typename KW::T*>(ck_base + (size_t)(tt + krow) * CK);
            if (tt + 16 + krow < end)
                a1 = *reinterpret_cast<const typename KW::T*>(ck_base + (size_t)(tt + 16 + krow) * CK);
            if (tt + lane < end) v = *reinterpret_cast<const typename VW::T*>(cv_base + (size_t)(tt + lane) * CV);
            wd = bits_base[tt >> 5];
        }
    };
    load_tile(t0, kc0, kc1, vcw, word);
    __syncthreads();  // tables ready

    for (; t0 < end; t0 += stride) {
        const typename KW::T c0 = kc0, c1 = kc1;
        const int wcur = word;
        *reinterpret_cast<typename VW::T*>(s_vc + lane * CV) = vcw;
        load_tile(t0 + stride, kc0, kc1, vcw, word);  // prefetch the next tile

        // -------------------------------------------------------------------- logits [2 M-groups][4]
        float lg[2][4];
#pragma unroll
        for (int m = 0; m < 2; ++m) {
            lg[m][0] = lg[m][1] = lg[m][2] = lg[m][3] = 0.f;
            const typename KW::T& cw = m ? c1 : c0;
            const float p_lo = (float)(t0 + 16 * m + gq), p_hi = p_lo + 8.f;  // slots of rows gq, gq + 8 (exact)
#pragma unroll
            for (int ks = 0; ks < NKS; ++ks) {
                // this lane's ldmatrix row: (token krow, 8-dim chunk ch = 2 ks + khalf) of sub-space ch / KCH
                const int ch = 2 * ks + khalf;
                unsigned code;
                if (KCH == 1) {
                    const unsigned ca = code_of<KW>(cw, 2 * ks), cb = code_of<KW>(cw, 2 * ks + 1);
                    code = khalf ? cb : ca;
                } else {
                    code = code_of<KW>(cw, ks);
                }
                const int sub = ch / KCH, part = ch % KCH;
                const unsigned addr = s_key_addr + (((unsigned)(sub * MK) + code) * KCH + part) * 16u;
                unsigned a[4];
                ldsm_x4(addr, a[0], a[1], a[2], a[3]);
                // a[i]: (re, im) of pair 8 ks + 4 (i >> 1) + tq for token gq + 8 (i & 1)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float pf = (i & 1) ? p_hi : p_lo;
                    float cs, sn;
                    cos_sin(pf * wf[ks][i >> 1], cs, sn);  // fl(p * w): HF's fp32 angle
                    const float2 k = h2_to_f2(a[i]);
                    a[i] = f2_to_h2(k.x * cs - k.y * sn, k.y * cs + k.x * sn);
                }
                mma_k(lg[m], a[0], a[1], a[2], a[3], qb[ks][0], qb[ks][1]);
            }
            // mask: anchors and tokens past the end (rows gq, gq + 8 of group m)
            const int d0 = 16 * m + gq, d1 = d0 + 8;
            const bool k0 = t0 + d0 < end && !((wcur >> d0) & 1), k1 = t0 + d1 < end && !((wcur >> d1) & 1);
            if (!k0) lg[m][0] = lg[m][1] = NEG_INF;
            if (!k1) lg[m][2] = lg[m][3] = NEG_INF;
        }
        // -------------------------------------------------------------------- lazy running max (rows 2tq, 2tq+1)
        {
            const float xlo = fmaxf(fmaxf(lg[0][0], lg[0][2]), fmaxf(lg[1][0], lg[1][2]));
            const float xhi = fmaxf(fmaxf(lg[0][1], lg[0][3]), fmaxf(lg[1][1], lg[1][3]));
            const bool up = xlo > mlo + LAZY || xhi > mhi + LAZY;
            if (__any_sync(0xffffffffu, up)) {
                const float nlo = fmaxf(mlo, warp_max8(xlo)), nhi = fmaxf(mhi, warp_max8(xhi));
                const float alo = nlo == NEG_INF ? 1.f : exp2f(mlo - nlo);
                const float ahi = nhi == NEG_INF ? 1.f : exp2f(mhi - nhi);
                mlo = nlo; mhi = nhi;
                llo *= alo; lhi *= ahi;
#pragma unroll
                for (int mt = 0; mt < D / 16; ++mt) {
                    acc[mt][0] *= alo; acc[mt][1] *= ahi; acc[mt][2] *= alo; acc[mt][3] *= ahi;
                }
            }
        }
        {
            const float ulo = mlo == NEG_INF ? 0.f : mlo, uhi = mhi == NEG_INF ? 0.f : mhi;
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                const float p00 = exp2f(lg[m][0] - ulo), p01 = exp2f(lg[m][1] - uhi);
                const float p10 = exp2f(lg[m][2] - ulo), p11 = exp2f(lg[m][3] - uhi);
                llo += p00 + p10; lhi += p01 + p11;
                const int d0 = 16 * m + gq;
                s_p[(2 * tq) * 32 + d0] = to_vhalf(p00);
                s_p[(2 * tq + 1) * 32 + d0] = to_vhalf(p01);
                s_p[(2 * tq) * 32 + d0 + 8] = to_vhalf(p10);
                s_p[(2 * tq + 1) * 32 + d0 + 8] = to_vhalf(p11);
            }
        }
        __syncwarp();
        // -------------------------------------------------------------------- values: 2 steps of 16 tokens
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            const unsigned b0 = *reinterpret_cast<const unsigned*>(s_p + gq * 32 + ks * 16 + 2 * tq);
            const unsigned b1 = *reinterpret_cast<const unsigned*>(s_p + gq * 32 + ks * 16 + 2 * tq + 8);
            const typename VW::T cw = *reinterpret_cast<const typename VW::T*>(s_vc + (ks * 16 + ltok) * CV);
#pragma unroll
            for (int mt = 0; mt < D / 16; ++mt) {
                const int sv = SUBV == 8 ? 2 * mt + hf : mt;
                const int ch = SUBV == 8 ? 0 : hf;
                const unsigned k = code_of<VW>(cw, sv);
                unsigned a0, a1, a2, a3;
                ldsm_x4_t(s_cent_addr + vchunk_off(sv, k, ch), a0, a1, a2, a3);
                mma_v(acc[mt], a0, a1, a2, a3, b0, b1);
            }
        }
        __syncwarp();  // s_p / s_vc are rewritten by the next tile
    }

    // ------------------------------------------------------------------------ merge the warps, store the partial
    __syncthreads();  // every warp done with the tables (the reduction overwrites them)
    llo = warp_sum8(llo); lhi = warp_sum8(lhi);
    float* s_mx = s_red;               // [NWARP][8]
    float* s_l = s_red + NWARP * 8;    // [NWARP][8]
    if (gq == 0) { s_mx[warp * 8 + 2 * tq] = mlo; s_mx[warp * 8 + 2 * tq + 1] = mhi; }
    __syncthreads();
    float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll 4
    for (int w = 0; w < NWARP; ++w) {
        mx_lo = fmaxf(mx_lo, s_mx[w * 8 + 2 * tq]);
        mx_hi = fmaxf(mx_hi, s_mx[w * 8 + 2 * tq + 1]);
    }
    const float sclo = mlo == NEG_INF ? 0.f : exp2f(mlo - mx_lo), schi = mhi == NEG_INF ? 0.f : exp2f(mhi - mx_hi);
    if (gq == 0) { s_l[warp * 8 + 2 * tq] = llo * sclo; s_l[warp * 8 + 2 * tq + 1] = lhi * schi; }
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

// Test probe (tests/test_cuda.py): cos / sin of fl(pos[i / nw] * w[i % nw]) as the kernel computes them.
extern "C" __global__ void antkv_rope_cos_sin_probe(const float* __restrict__ pos, const float* __restrict__ w,
                                                   float* __restrict__ out, int n, int nw)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n * nw) {
        float c, s;
        cos_sin(pos[i / nw] * w[i % nw], c, s);
        out[2 * i] = c;
        out[2 * i + 1] = s;
    }
}
