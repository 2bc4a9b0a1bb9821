// Coded part of AnTKV decode attention, CUDA C++ (compiled at run time by NVRTC, see coded_decode_cuda.py).
//
// Why not Triton: the split loop needs two random 16-byte table reads per (token, sub-space) -- the key
// lookup-table row LUT[c][code] (4 query rows) and the value centroid -- and Triton 3.6 can only
// gather through global memory (L1), which measured ~37 SM-clocks per token at 1 bit (NOTES.md "Coded decode, Triton").
// Here both tables of one (sequence, KV head) sit in shared memory.
//
// One CTA = one coded chunk of one (sequence, KV head) pair, tokens [start, end) of that sequence's coded
// tokens; each warp runs its own flash-decoding loop over 32-token tiles (antkv_coded_warp below). At the end
// the warps' partials are merged and stored in the layout of the Triton kernel (normalized output,
// log2-sum-exp), then the pair's arrival counter is bumped so that the Triton exact/merge kernel launched after
// this one merges all P partials. (A CTA-wide block kernel with DB / MMA / FMA modes and an fp32 key table were
// measured and removed; NOTES.md "Coded decode, CUDA C++ (post-RoPE LUT)", git history.)
//
// Compile-time constants (defined by the launcher): CK, MK (key codes per token, centroids per key
// sub-space), CV, MV, SUBV (value codes per token, centroids, sub-space dimension), NT (threads), MINB (CTAs per
// SM for __launch_bounds__), CT (centroid storage: 0 fp16, 1 bf16, 2 fp32), RPAD (rows per partial slot).
#define DD (CV * SUBV)
#define NWARP (NT / 32)
#define NEG_INF (__int_as_float(0xff800000))

typedef unsigned char u8;
#if CT == 2
typedef float ct_t;
#else
typedef unsigned short ct_t;
#endif

// A stored table element to fp32; C: 0 fp16 bits, 1 bf16 bits, 2 fp32 (the value centroids' CT, the keys' CTK)
template <int C, typename T>
__device__ __forceinline__ float stored_to_f32(T x) {
    if constexpr (C == 0) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)x));
        return f;
    } else if constexpr (C == 1) {
        return __uint_as_float(((unsigned)x) << 16);
    } else {
        return (float)x;
    }
}

__device__ __forceinline__ float ct_to_f32(ct_t x) { return stored_to_f32<CT>(x); }

#if CT == 1
#define CVT_HALF "cvt.rn.bf16.f32 %0, %1;"  // the MMA operand type follows the centroids: bf16
#define MMA_TYPES "bf16.bf16"
#else
#define CVT_HALF "cvt.rn.f16.f32 %0, %1;"  // fp16 (fp32 centroids are stored as fp16)
#define MMA_TYPES "f16.f16"
#endif
typedef unsigned short half_t;  // 16-bit MMA operand bits

__device__ __forceinline__ half_t to_half(float f) {
    unsigned short h;
    asm(CVT_HALF : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ void mma16816(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPES ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// CK / CV code bytes of one token as 16- or 8-byte words (the launcher only builds CK, CV in {8, 16}).
template <int C> struct CodeWords;
template <> struct CodeWords<16> {
    typedef uint4 T;
    static __device__ __forceinline__ unsigned get(const T& w, int c) {
        unsigned x = c < 4 ? w.x : c < 8 ? w.y : c < 12 ? w.z : w.w;
        return (x >> (8 * (c & 3))) & 255u;
    }
    static __device__ __forceinline__ T zero() { return make_uint4(0u, 0u, 0u, 0u); }
    static __device__ __forceinline__ unsigned word(const T& w, int i) {
        return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
    }
    // byte i of the result = byte (i + q) % 16 of w, q < 16
    static __device__ __forceinline__ T rotate(const T& w, int q) {
        const bool s2 = q & 8, s1 = q & 4;
        const unsigned a = s2 ? w.z : w.x, b = s2 ? w.w : w.y, c = s2 ? w.x : w.z, d = s2 ? w.y : w.w;
        const unsigned x = s1 ? b : a, y = s1 ? c : b, z = s1 ? d : c, u = s1 ? a : d;
        const unsigned sh = 8u * (q & 3);
        return make_uint4(__funnelshift_r(x, y, sh), __funnelshift_r(y, z, sh), __funnelshift_r(z, u, sh),
                          __funnelshift_r(u, x, sh));
    }
};
template <> struct CodeWords<8> {
    typedef uint2 T;
    static __device__ __forceinline__ unsigned get(const T& w, int c) {
        unsigned x = c < 4 ? w.x : w.y;
        return (x >> (8 * (c & 3))) & 255u;
    }
    static __device__ __forceinline__ T zero() { return make_uint2(0u, 0u); }
    static __device__ __forceinline__ unsigned word(const T& w, int i) { return i == 0 ? w.x : w.y; }
    // byte i of the result = byte (i + q) % 8 of w, q < 8
    static __device__ __forceinline__ T rotate(const T& w, int q) {
        const bool s = q >= 4;
        const unsigned x = s ? w.y : w.x, y = s ? w.x : w.y;
        const unsigned sh = 8u * (q & 3);
        return make_uint2(__funnelshift_r(x, y, sh), __funnelshift_r(y, x, sh));
    }
};

// Tokens [start, end) of coded chunk cidx of p_coded over a sequence's n coded tokens (chunks of whole 64-token
// groups, so 32-token tiles never straddle an anchor-bitmask word).
__device__ __forceinline__ void chunk_range(int n, int p_coded, int cidx, int& start, int& end) {
    const int chunk = (((n + p_coded - 1) / p_coded) + 63) & ~63;
    start = min(cidx * chunk, n);
    end = min(start + chunk, n);
}

// Logits (4 rows, log2 units) of one token: bias + the CK key-table rows of its codes, from the fp16 key table:
// an entry is 8 bytes (4 rows), a code's row KROW = 16 entries = 128 bytes (all 32 banks) holding 16 / CK copies
// of its CK entries; the 16 lanes of a half-warp (one 8-byte access phase) read rotation rot = lane % CK of copy
// kofs / CK, i.e. 16 different bank pairs.
#define KROW 16
__device__ __forceinline__ float2 h2_to_f2(unsigned x) {
    float2 r;
    asm("{.reg .f16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\tcvt.f32.f16 %0, lo;\n\tcvt.f32.f16 %1, hi;}"
        : "=f"(r.x), "=f"(r.y) : "r"(x));
    return r;
}
__device__ __forceinline__ unsigned f2_to_h2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <typename KW>
__device__ __forceinline__ float4 token_logits_h(const uint2* s_lut, const typename KW::T& kc, int rot, int kofs,
                                                 float4 bias) {
    const typename KW::T kr = KW::rotate(kc, rot);  // byte i: the code of sub-space (i + rot) % CK
#pragma unroll
    for (int i = 0; i < CK; ++i) {
        const uint2 v = s_lut[KW::get(kr, i) * KROW + kofs + ((i + rot) & (CK - 1))];
        const float2 a = h2_to_f2(v.x), b = h2_to_f2(v.y);
        bias.x += a.x; bias.y += a.y; bias.z += b.x; bias.w += b.y;
    }
    return bias;
}

// The codes and anchor word of token t (zero value codes past the end: their p is 0, their table reads stay valid).
template <typename KW, typename VW>
__device__ __forceinline__ void load_token(int t, int end, const u8* ck_base, const u8* cv_base, const int* bits_base,
                                           typename KW::T& kc, typename VW::T& vcw, int& word) {
    if (t < end) {
        kc = *reinterpret_cast<const typename KW::T*>(ck_base + (size_t)t * CK);
        vcw = *reinterpret_cast<const typename VW::T*>(cv_base + (size_t)t * CV);
        word = bits_base[t >> 5];
    } else {
        vcw = VW::zero();
    }
}

// The value-copy selection word of token t (v8, see antkv_coded_warp): bit sv = the copy its sub-space sv row reads;
// without a selection array, row i of a phase (token parity i % 2) reads copy i % 2.
__device__ __forceinline__ unsigned load_sel(int t, int end, const unsigned short* sel_base) {
    if (sel_base != nullptr) return t < end ? (unsigned)sel_base[t] : 0u;
    return (t & 1) ? 0xffffu : 0u;
}

// Epilogue: sum the NWARP per-warp accumulators s_acc [NWARP][4][DD] and sums s_l [NWARP] (already on the common
// maxima mx), store the normalized partial and its log2-sum-exp in this chunk's slot, then count the arrival.
__device__ __forceinline__ void store_partial(const float* s_acc, const float4* s_l, const float mx[4], float* po,
                                              float* pl, int* cnt, int pair, int cidx, int ps, int rv, int tid) {
    float lsum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < NWARP; ++w) {
        const float4 v = s_l[w];
        lsum[0] += v.x; lsum[1] += v.y; lsum[2] += v.z; lsum[3] += v.w;
    }
    const size_t slot = ((size_t)pair * ps + cidx) * RPAD;
    for (int o = tid; o < 4 * DD; o += NT) {
        const int r = o / DD, d = o % DD;
        if (r < rv) {
            float v = 0.f;
#pragma unroll 4
            for (int w = 0; w < NWARP; ++w) v += s_acc[(w * 4 + r) * DD + d];
            const float l = lsum[r];
            po[(slot + r) * DD + d] = l > 0.f ? v / l : 0.f;
            if (d == 0) pl[slot + r] = l > 0.f ? mx[r] + log2f(l) : NEG_INF;
        }
    }
    __syncthreads();
    if (tid == 0) {
        __threadfence();
        atomicAdd(cnt + pair, 1);
    }
}

// =====================================================================================================================
// antkv_coded_warp: each warp an independent flash-decoding loop over its own 32-token tiles (NOTES.md "Coded
// decode, CUDA C++ (post-RoPE LUT)"):
// - no CTA-wide max and no __syncthreads in the loop: each warp keeps its own running max, raised lazily (only
//   when a logit exceeds it by more than LAZY, log2 units, so p <= 2^LAZY), and the warps' partials are merged in
//   the epilogue with their own maxima;
// - values on tensor cores, the A operand loaded by ldmatrix.trans: a lane gives the address of one
//   (token, sub-space) centroid row of 8 dimensions, so a 16-token x 16-dimension tile is one LDSM + one HMMA;
// - the value table is kept in NCOPY copies (defined by the launcher as large as shared memory allows): row i of an
//   ldmatrix phase reads copy i % NCOPY, and copy c lives in its own 8 / NCOPY bank groups, so rows can only
//   conflict with rows of their own copy (NCOPY 8: never). fp32 centroids are stored as fp16 here.
// - SEL 2 (NCOPY 2 only, NOTES.md "Value-copy selection words"): which copy a row reads is chosen per (token,
//   value sub-space) by a selection word written when the codes are (vsel [pairs, n_cap], bit sv; value_copies.py), the writer picking
//   for every aligned group of 8 tokens (one ldmatrix phase) the assignment with the fewest wavefronts; both copies
//   hash a code by k % 4 (copy 1 is copy 0 shifted by 4 groups): 2.07 expected wavefronts per phase instead of 2.39
//   for the fixed i % 2. vsel may be null: then row i reads copy i % 2. SEL 0: row i reads copy i % NCOPY.
// Extra constants: NCOPY (1, 2, 4 or 8), SEL (0 or 2), SK / SUBK / CTK (the key centroids, below); SUBV in {8, 16}.
#ifndef NCOPY
#define NCOPY 1
#endif
#define GPC (8 / NCOPY)  // bank groups (16 bytes each) per copy
#ifndef SEL
#define SEL 0
#endif
#define LAZY 8.0f
#define NCH16 (SUBV / 8)  // 16-byte chunks per centroid, 16-bit storage

// Byte offset in shared memory of chunk ch of centroid (sub-space sv, code k), copy c: the 8 * CV * NCH16 / GPC
// chunks of code k hold its CV * NCH16 chunks in each copy, chunk j of the row in bank group c * GPC +
// ((j ^ k) % GPC), so the rows of one ldmatrix phase (same sv and ch, random k) spread over their copy's GPC groups
// (value_copies.bins models it).
__device__ __forceinline__ unsigned vchunk_off(int sv, unsigned k, int ch, int c) {
    const unsigned j = sv * NCH16 + ch;
    return 16u * (k * (8 * CV * NCH16 / GPC) + ((j / GPC) << 3) + c * GPC + ((j ^ k) & (GPC - 1)));
}

// Key centroids (the kernel builds the key lookup table itself, in fp16: see token_logits_h): CTK 0 fp16, 1 bf16,
// 2 fp32; SK sub-spaces of SUBK dimensions per stage (CK = stages * SK codes per token), DK = SK * SUBK.
#ifndef CTK
#define CTK 0
#endif
#define LUT_BYTES (MK * KROW * 8)
#define DK (SK * SUBK)
#if CTK == 2
typedef float ck_t;
#else
typedef unsigned short ck_t;
#endif

__device__ __forceinline__ float ck_to_f32(ck_t x) { return stored_to_f32<CTK>(x); }

__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned& a0, unsigned& a1, unsigned& a2, unsigned& a3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3)
                 : "r"(addr));
}

extern "C" __global__ void __launch_bounds__(NT, MINB)
antkv_coded_warp(const ck_t* __restrict__ cent_k, const float* __restrict__ qc, const u8* __restrict__ codes_k,
                 const u8* __restrict__ codes_v, const int* __restrict__ bits, const int* __restrict__ ncoded,
                 const ct_t* __restrict__ cent_v, float* __restrict__ po, float* __restrict__ pl,
                 int* __restrict__ cnt, int hkv, int n_cap, int nw, int p_coded, int ps, int cbv_per_head, int rv,
                 int hcb_k, int cbk_per_head, const unsigned short* __restrict__ vsel)
{
    typedef CodeWords<CK> KW;
    typedef CodeWords<CV> VW;
    extern __shared__ __align__(16) unsigned char smem[];
    uint2* s_luth = reinterpret_cast<uint2*>(smem);                                    // [MK][KROW]
    unsigned char* s_cent = smem + LUT_BYTES;                                          // NCOPY * CV * MV * SUBV * 2
    half_t* s_p0 = reinterpret_cast<half_t*>(s_cent + NCOPY * CV * MV * SUBV * 2);    // [NWARP][4][32]
    u8* s_vc0 = reinterpret_cast<u8*>(s_p0 + NWARP * 4 * 32);                        // [NWARP][32][CV]
    float4* s_red = reinterpret_cast<float4*>(s_vc0 + NWARP * 32 * CV);               // [2][NWARP]

    const int pair = blockIdx.x, cidx = blockIdx.y;
    const int b = pair / hkv, h = pair % hkv;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int start, end;
    chunk_range(ncoded[b], p_coded, cidx, start, end);

    {
        // key lookup table of this pair: LUT[code][c] (4 rows) = q'_r[s * SUBK:(s + 1) * SUBK] . centroid[st][s][code]
        // with c = st * SK + s (the Triton _decode_lut_kernel's table, built here: no table round trip via HBM)
        float4* s_q = reinterpret_cast<float4*>(s_vc0);  // [DK] rows 0-3 of q' (scale * log2 e inside)
        const float* qc_p = qc + (size_t)pair * RPAD * (DD + 1);
        for (int d = tid; d < DK; d += NT)
            s_q[d] = make_float4(qc_p[d], qc_p[DK + d], qc_p[2 * DK + d], qc_p[3 * DK + d]);
        __syncthreads();
        for (int i = tid; i < CK * MK; i += NT) {
            const int c = i / MK, code = i % MK, st = c / SK, sk = c % SK;
            const ck_t* cp = cent_k + ((size_t)((st * hcb_k + h * cbk_per_head) * SK + sk) * MK + code) * SUBK;
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int e0 = 0; e0 < SUBK; e0 += 16 / (int)sizeof(ck_t)) {
                const uint4 raw = *reinterpret_cast<const uint4*>(cp + e0);
                const ck_t* x = reinterpret_cast<const ck_t*>(&raw);
#pragma unroll
                for (int e = 0; e < 16 / (int)sizeof(ck_t); ++e) {
                    const float f = ck_to_f32(x[e]);
                    const float4 qv = s_q[sk * SUBK + e0 + e];
                    a.x += qv.x * f; a.y += qv.y * f; a.z += qv.z * f; a.w += qv.w * f;
                }
            }
            const uint2 hv = make_uint2(f2_to_h2(a.x, a.y), f2_to_h2(a.z, a.w));
#pragma unroll
            for (int kc = 0; kc < KROW / CK; ++kc) s_luth[code * KROW + kc * CK + c] = hv;
        }
        const ct_t* g_cent = cent_v + (size_t)(h * cbv_per_head) * CV * MV * SUBV;
        uint4* s_c4 = reinterpret_cast<uint4*>(s_cent);
        for (int i = tid; i < CV * MV * NCH16; i += NT) {  // i = (sv * MV + k) * NCH16 + ch
            const int ch = i % NCH16, k = (i / NCH16) % MV, sv = i / (NCH16 * MV);
            uint4 v;
#if CT == 2
            const float4 f0 = reinterpret_cast<const float4*>(g_cent)[2 * i];
            const float4 f1 = reinterpret_cast<const float4*>(g_cent)[2 * i + 1];
            v.x = to_half(f0.x) | ((unsigned)to_half(f0.y) << 16); v.y = to_half(f0.z) | ((unsigned)to_half(f0.w) << 16);
            v.z = to_half(f1.x) | ((unsigned)to_half(f1.y) << 16); v.w = to_half(f1.z) | ((unsigned)to_half(f1.w) << 16);
#else
            v = reinterpret_cast<const uint4*>(g_cent)[i];
#endif
#pragma unroll
            for (int c = 0; c < NCOPY; ++c) s_c4[vchunk_off(sv, (unsigned)k, ch, c) / 16] = v;
        }
    }
    const float* bias_p = qc + (size_t)pair * RPAD * (DD + 1) + RPAD * DD;
    const float4 bias = make_float4(bias_p[0], bias_p[1], bias_p[2], bias_p[3]);
    const u8* ck_base = codes_k + (size_t)pair * n_cap * CK;
    const u8* cv_base = codes_v + (size_t)pair * n_cap * CV;
    const int* bits_base = bits + (size_t)pair * nw;
#if SEL
    const unsigned short* sel_base = vsel == nullptr ? nullptr : vsel + (size_t)pair * n_cap;
#endif
    half_t* s_p = s_p0 + warp * 4 * 32;
    u8* s_vc = s_vc0 + warp * 32 * CV;
    const int rot = lane & (CK - 1);
    const int kofs = ((lane >> 3) & (KROW / CK - 1)) * CK;  // which copy of the code's entries
    const int gq = lane >> 2, tq = lane & 3;
    // ldmatrix role: row (lane & 7) of matrix (lane >> 3): tokens (lane & 7) + 8 (lane >> 4), half hf of the tile
    const int ltok = (lane & 7) + ((lane >> 4) << 3), hf = (lane >> 3) & 1;
#if !SEL
    const int copy = lane & (NCOPY - 1);
#endif
    const unsigned s_cent_addr = (unsigned)__cvta_generic_to_shared(s_cent);

    float m0 = NEG_INF, m1 = NEG_INF, m2 = NEG_INF, m3 = NEG_INF;  // this warp's running max per row
    float l0 = 0.f, l1 = 0.f, l2 = 0.f, l3 = 0.f;                  // this lane's share of the sums
    float acc[DD / 16][4];  // D fragments: tile mt, dims (mt*16 + gq, + 8) x rows (2 tq, 2 tq + 1)
#pragma unroll
    for (int mt = 0; mt < DD / 16; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;

    const int stride = 32 * NWARP;
    int t = start + 32 * warp + lane;
    typename KW::T kc = KW::zero();
    typename VW::T vcw = VW::zero();
    int word = 0;
    load_token<KW, VW>(t, end, ck_base, cv_base, bits_base, kc, vcw, word);
#if SEL
    unsigned selw = load_sel(t, end, sel_base);
#endif
    __syncthreads();  // tables ready

    for (int t0 = start + 32 * warp; t0 < end; t0 += stride, t += stride) {
        // ------------------------------------------------------------ logits of this lane's token
        float4 lg = make_float4(NEG_INF, NEG_INF, NEG_INF, NEG_INF);
        if (t < end && !((word >> lane) & 1))
            lg = token_logits_h<KW>(s_luth, kc, rot, kofs, bias);
        *reinterpret_cast<typename VW::T*>(s_vc + lane * CV) = vcw;
#if SEL
        const unsigned tile_sel = selw;
        selw = load_sel(t + stride, end, sel_base);
#endif
        load_token<KW, VW>(t + stride, end, ck_base, cv_base, bits_base, kc, vcw, word);
        // ------------------------------------------------------------ lazy running max (warp-uniform branch)
        const bool up = lg.x > m0 + LAZY || lg.y > m1 + LAZY || lg.z > m2 + LAZY || lg.w > m3 + LAZY;
        if (__any_sync(0xffffffffu, up)) {
            const float n0 = fmaxf(m0, warp_max(lg.x)), n1 = fmaxf(m1, warp_max(lg.y));
            const float n2 = fmaxf(m2, warp_max(lg.z)), n3 = fmaxf(m3, warp_max(lg.w));
            const float a0 = n0 == NEG_INF ? 1.f : exp2f(m0 - n0), a1 = n1 == NEG_INF ? 1.f : exp2f(m1 - n1);
            const float a2 = n2 == NEG_INF ? 1.f : exp2f(m2 - n2), a3 = n3 == NEG_INF ? 1.f : exp2f(m3 - n3);
            m0 = n0; m1 = n1; m2 = n2; m3 = n3;
            l0 *= a0; l1 *= a1; l2 *= a2; l3 *= a3;
            const float alo = tq == 0 ? a0 : tq == 1 ? a2 : 1.f;  // row 2 tq
            const float ahi = tq == 0 ? a1 : tq == 1 ? a3 : 1.f;  // row 2 tq + 1
#pragma unroll
            for (int mt = 0; mt < DD / 16; ++mt) {
                acc[mt][0] *= alo; acc[mt][1] *= ahi; acc[mt][2] *= alo; acc[mt][3] *= ahi;
            }
        }
        {
            const float p0 = exp2f(lg.x - (m0 == NEG_INF ? 0.f : m0)), p1 = exp2f(lg.y - (m1 == NEG_INF ? 0.f : m1));
            const float p2 = exp2f(lg.z - (m2 == NEG_INF ? 0.f : m2)), p3 = exp2f(lg.w - (m3 == NEG_INF ? 0.f : m3));
            l0 += p0; l1 += p1; l2 += p2; l3 += p3;
            s_p[lane] = to_half(p0); s_p[32 + lane] = to_half(p1);
            s_p[64 + lane] = to_half(p2); s_p[96 + lane] = to_half(p3);
        }
        __syncwarp();
        // ------------------------------------------------------------ values: 2 steps of 16 tokens on tensor cores
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            unsigned b0 = 0u, b1 = 0u;
            if (gq < 4) {
                b0 = *reinterpret_cast<const unsigned*>(s_p + gq * 32 + ks * 16 + 2 * tq);
                b1 = *reinterpret_cast<const unsigned*>(s_p + gq * 32 + ks * 16 + 2 * tq + 8);
            }
            const typename VW::T cw = *reinterpret_cast<const typename VW::T*>(s_vc + (ks * 16 + ltok) * CV);
#if SEL
            // my ldmatrix row's word, shifted so that bit 2 mt is its sub-space's copy
            const unsigned rsel = __shfl_sync(0xffffffffu, tile_sel, ks * 16 + ltok) >> (SUBV == 8 ? hf : 0);
#endif
#pragma unroll
            for (int mt = 0; mt < DD / 16; ++mt) {
                const int sv = SUBV == 8 ? 2 * mt + hf : mt;
                const int ch = SUBV == 8 ? 0 : hf;
                const unsigned k = (VW::word(cw, sv >> 2) >> (8 * (sv & 3))) & 255u;
#if SEL  // copy 1 = copy 0 + GPC groups
                const unsigned off = vchunk_off(sv, k, ch, 0) + ((rsel >> (SUBV == 8 ? 2 * mt : mt)) & 1u) * (16 * GPC);
#else
                const unsigned off = vchunk_off(sv, k, ch, copy);
#endif
                unsigned a0, a1, a2, a3;
                ldsm_x4_t(s_cent_addr + off, a0, a1, a2, a3);
                mma16816(acc[mt], a0, a1, a2, a3, b0, b1);
            }
        }
        __syncwarp();  // s_p / s_vc are rewritten by the next tile
    }

    // ---------------------------------------------------------------- merge the warps, store the partial
    __syncthreads();  // every warp done with the tables (the reduction overwrites them)
    l0 = warp_sum(l0); l1 = warp_sum(l1); l2 = warp_sum(l2); l3 = warp_sum(l3);
    if (lane == 0) s_red[warp] = make_float4(m0, m1, m2, m3);
    __syncthreads();
    float mx[4] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF};
#pragma unroll
    for (int w = 0; w < NWARP; ++w) {
        const float4 v = s_red[w];
        mx[0] = fmaxf(mx[0], v.x); mx[1] = fmaxf(mx[1], v.y); mx[2] = fmaxf(mx[2], v.z); mx[3] = fmaxf(mx[3], v.w);
    }
    const float sc0 = m0 == NEG_INF ? 0.f : exp2f(m0 - mx[0]), sc1 = m1 == NEG_INF ? 0.f : exp2f(m1 - mx[1]);
    const float sc2 = m2 == NEG_INF ? 0.f : exp2f(m2 - mx[2]), sc3 = m3 == NEG_INF ? 0.f : exp2f(m3 - mx[3]);
    if (lane == 0) s_red[NWARP + warp] = make_float4(l0 * sc0, l1 * sc1, l2 * sc2, l3 * sc3);
    float* s_acc = reinterpret_cast<float*>(smem);  // [NWARP][4][DD], over the tables
    if (tq < 2) {
        const float slo = tq == 0 ? sc0 : sc2, shi = tq == 0 ? sc1 : sc3;
#pragma unroll
        for (int mt = 0; mt < DD / 16; ++mt) {
            const int d0 = mt * 16 + gq;
            s_acc[(warp * 4 + 2 * tq) * DD + d0] = acc[mt][0] * slo;
            s_acc[(warp * 4 + 2 * tq + 1) * DD + d0] = acc[mt][1] * shi;
            s_acc[(warp * 4 + 2 * tq) * DD + d0 + 8] = acc[mt][2] * slo;
            s_acc[(warp * 4 + 2 * tq + 1) * DD + d0 + 8] = acc[mt][3] * shi;
        }
    }
    __syncthreads();
    store_partial(s_acc, s_red + NWARP, mx, po, pl, cnt, pair, cidx, ps, rv, tid);
}
