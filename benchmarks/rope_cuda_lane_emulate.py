"""Lane-level Python emulation of antkv_rope_coded (kernels/rope_decode.cu) on the CPU: every lane's fragments,
ldmatrix / mma.m16n8k16 layouts, the s_rot producer / consumer offsets, the code bytes, the lazy softmax and the
warp merge, transcribed from the kernel, in exact float64 arithmetic (no fp16 rounding), against a direct
computation with the same factored angle fl(T w) + fl(d w). Checks the index logic, not the compiler or the device.

    python benchmarks/rope_cuda_lane_emulate.py [seed] [query scale: 0.3; e.g. 4 for large logits, lazy rescales mid-stream]

Prints, per configuration, the max |out - direct| and |lse - direct| of one CTA's partial (expect ~1e-15).
"""
import math
import sys

import numpy as np

QS = float(sys.argv[2]) if len(sys.argv) > 2 else 0.3
rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)


def run(D, SUBK, SUBV, RV, TQ, NWARP, n, start, end, anchors):
    SK = D // SUBK; CK = SK; MK = 256 if SUBK == 8 else 64; KCH = SUBK // 8
    CV = D // SUBV; MV = 256 if SUBV == 8 else 64; NCH16 = SUBV // 8
    NKS = D // 16
    table = rng.standard_normal((SK, MK, SUBK))
    centv = rng.standard_normal((CV, MV, SUBV))
    pairs = rng.permutation(D // 2)
    freq = 1.0 / 500000.0 ** (np.arange(0, D, 2) / D)
    freq = freq[pairs].astype(np.float32).astype(np.float64)
    q = rng.standard_normal((RV, D)) * QS
    ck = rng.integers(0, MK, (n, CK))
    cv = rng.integers(0, MV, (n, CV))
    bits = np.zeros((n + 31) // 32 + 2, dtype=np.int64)
    for a in anchors:
        bits[a >> 5] |= 1 << (a & 31)
    # ---- direct computation (factored angle) over tokens start..end-1
    logits = np.full((RV, n), -np.inf)
    for p in range(start, end):
        if (bits[p >> 5] >> (p & 31)) & 1:
            continue
        kc = np.concatenate([table[s, ck[p, s]] for s in range(SK)])  # coding dims
        re, im = kc[0::2], kc[1::2]
        T, d = p - p % 8, p % 8
        th = np.float32(T) * np.float32(1) * freq.astype(np.float32)  # fl(T w)
        th = (np.float32(T) * freq.astype(np.float32)).astype(np.float64)
        td = (np.float32(d) * freq.astype(np.float32)).astype(np.float64)
        ang = th + td
        kr, ki = re * np.cos(ang) - im * np.sin(ang), im * np.cos(ang) + re * np.sin(ang)
        for r in range(RV):
            logits[r, p] = (q[r, pairs] * kr + q[r, pairs + D // 2] * ki).sum()
    vals = np.stack([np.concatenate([centv[s, cv[p, s]] for s in range(CV)]) for p in range(n)])
    m = logits[:, start:end].max(1)
    pr = np.exp2(logits[:, start:end] - m[:, None])
    l = pr.sum(1)
    ref_o = pr @ vals[start:end] / l[:, None]
    ref_l = m + np.log2(l)

    # ---- lane-level emulation
    def code_of(words_bytes, c):
        return words_bytes[c]

    def ldsm(addr_rows, data_fn):  # addr_rows[lane] -> 8 halves; returns frag[i][lane] = (2 halves)
        out = np.zeros((4, 32, 2))
        for i in range(4):
            for lane in range(32):
                gq, tq = lane >> 2, lane & 3
                row = data_fn(addr_rows[8 * i + gq])
                out[i, lane] = row[2 * tq: 2 * tq + 2]
        return out

    def ldsm_t(addr_rows, data_fn):  # transposed: thread (gq,tq) gets (row 2tq, col gq), (row 2tq+1, col gq)
        out = np.zeros((4, 32, 2))
        for i in range(4):
            for lane in range(32):
                gq, tq = lane >> 2, lane & 3
                out[i, lane] = [data_fn(addr_rows[8 * i + 2 * tq])[gq], data_fn(addr_rows[8 * i + 2 * tq + 1])[gq]]
        return out

    def mma(a, b, c):  # a[4][32][2], b[2][32][2], c[32][4] -> A 16x16, B 16x8
        A = np.zeros((16, 16)); B = np.zeros((16, 8))
        for lane in range(32):
            gq, tq = lane >> 2, lane & 3
            A[gq, 2 * tq:2 * tq + 2] = a[0][lane]; A[gq + 8, 2 * tq:2 * tq + 2] = a[1][lane]
            A[gq, 2 * tq + 8:2 * tq + 10] = a[2][lane]; A[gq + 8, 2 * tq + 8:2 * tq + 10] = a[3][lane]
            B[2 * tq:2 * tq + 2, gq] = b[0][lane]; B[2 * tq + 8:2 * tq + 10, gq] = b[1][lane]
        C = A @ B
        out = c.copy()
        for lane in range(32):
            gq, tq = lane >> 2, lane & 3
            out[lane] += [C[gq, 2 * tq], C[gq, 2 * tq + 1], C[gq + 8, 2 * tq], C[gq + 8, 2 * tq + 1]]
        return out

    def rot(x, cs, ns):  # x.re * cs + x.im * ns
        return x[0] * np.asarray(cs) + x[1] * np.asarray(ns)

    # per lane constants
    qh = np.zeros((32, NKS, 2, 2)); kcs = np.zeros((32, NKS, 2, 2)); kns = np.zeros((32, NKS, 2, 2))
    for lane in range(32):
        gq, tq = lane >> 2, lane & 3
        for ks in range(NKS):
            for u in range(2):
                c = 8 * ks + 4 * u + tq
                if gq < RV:
                    qh[lane, ks, u] = [q[gq, pairs[c]], q[gq, pairs[c] + D // 2]]
                a = float(np.float32(gq) * np.float32(freq[c]))
                kcs[lane, ks, u] = [math.cos(a), math.sin(a)]
                kns[lane, ks, u] = [-math.sin(a), math.cos(a)]
    NPR = 4 * (D // 2) // 32
    NWP = D // 64 if D // 2 >= 32 else 1
    wstate = []
    for warp in range(NWARP):
        mrow = np.full(32, -np.inf); lrow = np.zeros(32); acc = np.zeros((D // 16, 32, 4))
        t0 = start + 32 * warp
        while t0 < end:
            wcur = bits[t0 >> 5]
            s_kc = np.array([ck[t0 + l] if t0 + l < end else np.zeros(CK, int) for l in range(32)])
            s_vc = np.array([cv[t0 + l] if t0 + l < end else np.zeros(CV, int) for l in range(32)])
            s_rot = np.zeros((4 * NKS * 4 * 2, 2, 2))  # 8-byte units: (CS, NS)
            for lane in range(32):
                wp = [freq[(lane + 32 * m_) % (D // 2)] for m_ in range(NWP)]
                for i in range(NPR):
                    e = lane + 32 * i; jg = e // (D // 2); c = e % (D // 2)
                    th = float(np.float32(t0 + 8 * jg) * np.float32(wp[i % NWP]))
                    cs_, sn = math.cos(th), math.sin(th)
                    off = ((jg * NKS + (c >> 3)) * 4 + (c & 3)) * 2 + ((c >> 2) & 1)
                    s_rot[off] = [[cs_, -sn], [sn, cs_]]
            lg = np.zeros((4, 32, 2))
            for jg in range(4):
                d4 = np.zeros((32, 4))
                for kk in range(NKS // 2):
                    rows = []
                    for lane in range(32):
                        krow, kmat = lane & 7, lane >> 3
                        cw = s_kc[8 * jg + krow]
                        sub0 = 4 * kk // KCH
                        sub = sub0 + kmat // KCH
                        code = cw[4 * (sub0 >> 2) + (sub0 & 3) + kmat // KCH]
                        rows.append(((sub * MK + code) * KCH + kmat % KCH))
                    a = ldsm(rows, lambda r: table.reshape(-1, 8)[r])
                    for hh in range(2):
                        ks = 2 * kk + hh
                        qa = np.zeros((4, 32, 2)); bb = np.zeros((2, 32, 2))
                        for lane in range(32):
                            tq = lane & 3
                            rt = s_rot[((jg * NKS + ks) * 4 + tq) * 2: ((jg * NKS + ks) * 4 + tq) * 2 + 2]
                            qa[0, lane] = rot(qh[lane, ks, 0], rt[0][0], rt[0][1])
                            qa[2, lane] = rot(qh[lane, ks, 1], rt[1][0], rt[1][1])
                            bb[0, lane] = rot(a[2 * hh, lane], kcs[lane, ks, 0], kns[lane, ks, 0])
                            bb[1, lane] = rot(a[2 * hh + 1, lane], kcs[lane, ks, 1], kns[lane, ks, 1])
                        d4 = mma(qa, bb, d4)
                for lane in range(32):
                    tq = lane & 3
                    d0 = 8 * jg + 2 * tq
                    lg[jg, lane, 0] = d4[lane, 0] if (t0 + d0 < end and not (wcur >> d0) & 1) else -np.inf
                    lg[jg, lane, 1] = d4[lane, 1] if (t0 + d0 + 1 < end and not (wcur >> (d0 + 1)) & 1) else -np.inf
            x = lg.max(axis=(0, 2))
            if (x > mrow + 8).any():
                xr = np.array([x[(l & ~3):(l & ~3) + 4].max() for l in range(32)])
                nm = np.maximum(mrow, xr)
                al = np.where(nm == -np.inf, 1.0, np.exp2(np.where(nm == -np.inf, 0, mrow - nm)))
                mrow = nm; lrow *= al
                for lane in range(32):
                    tq = lane & 3
                    alo, ahi = al[8 * tq], al[8 * tq + 4]
                    acc[:, lane, 0] *= alo; acc[:, lane, 1] *= ahi; acc[:, lane, 2] *= alo; acc[:, lane, 3] *= ahi
            u = np.where(mrow == -np.inf, 0, mrow)
            pb = np.zeros((4, 32, 2))
            for jg in range(4):
                p0 = np.exp2(lg[jg, :, 0] - u); p1 = np.exp2(lg[jg, :, 1] - u)
                lrow += p0 + p1
                pb[jg, :, 0] = p0; pb[jg, :, 1] = p1
            for kv in range(2):
                for mt in range(D // 16):
                    rows = []
                    for lane in range(32):
                        ltok = (lane & 7) + ((lane >> 4) << 3); hf = (lane >> 3) & 1
                        cw = s_vc[kv * 16 + ltok]
                        sv = 2 * mt + hf if SUBV == 8 else mt
                        ch = 0 if SUBV == 8 else hf
                        rows.append((sv, cw[sv], ch))
                    a = ldsm_t(rows, lambda r: centv[r[0], r[1], 8 * r[2]: 8 * r[2] + 8])
                    acc[mt] = mma(a, np.stack([pb[2 * kv], pb[2 * kv + 1]]), acc[mt])
            t0 += 32 * NWARP
        wstate.append((mrow, lrow, acc))
    # epilogue
    s_mx = np.full((NWARP, 8), -np.inf); s_l = np.zeros((NWARP, 8)); s_acc = np.zeros((NWARP, 8, D))
    lr = []
    for w, (mrow, lrow, acc) in enumerate(wstate):
        l2 = np.array([lrow[(l & ~3):(l & ~3) + 4].sum() for l in range(32)])
        lr.append(l2)
        for lane in range(32):
            if lane & 3 == 0:
                s_mx[w, lane >> 2] = mrow[lane]
    for w, (mrow, lrow, acc) in enumerate(wstate):
        for lane in range(32):
            gq, tq = lane >> 2, lane & 3
            mx_r = s_mx[:, gq].max(); mx_lo = s_mx[:, 2 * tq].max(); mx_hi = s_mx[:, 2 * tq + 1].max()
            mlo, mhi = s_mx[w, 2 * tq], s_mx[w, 2 * tq + 1]
            sclo = 0 if mlo == -np.inf else 2.0 ** (mlo - mx_lo)
            schi = 0 if mhi == -np.inf else 2.0 ** (mhi - mx_hi)
            if tq == 0:
                s_l[w, gq] = 0 if mrow[lane] == -np.inf else lr[w][lane] * 2.0 ** (mrow[lane] - mx_r)
            for mt in range(D // 16):
                d0 = mt * 16 + gq
                s_acc[w, 2 * tq, d0] = acc[mt, lane, 0] * sclo
                s_acc[w, 2 * tq + 1, d0] = acc[mt, lane, 1] * schi
                s_acc[w, 2 * tq, d0 + 8] = acc[mt, lane, 2] * sclo
                s_acc[w, 2 * tq + 1, d0 + 8] = acc[mt, lane, 3] * schi
    o = s_acc.sum(0)[:RV] / s_l.sum(0)[:RV, None]
    lse = s_mx.max(0)[:RV] + np.log2(s_l.sum(0)[:RV])
    return np.abs(o - ref_o).max(), np.abs(lse - ref_l).max()


for cfg in [dict(D=128, SUBK=8, SUBV=8, RV=4, TQ=1), dict(D=64, SUBK=16, SUBV=16, RV=3, TQ=1),
            dict(D=128, SUBK=16, SUBV=8, RV=8, TQ=2)]:
    n = 400
    anchors = [int(a) for a in rng.choice(np.arange(64, 300), 20, replace=False)]
    print(cfg, run(**cfg, NWARP=3, n=n, start=64, end=300 + cfg["RV"], anchors=anchors))
