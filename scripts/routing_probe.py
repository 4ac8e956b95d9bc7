"""Which routing preset lets a 3-iteration capsule network train? (issue #15)

Two measurements per routing preset (``robustcaps.models.em_routing.ROUTING_PRESETS``), on
capsnet-small at 28x28 and real MNIST images (the t10k-train split only: never the test
split):

1. Gradient growth at initialisation: ``|dL/dW_conv1| / |W_conv1|`` (spread loss, margin
   0.2, one batch) for 1-4 routing iterations. Each extra E-step that multiplies it by ~10
   makes the lower layers' updates explode once routing sharpens.
2. Validation error of a 3-iteration network after ``--steps`` Adam steps (lr 3e-3, batch
   32, spread loss with the margin ramped 0.2 -> 0.9 over the run, as ``robustcaps train``
   does) on the first ``--n-train`` t10k-train images; validation on the last
   ``--n-val`` t10k-train images (held out).

    OMP_NUM_THREADS=1 python scripts/routing_probe.py --data-dir ../shared/data/mnist-t10k \\
        --presets paper,authors,pertype --seeds 0,1 --steps 150 --json results.json

Prints one line per (preset, seed) and a markdown table of the means.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from robustcaps.data.mnist import load_mnist
from robustcaps.models.losses import spread_loss, spread_margin
from robustcaps.models.registry import create_model


def _model(preset: str, iterations: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("capsnet-small", num_classes=10, input_shape=(1, 28, 28),
                        iterations=iterations, routing=preset)


def grad_growth(preset: str, x: torch.Tensor, y: torch.Tensor, seed: int) -> list[float]:
    """Relative conv1 gradient norm at initialisation for 1-4 iterations (same weights)."""
    out = []
    for it in range(1, 5):
        m = _model(preset, it, seed)
        loss = spread_loss(torch.sigmoid(m(x)), y, margin=0.2).mean()
        (g,) = torch.autograd.grad(loss, m.conv1.weight)
        out.append(float(g.norm() / m.conv1.weight.norm()))
    return out


def train_error(preset: str, seed: int, xs, ys, xv, yv, steps: int, batch: int,
                lr: float, iterations: int = 3) -> dict:
    m = _model(preset, iterations, seed)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(xs), (batch,), generator=g)
        logits = m(xs[idx])
        loss = spread_loss(torch.sigmoid(logits), ys[idx],
                           margin=spread_margin(step / max(steps - 1, 1))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if not torch.isfinite(loss):
            break
    m.eval()
    with torch.no_grad():
        pred = torch.cat([m(xv[i:i + 250]).argmax(1) for i in range(0, len(xv), 250)])
    return {"val_error": float((pred != yv).float().mean()), "train_s": time.time() - t0,
            "final_loss": sum(losses[-10:]) / len(losses[-10:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/mnist-t10k")
    ap.add_argument("--presets", default="paper,authors,pertype")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-train", type=int, default=7000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=3, help="of the trained network")
    ap.add_argument("--no-train", action="store_true", help="gradient probe only")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    images, labels = load_mnist(args.data_dir, "t10k-train")  # 8,000 images
    x = torch.from_numpy(images[:, None].astype("float32") / 255.0)
    y = torch.from_numpy(labels).long()
    assert args.n_train + args.n_val <= len(y)
    xs, ys = x[: args.n_train], y[: args.n_train]
    xv, yv = x[-args.n_val:], y[-args.n_val:]
    results = []
    for preset in args.presets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            r: dict = {"preset": preset, "seed": seed, "iterations": args.iterations,
                       "steps": args.steps}
            r["grad_growth"] = grad_growth(preset, xs[:32], ys[:32], seed)
            if not args.no_train:
                r.update(train_error(preset, seed, xs, ys, xv, yv, args.steps, args.batch,
                                     args.lr, args.iterations))
            results.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"\n| preset | conv1 rel. gradient, 1 / 2 / 3 / 4 iterations | {args.iterations}-iteration "
          f"val error "
          f"after {args.steps} steps (per seed) |")
    print("|---|---|---|")
    for preset in args.presets.split(","):
        rs = [r for r in results if r["preset"] == preset]
        gg = [sum(r["grad_growth"][i] for r in rs) / len(rs) for i in range(4)]
        errs = " / ".join(f"{100 * r['val_error']:.1f}%" for r in rs if "val_error" in r)
        print(f"| {preset} | {' / '.join(f'{v:.3g}' for v in gg)} | {errs} |")


if __name__ == "__main__":
    main()
