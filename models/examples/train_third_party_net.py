"""Train the example third-party model (``third_party_net.py``) and save its state dict.

    .venv/bin/python models/examples/train_third_party_net.py [--data-dir DIR] [--epochs 6]

Data: MNIST split ``t10k-train`` (the first 8,000 t10k images; the only MNIST images
in this workspace), via :func:`robustcaps.data.load_dataset`. Prints the error on
``t10k-test`` (the last 2,000), which no training decision looks at.
Deterministic given --seed on the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def _load_example():
    spec = importlib.util.spec_from_file_location("third_party_net", HERE / "third_party_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    from robustcaps.data import load_dataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(HERE.parents[2] / "shared" / "data" / "mnist-t10k"))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "third_party_net.pt"))
    args = p.parse_args()

    torch.manual_seed(args.seed)
    train = load_dataset("mnist", "t10k-train", data_dir=args.data_dir)
    test = load_dataset("mnist", "t10k-test", data_dir=args.data_dir)
    model = _load_example().SmallMnistNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train.y), generator=gen)
        for idx in perm.split(64):
            loss = nn.functional.cross_entropy(model(train.x[idx])["class_scores"], train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            err = (model(test.x)["class_scores"].argmax(1) != test.y).double().mean().item()
        print(f"epoch {epoch + 1}: last batch loss {loss.item():.4f}, t10k-test error {err:.2%}")
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
