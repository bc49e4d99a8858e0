"""The paper's theory on over-parameterised linear regression: masking flattens the loss and moves the solution away.

    python3 studies/study_linreg.py                         # d = 20000, n = 20, p = 1e-3 .. 1, 5 seeds (~20 s)
    python3 studies/study_linreg.py --d 5000 --n 10 --seeds 2 --points 9

Setup (Xu & Zhang, ICML 2024, Sec. "theory"; docs/reproduction.md, section 2): X is n x d with iid N(0, 1/d) entries
(so E[X X^T] = I), pretrained weights w0, targets y = X w* with w* - w0 ~ N(0, I_d), so the residual to fit is
r = y - X w0 = X (w* - w0). A random mask keeps k = round(p d) of the d coordinates (uniform, without replacement,
seeded) and gradient descent trains only those: the loss is L(D) = |X_M D - r|^2 / (2n) over D in R^k, whose Hessian
is H_p = X_M^T X_M / n. For each p on a log grid and each mask seed this measures

  (a) lambda_max(H_p), from the n x n Gram matrix X_M X_M^T / n (same nonzero eigenvalues, far cheaper than k x k).
      Prediction: E[X_M X_M^T] = p I, so lambda_max ~ (p / n)(1 + sqrt(n / k))^2 (Marchenko-Pastur edge), ~ p
      once k >> n.
  (b) the largest stable step of GD, measured: GD from D = 0 in the k-dim masked space for --gd-steps steps, a step
      counted as divergent when the final loss exceeds the initial loss; the threshold is bracketed by doubling from
      eta = 1 and bisected to --bisect-rel relative width. Prediction: 2 / lambda_max ~ 1 / p.
  (c) the distance from w0 of the solution GD converges to: the min-norm interpolant of the masked system,
      |D| = |X_M^+ r|, with r^T (X_M X_M^T)^{-1} r = |D|^2. Prediction: ~ 1 / sqrt(p); finite-size form
      E|D|^2 = n (d - n - 1) / (k - n - 1) (inverse-Wishart mean; derivation in docs/reproduction.md, section 2).
      Checked against GD itself: GD at eta = 1 / lambda_max for --gd-steps steps from D = 0.
Each seed draws a fresh X, w* and mask (so seed averages estimate the expectations the formulas give).
Log-log slopes are fitted to the seed-averaged log values twice: over every p, and over the over-parameterised
range k >= 10 n where the asymptotic predictions should hold (the fit departs as k approaches n); the slopes of
the finite-size formulas over the same p are reported beside them.
Also: (d) the same lambda_max through randmask itself, analysis.hessian_top_eigenvalue (studies/analysis.py) on a
MaskedLinear (d -> 1, no bias) whose hash mask picks the columns; compared with eigvalsh of that mask's Gram matrix;
and (e) the REFERENCE.md simulation's setting (n = 100, d = 20000), for comparison with its numbers.
Writes studies/results/study_linreg.{json,md,png}.
"""
import argparse
import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread: the timings do not depend on how busy the other cores are

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_tools import load_average, machine_name, markdown_table, write_results  # noqa: E402

PREDICTED_SLOPES = {"lambda_max": 1.0, "stable_step": -1.0, "distance": -0.5}
# REFERENCE.md, "Theory": a quick simulation with n = 100, d = 20000.
REFERENCE_SIM = {"n": 100, "d": 20000, "p": [1, 0.3, 0.1, 0.03, 0.01],
                 "lambda_max": [0.0114, 0.0038, 0.0015, 0.00057, 0.00028], "distance": [10.3, 18.9, 33.8, 65.9, 141.5]}


def problem(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) / np.sqrt(d)
    w_star_minus_w0 = rng.standard_normal(d)
    return x, x @ w_star_minus_w0  # X, residual r = y - X w0


def mask_columns(d, k, seed):
    return np.sort(np.random.default_rng(10_000 + seed).choice(d, size=k, replace=False))


def gd_final_loss(xm, r, eta, steps):
    """Loss after `steps` of GD on |X_M D - r|^2 / (2n) from D = 0, in the k-dim parameter space; inf if it blew up."""
    n = xm.shape[0]
    delta = np.zeros(xm.shape[1])
    limit = 1e12 * (r @ r)
    for _ in range(steps):
        residual = xm @ delta - r
        if not residual @ residual < limit:  # also catches nan
            return np.inf
        delta -= (eta / n) * (xm.T @ residual)
    residual = xm @ delta - r
    return float(residual @ residual) / (2 * n)


def stable_step(xm, r, steps, rel):
    """Largest eta for which GD does not end above its starting loss, found without using lambda_max."""
    start = float(r @ r) / (2 * xm.shape[0])
    stable = lambda eta: gd_final_loss(xm, r, eta, steps) <= start  # noqa: E731
    lo, hi = 1.0, 1.0
    if stable(1.0):
        while stable(hi):
            lo, hi = hi, hi * 2
    else:
        while not stable(lo):
            lo, hi = lo / 2, lo
    while hi - lo > rel * lo:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    return 0.5 * (lo + hi)


def gd_distance(xm, r, eta, steps):
    n = xm.shape[0]
    delta = np.zeros(xm.shape[1])
    for _ in range(steps):
        delta -= (eta / n) * (xm.T @ (xm @ delta - r))
    return float(np.linalg.norm(delta))


def measure(x, r, k, seed, gd_steps, bisect_rel):
    n, d = x.shape
    xm = x[:, mask_columns(d, k, seed)]
    gram = xm @ xm.T
    lam = float(np.linalg.eigvalsh(gram / n)[-1])
    distance = float(np.sqrt(r @ np.linalg.solve(gram, r)))  # |X_M^+ r|, X_M has full row rank for k >= n
    return {"lambda_max": lam, "stable_step_measured": stable_step(xm, r, gd_steps, bisect_rel),
            "stable_step_2_over_lambda": 2 / lam, "distance": distance,
            "distance_gd": gd_distance(xm, r, 1 / lam, gd_steps)}


def slope(ps, values):
    fit = np.polyfit(np.log(ps), np.log(values), 1)
    return float(fit[0]), float(fit[1])


def randmask_check(x, r, ps, iters):
    """lambda_max via analysis.hessian_top_eigenvalue on a MaskedLinear(d -> 1) vs eigvalsh of that mask's Gram
    matrix."""
    import torch
    from analysis import hessian_top_eigenvalue

    import randmask

    torch.set_num_threads(1)
    n, d = x.shape
    xt, rt = torch.tensor(x, dtype=torch.float32), torch.tensor(r, dtype=torch.float32)
    rows = []
    for p in ps:
        linear = torch.nn.Linear(d, 1, bias=False).requires_grad_(False)
        torch.nn.init.zeros_(linear.weight)  # w0 = 0: the residual r is the target
        layer = randmask.MaskedLinear.from_linear(linear, density=p, seed=0, name="w")
        loss_fn = lambda layer=layer: ((layer(xt)[:, 0] - rt) ** 2).sum() / (2 * n)  # noqa: E731
        start = time.perf_counter()
        lam, _, used = hessian_top_eigenvalue(loss_fn, [layer.delta], iters=iters, tol=1e-7,
                                              generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        cols = layer.positions()[1].numpy()
        exact = float(np.linalg.eigvalsh(x[:, cols] @ x[:, cols].T / n)[-1])
        rows.append({"p": p, "k": layer.n, "lambda_power_iteration": lam, "lambda_eigvalsh": exact,
                     "rel_diff": abs(lam - exact) / exact, "iterations": used, "seconds": seconds})
    return rows


def run(args):
    n, d = args.n, args.d
    ps = np.logspace(np.log10(args.p_min), 0, args.points)
    ks = np.maximum(np.round(ps * d).astype(int), n + 2)  # k > n + 1 keeps the masked system under-determined
    ps = ks / d
    per_seed = {key: np.zeros((args.seeds, len(ps))) for key in
                ("lambda_max", "stable_step_measured", "stable_step_2_over_lambda", "distance", "distance_gd")}
    start = time.perf_counter()
    for s in range(args.seeds):
        x, r = problem(n, d, args.seed + s)  # each seed: a fresh X, w* and mask, so the mean estimates E[...]
        for j, k in enumerate(ks):
            for key, value in measure(x, r, int(k), s, args.gd_steps, args.bisect_rel).items():
                per_seed[key][s, j] = value
    main_seconds = time.perf_counter() - start
    mean_log = {key: np.exp(np.log(v).mean(axis=0)) for key, v in per_seed.items()}  # geometric mean over seeds

    prediction = {"lambda_max_mp": ((ks / d) / n * (1 + np.sqrt(n / ks)) ** 2).tolist(),
                  "distance_inverse_wishart": np.sqrt(n * (d - n - 1) / (ks - n - 1)).tolist()}
    over, far = ks >= 10 * n, ks >= 100 * n
    fits = {}
    for name, key, finite in (("lambda_max", "lambda_max", prediction["lambda_max_mp"]),
                              ("stable_step", "stable_step_measured", 2 / np.array(prediction["lambda_max_mp"])),
                              ("distance", "distance", prediction["distance_inverse_wishart"])):
        every, _ = slope(ps, mean_log[key])
        overp, intercept = slope(ps[over], mean_log[key][over])
        seeds = [slope(ps[over], per_seed[key][s][over])[0] for s in range(args.seeds)]
        fits[name] = {"predicted": PREDICTED_SLOPES[name], "slope_all_p": every, "slope_k_ge_10n": overp,
                      "slope_k_ge_100n": slope(ps[far], mean_log[key][far])[0] if far.sum() >= 2 else None,
                      "intercept_k_ge_10n": intercept, "slope_k_ge_10n_per_seed": seeds,
                      "finite_size_formula_slope_k_ge_10n": slope(ps[over], np.asarray(finite)[over])[0],
                      "finite_size_formula_slope_all_p": slope(ps, np.asarray(finite))[0]}

    check = randmask_check(*problem(n, d, args.seed), [float(p) for p in args.randmask_ps], args.power_iters)

    reference_rows = []
    for p, lam_ref, dist_ref in zip(REFERENCE_SIM["p"], REFERENCE_SIM["lambda_max"], REFERENCE_SIM["distance"]):
        k = round(p * REFERENCE_SIM["d"])
        lams, dists = [], []
        for s in range(args.seeds):
            xr, rr = problem(REFERENCE_SIM["n"], REFERENCE_SIM["d"], args.seed + s)
            xm = xr[:, mask_columns(REFERENCE_SIM["d"], k, s)]
            gram = xm @ xm.T
            lams.append(float(np.linalg.eigvalsh(gram / REFERENCE_SIM["n"])[-1]))
            dists.append(float(np.sqrt(rr @ np.linalg.solve(gram, rr))))
        reference_rows.append({"p": p, "lambda_max": float(np.mean(lams)), "lambda_max_reference": lam_ref,
                               "distance": float(np.mean(dists)), "distance_reference": dist_ref})

    return {"config": vars(args), "machine": machine_name("cpu"), "load_average": load_average(),
            "seconds_main_grid": main_seconds, "p": ps.tolist(), "k": ks.tolist(),
            "per_seed": {key: v.tolist() for key, v in per_seed.items()},
            "mean": {key: v.tolist() for key, v in mean_log.items()}, "prediction": prediction, "fits": fits,
            "randmask_check": check, "reference_simulation": reference_rows}


def to_markdown(data):
    cfg = data["config"]
    lines = [f"# Linear-regression theory study (n = {cfg['n']}, d = {cfg['d']}, "
             f"{cfg['seeds']} seeds: fresh X, w* and mask each)", "",
             f"`python3 studies/study_linreg.py {cfg['argv']}`".replace(" `", "`"), "",
             f"Machine: {data['machine']}; load average {data['load_average']}; main grid "
             f"{data['seconds_main_grid']:.1f} s.", "", "## Fitted log-log slopes", ""]
    rows = [[name, f"{f['predicted']:+.1f}", f"{f['slope_k_ge_10n']:+.3f}",
             f"{min(f['slope_k_ge_10n_per_seed']):+.3f} .. {max(f['slope_k_ge_10n_per_seed']):+.3f}",
             f"{f['finite_size_formula_slope_k_ge_10n']:+.3f}",
             "–" if f["slope_k_ge_100n"] is None else f"{f['slope_k_ge_100n']:+.3f}", f"{f['slope_all_p']:+.3f}",
             f"{f['finite_size_formula_slope_all_p']:+.3f}"] for name, f in data["fits"].items()]
    lines.append(markdown_table(["quantity", "predicted (k >> n)", "fit, k >= 10n", "per seed, k >= 10n",
                                 "finite-size formula, k >= 10n", "fit, k >= 100n", "fit, all p",
                                 "finite-size formula, all p"], rows))
    lines += ["", "Finite-size formulas: λ_max ≈ (p/n)(1 + √(n/k))² (Marchenko-Pastur edge; stable step 2/that), "
              "E‖Δ‖² = n(d − n − 1)/(k − n − 1) (inverse-Wishart mean), fitted over the same p."]
    lines += ["", "## Per p (geometric mean over seeds)", ""]
    mean, pred = data["mean"], data["prediction"]
    rows = []
    for j, (p, k) in enumerate(zip(data["p"], data["k"])):
        rows.append([f"{p:.4g}", k, f"{k / cfg['n']:.1f}", f"{mean['lambda_max'][j]:.4g}",
                     f"{pred['lambda_max_mp'][j]:.4g}", f"{mean['stable_step_measured'][j]:.4g}",
                     f"{mean['stable_step_2_over_lambda'][j]:.4g}", f"{mean['distance'][j]:.4g}",
                     f"{mean['distance_gd'][j]:.4g}", f"{pred['distance_inverse_wishart'][j]:.4g}"])
    headers = ["p", "k", "k/n", "λ_max", "MP edge", "stable η (GD)", "2/λ_max", "‖Δ‖ min-norm",
               f"‖Δ‖ GD ({cfg['gd_steps']} steps)", "√E‖Δ‖² formula"]
    lines.append(markdown_table(headers, rows))
    lines += ["", "## λ_max through analysis.hessian_top_eigenvalue (MaskedLinear d→1, hash mask)", ""]
    rows = [[f"{c['p']:.4g}", c["k"], f"{c['lambda_power_iteration']:.6g}", f"{c['lambda_eigvalsh']:.6g}",
             f"{c['rel_diff']:.1e}", c["iterations"], f"{c['seconds']:.2f}"] for c in data["randmask_check"]]
    lines.append(markdown_table(["p", "n trainable", "power iteration", "eigvalsh", "rel. diff", "iterations", "s"],
                                rows))
    lines += ["", "## The REFERENCE.md simulation's setting (n = 100, d = 20000), mean over seeds", ""]
    rows = [[c["p"], f"{c['lambda_max']:.3g}", c["lambda_max_reference"], f"{c['distance']:.3g}",
             c["distance_reference"]] for c in data["reference_simulation"]]
    lines.append(markdown_table(["p", "λ_max here", "λ_max REFERENCE", "‖Δ‖ here", "‖Δ‖ REFERENCE"], rows))
    return "\n".join(lines)


def plot(data, path):
    import matplotlib.pyplot as plt

    ps, k, n = np.array(data["p"]), np.array(data["k"]), data["config"]["n"]
    over = k >= 10 * n
    panels = [("lambda_max", "lambda_max", "λ_max of masked Hessian", data["prediction"]["lambda_max_mp"]),
              ("stable_step", "stable_step_measured", "largest stable GD step",
               2 / np.array(data["prediction"]["lambda_max_mp"])),
              ("distance", "distance", "‖Δ‖ = distance from w0", data["prediction"]["distance_inverse_wishart"])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (name, key, title, finite) in zip(axes, panels):
        fit = data["fits"][name]
        for s, values in enumerate(data["per_seed"][key]):
            ax.plot(ps, values, "o", ms=3, color="0.6", label="per seed" if s == 0 else None)
        mean = np.array(data["mean"][key])
        ax.plot(ps, mean, "o-", color="C0", label="mean over seeds")
        if name == "stable_step":
            ax.plot(ps, data["mean"]["stable_step_2_over_lambda"], "x", color="C3", label="2 / λ_max")
        if name == "distance":
            ax.plot(ps, data["mean"]["distance_gd"], "+", color="C3", ms=9, label="GD endpoint")
        ax.plot(ps, np.exp(fit["intercept_k_ge_10n"]) * ps ** fit["slope_k_ge_10n"], "--", color="C1",
                label=f"fit k≥10n: slope {fit['slope_k_ge_10n']:+.3f}")
        anchor = mean[-1]  # the predicted power law through the p = 1 point
        ax.plot(ps, anchor * ps ** fit["predicted"], ":", color="k", label=f"∝ p^{fit['predicted']:+.1f}")
        if finite is not None:
            finite_label = {"lambda_max": "MP edge", "stable_step": "2 / MP edge",
                            "distance": "√E‖Δ‖² (inv. Wishart)"}[name]
            ax.plot(ps, finite, "-", color="C2", lw=1, alpha=0.8, label=finite_label)
        ax.axvspan(ps.min() * 0.9, ps[over].min(), color="C3", alpha=0.06, label="k < 10n")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("mask fraction p")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"Over-parameterised linear regression, n = {n}, d = {data['config']['d']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--n", type=int, default=20, help="samples (default 20)")
    parser.add_argument("--d", type=int, default=20000, help="features (default 20000)")
    parser.add_argument("--p-min", type=float, default=1e-3, help="smallest mask fraction (default 1e-3; "
                        "k is raised to n + 2 where p d is smaller)")
    parser.add_argument("--points", type=int, default=13, help="p values on the log grid (default 13)")
    parser.add_argument("--seeds", type=int, default=5,
                        help="seeds averaged, each a fresh X, w* and mask (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of X and w* (default 0)")
    parser.add_argument("--gd-steps", type=int, default=300, help="GD steps per run (default 300)")
    parser.add_argument("--bisect-rel", type=float, default=0.005,
                        help="relative width of the final stable-step bracket (default 0.005)")
    parser.add_argument("--randmask-ps", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 0.1, 0.01],
                        help="p values for the analysis.hessian_top_eigenvalue check (comma list; default "
                        "1,0.1,0.01)")
    parser.add_argument("--power-iters", type=int, default=1000, help="power-iteration cap (default 1000)")
    parser.add_argument("--stem", default="study_linreg", help="results file stem (default study_linreg)")
    args = parser.parse_args(argv)
    args.argv = " ".join(sys.argv[1:] if argv is None else argv)
    data = run(args)
    markdown = to_markdown(data)
    path = write_results(args.stem, data, markdown, plot)
    print(markdown)
    print(f"\nwrote {path}.{{json,md,png}}")


if __name__ == "__main__":
    main()
