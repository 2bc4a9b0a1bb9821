"""CPU emulation of the pre-RoPE CUDA kernel's rotation arithmetic (rope_decode.cu) against HF's fp32 angles.

    python benchmarks/rope_rotation_emulate.py [--tokens 8192] [--out DIR]

The kernel (NOTES.md "CUDA C++ kernel") factors the angle of slot p = T + d (T = p - p % 8, the 8-token group's
first slot): the query is rotated by R(-fl(T w)) once per group, the dequantized key by R(fl(d w)) (d < 8, per lane),
both in fp16x2 (HMUL2 + HFMA2, "fp16") or in fp32 ("rot32"), each rounded to fp16 for the tensor-core product. HF
(and rope_decode_reference) rotate by fl(p w). This script emulates both forms and the previous kernel (exact fp32
angle fl(p w), fp32 rotation of the key, fp16 query) on random pair-layout keys (Llama-3 RoPE, theta 500000,
head_dim 128, the test's table scale) and Gaussian queries at slots below 2^17 and in [2^17, 2^19), and reports:
- the angle error |fl(T w) + fl(d w) - fl(p w)| (max over pairs, rad), and HF's own |fl(p w) - p w|;
- the logit error (natural-log units, softmax scale d^-0.5 applied) against the float64 reference with HF's fp32
  angle, max and RMS, and relative to the RMS logit;
- the relative error of one attention output (softmax over the tokens, random values) against the reference.
fp16 rounding is emulated with float64 arithmetic then one rounding per fp16 operation (HMUL2 / HFMA2 round once).
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch

D = 128
THETA = 500000.0


def f16(x: torch.Tensor) -> torch.Tensor:
    """Round float64 to fp16 (once: float64 -> fp16 directly where torch allows, via fp32 otherwise), back to
    float64."""
    return x.to(torch.float16).to(torch.float64)


def rot_h2(xr, xi, c, s):
    """rot_pair of rope_decode.cu, fp16x2: r = x.re * (c, s) rounded, then fma(x.im, (-s, c), r) rounded."""
    lo = f16(xr * c)
    hi = f16(xr * s)
    return f16(xi * (-s) + lo), f16(xi * c + hi)


def angles(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fl(p * w) as HF computes it: fp32 position x fp32 frequency, float64 result of the fp32 product."""
    return (p.float()[:, None] * w.float()[None, :]).double()


def emulate(n_tok: int, lo: int, hi: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = (1.0 / THETA ** (torch.arange(0, D, 2).float() / D))  # fp32 inv_freq, coding order = model order here
    p = torch.randint(lo, hi, (n_tok,), generator=g)
    p[: min(64, n_tok)] = torch.arange(hi - min(64, n_tok), hi)  # the last slots of the range
    kr, ki = (f16(0.5 * torch.randn(n_tok, D // 2, generator=g, dtype=torch.float64) + 0.2 * torch.randn(1, D // 2,
              generator=g, dtype=torch.float64)) for _ in range(2))  # fp16 key table entries (centroid + mean)
    rows = 4
    q = torch.randn(rows, D, generator=g, dtype=torch.float64) * D ** -0.5  # scale folded into the query
    qr, qi = q[:, : D // 2], q[:, D // 2:]
    # reference: HF's fp32 angle, exact cos / sin and arithmetic
    th = angles(p, w)
    c, s = th.cos(), th.sin()
    ref_k = (kr * c - ki * s, ki * c + kr * s)
    ref = qr @ ref_k[0].T + qi @ ref_k[1].T  # [rows, n]
    # factored angle: T = p - p % 8, d = p % 8
    t, d = p - p % 8, p % 8
    tht, thd = angles(t, w), angles(d, w)
    ang_err = (tht + thd - th).abs().max().item()
    exact = p.double()[:, None] * w.double()[None, :]  # the real angle p * w (w as the fp32 inv_freq)
    out = {"slots": [lo, hi], "angle_err_max_rad": ang_err, "hf_angle_err_max_rad": (th - exact).abs().max().item(),
           "factored_vs_exact_max_rad": (tht + thd - exact).abs().max().item()}
    for name in ("fp16", "rot32", "old"):
        if name == "old":  # previous kernel: fp16 query, key rotated in fp32 by fl(p w), rounded to fp16
            qh_r, qh_i = f16(qr), f16(qi)
            krot = f16((kr * c - ki * s).float().double()), f16((ki * c + kr * s).float().double())
            lg = qh_r @ krot[0].T + qh_i @ krot[1].T
        else:
            ct, st_, cd, sd = tht.cos(), tht.sin(), thd.cos(), thd.sin()
            if name == "fp16":
                ct, st_, cd, sd = f16(ct), f16(st_), f16(cd), f16(sd)
                krot = rot_h2(kr, ki, cd, sd)  # key by R(fl(d w))
                qh_r, qh_i = f16(qr), f16(qi)
                # query by R(-fl(T w)): cs' = (c, -s), ns' = (s, c): (qr c + qi s, qi c - qr s)
                lg = torch.empty(rows, n_tok, dtype=torch.float64)
                for r in range(rows):
                    a, b = rot_h2(qh_r[r][None, :], qh_i[r][None, :], ct, -st_)
                    lg[r] = (a * krot[0] + b * krot[1]).sum(-1)
            else:  # fp32 rotation of both, one rounding to fp16 each
                ct, st_, cd, sd = (x.float().double() for x in (ct, st_, cd, sd))
                krot = f16(kr * cd - ki * sd), f16(ki * cd + kr * sd)
                lg = torch.empty(rows, n_tok, dtype=torch.float64)
                for r in range(rows):
                    a = f16(qr[r][None, :] * ct + qi[r][None, :] * st_)
                    b = f16(qi[r][None, :] * ct - qr[r][None, :] * st_)
                    lg[r] = (a * krot[0] + b * krot[1]).sum(-1)
        err = (lg - ref).abs()
        v = torch.randn(n_tok, D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        o_ref, o = torch.softmax(ref, -1) @ v, torch.softmax(lg, -1) @ v
        out[name] = {"logit_err_max": err.max().item(), "logit_err_rms": err.pow(2).mean().sqrt().item(),
                     "logit_rms": ref.pow(2).mean().sqrt().item(),
                     "out_rel": ((o - o_ref).norm() / o_ref.norm()).item()}
    # the exact-angle error alone (fp64 arithmetic, factored angle): what the factorization costs without rounding
    ka = (kr * thd.cos() - ki * thd.sin(), ki * thd.cos() + kr * thd.sin())
    qa_r = qr[:, None, :] * tht.cos()[None] + qi[:, None, :] * tht.sin()[None]
    qa_i = qi[:, None, :] * tht.cos()[None] - qr[:, None, :] * tht.sin()[None]
    lg = (qa_r * ka[0][None] + qa_i * ka[1][None]).sum(-1)
    out["angle_only"] = {"logit_err_max": (lg - ref).abs().max().item(),
                         "logit_err_rms": (lg - ref).pow(2).mean().sqrt().item()}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = [emulate(a.tokens, lo, hi, seed) for seed, (lo, hi) in enumerate([(0, 2 ** 17), (2 ** 17, 2 ** 19)])]
    for r in res:
        print(f"slots {r['slots']}: angle error max {r['angle_err_max_rad']:.2e} rad "
              f"(factored fl(T w) + fl(d w) vs fl(p w); HF fl(p w) vs the real p w {r['hf_angle_err_max_rad']:.2e}, "
              f"factored vs real {r['factored_vs_exact_max_rad']:.2e}); angle-only logit error max "
              f"{r['angle_only']['logit_err_max']:.2e} rms {r['angle_only']['logit_err_rms']:.2e}")
        for name in ("old", "fp16", "rot32"):
            e = r[name]
            print(f"  {name:6s} logit error max {e['logit_err_max']:.2e} rms {e['logit_err_rms']:.2e} "
                  f"(logit rms {e['logit_rms']:.2f}, max / rms {e['logit_err_max'] / e['logit_rms']:.1e}); "
                  f"output relative {e['out_rel']:.2e}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "rope_rotation_emulate.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
