"""Held-out reconstruction MSE: PCA vs Spline->PCA (lib/kvsplice.py).

    python scripts/kvsplice_validate.py --source synthetic
    python scripts/kvsplice_validate.py --source warped --k 8 16
    python scripts/kvsplice_validate.py --source runs/x/v_samples.pt

Each data set is split (seeded) into fit rows and test rows; both models are
fitted on the fit rows and scored on the test rows. `ratio` is SplinePCA MSE
over PCA MSE (below 1 is better); `kept` says whether the fit kept the learned
spline or fell back to the identity (then SplinePCA is PCA).

Sources:
  synthetic  low-rank V-like data: a few strong directions, a decaying tail
             of weaker ones, a little isotropic noise (Gaussian: PCA is
             already optimal, so the spline should fall back to identity)
  warped     the same kind of low-rank data, each dimension passed through a
             known monotone non-linearity (sinh, signed power 1.5, exp):
             the spline can undo these, PCA cannot
  FILE.pt    a tensor [N, head_dim] or a dict {layer: [N, head_dim]}
"""

import math

import torch

from gpt2.bench.synthetic import synthetic_v, warped_v
from gpt2.cpu import configure_cpu
from gpt2.entry import ArgumentParser
from lib.kvsplice import FIT_EPOCHS, FIT_LR, KNOTS, PCA, SplinePCA

TEST_FRACTION = 0.2


def validate_tensor(X, ks, knots=KNOTS, epochs=FIT_EPOCHS, lr=FIT_LR, seed=0, test_fraction=TEST_FRACTION):
    """Fit PCA and SplinePCA on part of X (N, dim), score both on the rest.

    Returns one dict per k: k, pca_mse, spline_mse, delta (spline - pca),
    ratio (spline / pca), kept (the learned spline was kept).
    """
    if X.dim() != 2:
        raise ValueError(f"expected samples of shape [N, head_dim], got {list(X.shape)}")
    X = X.float()
    dim = X.shape[1]
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(X.shape[0] * test_fraction)
    test, fit = X[perm[:n_test]], X[perm[n_test:]]
    if n_test < 1:
        raise ValueError(f"{X.shape[0]} rows leave no test rows at test_fraction={test_fraction}")
    rows = []
    for k in ks:
        pca = PCA(dim, k).fit(fit)
        spca = SplinePCA(dim, k, knots)
        stats = spca.fit(fit, epochs=epochs, lr=lr, seed=seed)
        with torch.no_grad():
            pca_mse = float(((pca.roundtrip(test) - test) ** 2).mean())
            spline_mse = float(((spca.roundtrip(test) - test) ** 2).mean())
        rows.append({"k": k, "pca_mse": pca_mse, "spline_mse": spline_mse,
                     "delta": spline_mse - pca_mse,
                     "ratio": spline_mse / pca_mse if pca_mse > 0 else float("nan"),
                     "kept": stats["kept_spline"]})
    return rows


def _yes_no(flag):
    return "-" if flag is None else ("yes" if flag else "no")


def format_rows(rows, label=None):
    head = f"{'layer':>8} " if label is not None else ""
    lines = [head + f"{'k':>4} {'PCA MSE':>12} {'SplinePCA MSE':>14} {'delta':>12} {'ratio':>7} {'kept':>5}"]
    for r in rows:
        lead = f"{str(label):>8} " if label is not None else ""
        lines.append(lead + f"{r['k']:>4} {r['pca_mse']:>12.4e} {r['spline_mse']:>14.4e} "
                     f"{r['delta']:>12.4e} {r['ratio']:>7.4f} {_yes_no(r['kept']):>5}")
    return "\n".join(lines)


def load_source(path):
    """{label: (N, dim) tensor} from a .pt file: one tensor or a dict of them."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read samples ({type(e).__name__}: {e})") from e
    layers = obj if isinstance(obj, dict) else {"all": obj}
    for name, t in layers.items():
        if not torch.is_tensor(t) or t.dim() != 2:
            found = list(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{path}: entry {name!r} must be a tensor [N, head_dim], found {found}")
    return layers


def setting_problems(args, shapes):
    """What keeps the fits from running: settings out of range, or data sets
    {name: (rows, dim)} too small for a k."""
    problems = []
    if args.knots < 1:
        problems.append(f"--knots must be >= 1, found {args.knots}")
    if args.epochs < 0:
        problems.append(f"--epochs must be >= 0, found {args.epochs}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        problems.append(f"--lr must be a finite number > 0, found {args.lr}")
    for name, (rows, dim) in shapes.items():
        if bad := [k for k in args.k if not 1 <= k <= dim]:
            problems.append(f"--k {bad}: the latent sizes of {name} must be in [1, head_dim = {dim}]")
        n_test = int(rows * TEST_FRACTION)
        if n_test < 1 or rows - n_test < max(args.k) + 1:
            problems.append(f"{name}: {rows} rows leave {n_test} test rows and {rows - n_test} fit rows; "
                            f"the fits need at least 1 and k + 1 = {max(args.k) + 1}")
    return problems


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="synthetic", help="synthetic, warped, or a .pt file")
    ap.add_argument("--k", type=int, nargs="+", default=[8, 16, 64], help="latent sizes")
    ap.add_argument("--n", type=int, default=60000, help="samples for synthetic/warped")
    ap.add_argument("--dim", type=int, default=64, help="head_dim for synthetic/warped")
    ap.add_argument("--knots", type=int, default=KNOTS)
    ap.add_argument("--epochs", type=int, default=FIT_EPOCHS)
    ap.add_argument("--lr", type=float, default=FIT_LR)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    generated = args.source in ("synthetic", "warped")
    if problems := setting_problems(args, {args.source: (args.n, args.dim)} if generated else {}):
        ap.error("; ".join(problems))
    configure_cpu()

    if generated:
        make = synthetic_v if args.source == "synthetic" else warped_v
        layers = {args.source: make(args.n, args.dim, args.seed)}
    else:
        layers = load_source(args.source)  # a ValueError names the file
        if problems := setting_problems(args, {name: tuple(X.shape) for name, X in layers.items()}):
            ap.error("; ".join(problems))
    kw = dict(knots=args.knots, epochs=args.epochs, lr=args.lr, seed=args.seed)
    print(f"source={args.source} seed={args.seed} knots={args.knots} epochs={args.epochs} lr={args.lr}; "
          "MSE on held-out 20% of rows")
    if len(layers) == 1:
        (name, X), = layers.items()
        print(f"{name}: {X.shape[0]} x {X.shape[1]}")
        print(format_rows(validate_tensor(X, args.k, **kw)))
        return
    overall = {k: [0.0, 0.0, 0] for k in args.k}  # summed squared error, count
    print(format_rows([], label="layer"))
    for name, X in layers.items():
        rows = validate_tensor(X, args.k, **kw)
        print("\n".join(format_rows(rows, label=name).split("\n")[1:]))
        n_test = int(X.shape[0] * 0.2) * X.shape[1]
        for r in rows:
            acc = overall[r["k"]]
            acc[0] += r["pca_mse"] * n_test
            acc[1] += r["spline_mse"] * n_test
            acc[2] += n_test
    print("overall (MSE over every layer's test rows):")
    print(format_rows([{"k": k, "pca_mse": p / n, "spline_mse": s / n, "delta": (s - p) / n,
                        "ratio": s / p if p > 0 else float("nan"), "kept": None}
                       for k, (p, s, n) in overall.items()]))
