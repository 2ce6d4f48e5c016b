#!/usr/bin/env python3
"""How the default temperature rule was chosen (run by hand; needs numpy).

For Student-t (5 degrees of freedom) weights, the optimal 1-D initial
centroids and tau = scale * (their hard-quantization error), this finds the
soft k-means fixed point in f64 by a safeguarded Newton iteration on the
free energy (as idkm does) and prints, per bit width and scale: the
iterations, whether the fixed point is stable, cond(I - J), the distinct
centroids and how far the fixed point is from the initialisation.

    python3 scripts/temperature_rule.py [--m 40000] [--bits 4,6,8] [--spreads 0.003,0.02,0.06]
"""
import argparse
import numpy as np


def weights(m, spread, seed):
    t = np.random.default_rng(seed).standard_t(5, m)
    return t / np.sqrt(5 / 3) * spread


def optimal_1d(w, k, nb=1024):
    """Optimal 1-D k-means on bins narrow in count and in value (as idkm's)."""
    s = np.sort(w)
    n = len(s)
    q = s[np.minimum(np.arange(nb) * n // nb, n - 1)]
    u = np.linspace(s[0], s[-1], nb + 1)[:-1]
    starts = np.unique(np.searchsorted(s, np.unique(np.concatenate([q, u]))))
    ends = np.append(starts[1:], n)
    cs, cq = np.concatenate([[0], np.cumsum(s)]), np.concatenate([[0], np.cumsum(s * s)])
    cnt, sm, sq = (ends - starts).astype(float), cs[ends] - cs[starts], cq[ends] - cq[starts]
    P, Ps, Pq = [np.concatenate([[0], np.cumsum(x)]) for x in (cnt, sm, sq)]
    nb = len(cnt)

    def cost(lo, hi):
        nn, ss, qq = P[hi] - P[lo], Ps[hi] - Ps[lo], Pq[hi] - Pq[lo]
        return np.where(nn > 0, qq - ss * ss / np.maximum(nn, 1e-300), 0)

    best = np.full((k, nb + 1), np.inf)
    cut = np.zeros((k, nb + 1), int)
    best[0, 1:] = cost(np.zeros(nb, int), np.arange(1, nb + 1))
    for j in range(1, k):
        stack = [(j + 1, nb, j, nb)]
        while stack:
            lo, hi, clo, chi = stack.pop()
            if lo > hi:
                continue
            b = (lo + hi) // 2
            cand = np.arange(clo, min(chi, b - 1) + 1)
            v = best[j - 1, cand] + cost(cand, np.full(len(cand), b))
            i = int(np.argmin(v))
            best[j, b], cut[j, b] = v[i], cand[i]
            stack += [(lo, b - 1, clo, cand[i]), (b + 1, hi, cand[i], chi)]
    c, hi = np.zeros(k), nb
    for j in range(k - 1, -1, -1):
        lo = 0 if j == 0 else cut[j, hi]
        c[j] = (Ps[hi] - Ps[lo]) / (P[hi] - P[lo])
        hi = lo
    return c


def hard_mse(w, c):
    idx = np.searchsorted((c[1:] + c[:-1]) / 2, w)
    return np.mean((w - c[idx]) ** 2)


def passes(w, c, tau):
    z = -(w[:, None] - c[None]) ** 2 / tau
    zm = z.max(1, keepdims=True)
    a = np.exp(z - zm)
    s = a.sum(1, keepdims=True)
    a /= s
    S = a.sum(0)
    return a, S, (a * w[:, None]).sum(0) / S, -tau * np.sum(np.log(s[:, 0]) + zm[:, 0])


def matrix(w, c, f, a, tau):
    """M with M_jl = (2/tau) sum_i a_ij (w_i - f_j)(delta_jl - a_il)(w_i - c_l); J = D^-1 M."""
    e, x = w[:, None] - c[None], a * (w[:, None] - f[None])
    return 2 / tau * (np.diag((x * e).sum(0)) - x.T @ (a * e))


def solve(w, c, tau, spread, tol=1e-9, max_iter=300):
    a, S, F, E = passes(w, c, tau)
    for it in range(1, max_iter + 1):
        r = F - c
        H = np.diag(S) - matrix(w, c, c, a, tau)
        lam = 0.0
        while True:
            try:
                L = np.linalg.cholesky(H + lam * np.diag(S))
                break
            except np.linalg.LinAlgError:
                lam = 1e-3 if lam == 0 else 4 * lam
        d = np.linalg.solve(L.T, np.linalg.solve(L, S * r))
        if lam == 0 and np.max(abs(d)) < tol * spread:
            c = c + d
            break
        g0, alpha, ok = np.linalg.norm(S * r), 1.0, False
        while alpha >= 1 / 16:
            cn = c + alpha * d
            if np.all(np.diff(cn) > 0):
                an, Sn, Fn, En = passes(w, cn, tau)
                if En <= E - 2e-4 * alpha * np.dot(S * r, d) or (lam == 0 and np.linalg.norm(Sn * (Fn - cn)) < g0):
                    ok = True
                    break
            alpha /= 2
        if not ok:
            cn = F
            an, Sn, Fn, En = passes(w, cn, tau)
        c, a, S, F, E = cn, an, Sn, Fn, En
    a, S, F, _ = passes(w, c, tau)
    J = matrix(w, c, F, a, tau) / S[:, None]
    return c, J, S, it


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=40000)
    ap.add_argument("--bits", default="4,6,8")
    ap.add_argument("--spreads", default="0.003,0.02,0.06")
    ap.add_argument("--scales", default="0.25,0.5,1,2,4")
    args = ap.parse_args()
    print("| bits | spread | scale | tau / spread^2 | iterations | stable | cond(I - J) | distinct | moved / spread |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for bits in map(int, args.bits.split(",")):
        k = 2 ** bits
        for spread in map(float, args.spreads.split(",")):
            w = weights(args.m, spread, seed=bits)
            c0 = optimal_1d(w, k)
            mse = hard_mse(w, c0)
            for scale in map(float, args.scales.split(",")):
                tau = scale * mse
                c, J, S, it = solve(w, c0, tau, spread)
                B = np.diag(S) @ (np.eye(k) - J)
                try:
                    np.linalg.cholesky((B + B.T) / 2)
                    stable = "yes"
                except np.linalg.LinAlgError:
                    stable = "no"
                distinct = 1 + int(np.sum(np.diff(np.sort(c)) > 1e-3 * spread))
                print(f"| {bits} | {spread} | {scale} | {tau / spread**2:.2e} | {it} | {stable} | "
                      f"{np.linalg.cond(np.eye(k) - J):.0f} | {distinct} | {np.max(abs(c - c0)) / spread:.1e} |", flush=True)


if __name__ == "__main__":
    main()
