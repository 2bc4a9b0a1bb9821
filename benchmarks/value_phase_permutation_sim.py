"""What a token permutation inside each 32-token tile would save in the 1-bit decode kernel's value reads (NOTES.md
"v10", not built). Model (kernels/value_copies.py, mode 2): an ldmatrix phase reads one value sub-space's rows of 8
consecutive coded tokens; a row of code k can sit in bank group k % 4 or 4 + k % 4 (two copies), so a phase costs
max over classes c of ceil(rows with k % 4 == c / 2) wavefronts. The selection words already pick the copies; a
permutation would also choose which 8 tokens share a phase (the same for all 16 sub-spaces). Local search by swaps.

    python3 benchmarks/value_phase_permutation_sim.py
"""
import numpy as np
rng = np.random.default_rng(0)
def cost(cls, groups):  # cls [32,16] classes 0..3; groups: list of 4 arrays of 8 token idx
    tot = 0
    for g in groups:
        c = cls[g]  # [8,16]
        cnt = np.stack([(c == v).sum(0) for v in range(4)])  # [4,16]
        tot += ((cnt + 1) // 2).max(0).sum()
    return tot
def search(cls, iters=3000, tile=32):
    idx = np.arange(tile); groups = [idx[i*8:(i+1)*8].copy() for i in range(tile//8)]
    best = cost(cls, groups)
    for _ in range(iters):
        a, b = rng.choice(len(groups), 2, replace=False); i, j = rng.integers(8), rng.integers(8)
        groups[a][i], groups[b][j] = groups[b][j], groups[a][i]
        c = cost(cls, groups)
        if c <= best: best = c
        else: groups[a][i], groups[b][j] = groups[b][j], groups[a][i]
    return best
for tile in (32, 64):
    base, opt = [], []
    for trial in range(20):
        cls = rng.integers(0, 4, size=(tile, 16))
        idx = np.arange(tile)
        base.append(cost(cls, [idx[i*8:(i+1)*8] for i in range(tile//8)]) / (16 * tile // 8))
        opt.append(search(cls, 4000 if tile == 32 else 6000, tile) / (16 * tile // 8))
    print(tile, "per-phase wavefronts: selection only %.3f, + permutation %.3f" % (np.mean(base), np.mean(opt)))
