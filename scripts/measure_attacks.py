"""Robust accuracy of the zoo models under BIM, PGD, APGD-CE, APGD-DLR and APGD-T.

The 100 SynthNORB test samples of results/paper-fig3 (load_dataset(..., n_samples=100,
seed=0), fingerprint b4763292cfeda491). One thread; appends one JSON line per
(model, attack) to the output file, so a long run can be read while it goes.

    OMP_NUM_THREADS=1 python scripts/measure_attacks.py OUT.jsonl [--models cnn,capsnet-small]
        [--attacks bim,pgd,apgd-ce,apgd-dlr,apgd-t,ta-apgd-ce,ta-apgd-dlr,ta-apgd-t]
        [--eps 0.1,0.2,0.5]
    python scripts/measure_attacks.py OUT.jsonl --table   # print the table, with the
                                                          # per-sample worst case of the native attacks
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import robustcaps
from robustcaps.attacks.apgd import APGD, APGDT
from robustcaps.attacks.backends import TorchattacksAPGD, TorchattacksAPGDT
from robustcaps.attacks.native import BIM
from robustcaps.attacks.pgd import PGD
from robustcaps.data import load_dataset

ATTACKS = {
    "bim": lambda: BIM(steps=10),
    "pgd": lambda: PGD(steps=50, restarts=1, seed=0),
    "apgd-ce": lambda: APGD(loss="ce", steps=100, seed=0),
    "apgd-dlr": lambda: APGD(loss="dlr", steps=100, seed=0),
    "apgd-t": lambda: APGDT(steps=100, seed=0),
    "ta-apgd-ce": lambda: TorchattacksAPGD(loss="ce", steps=100, seed=0),
    "ta-apgd-dlr": lambda: TorchattacksAPGD(loss="dlr", steps=100, seed=0),
    "ta-apgd-t": lambda: TorchattacksAPGDT(steps=100, seed=0),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--models", default="cnn,capsnet-small")
    p.add_argument("--attacks", default="bim,pgd,apgd-ce,apgd-dlr,apgd-t")
    p.add_argument("--eps", default="0.1,0.2,0.5")
    p.add_argument("--table", action="store_true", help="print OUT.jsonl as a table")
    args = p.parse_args()
    if args.table:
        table(args.out)
        return
    torch.set_num_threads(1)
    eps = [float(e) for e in args.eps.split(",")]
    ds = load_dataset("synthnorb", "test", n_samples=100, seed=0, progress=False)
    assert ds.fingerprint == "b4763292cfeda491", ds.fingerprint
    for model in args.models.split(","):
        adapter = robustcaps.load_model(model, device="cpu")
        for name in args.attacks.split(","):
            t0 = time.perf_counter()
            res = ATTACKS[name]().run(adapter, ds.x, ds.y, eps)
            row = {"model": model, "attack": name, "backend": res.backend, "eps": eps,
                   "clean_acc": float((res.clean_pred == res.y).double().mean()),
                   "accuracy": res.accuracy.tolist(), "seconds": time.perf_counter() - t0,
                   "correct": (res.adv_pred == res.y[None]).tolist(),
                   "max_linf": res.linf.amax(dim=1).tolist()}
            for key in ("sample_forwards", "sample_backwards"):
                if key in res.info:
                    row[key + "_mean"] = res.info[key].mean(axis=1).tolist()
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(model, name, row["accuracy"], f"{row['seconds']:.0f}s", flush=True)


def table(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    worst: dict[tuple[str, tuple[float, ...]], list] = {}
    for r in rows:
        eps = ", ".join(f"{e:g}" for e in r["eps"])
        acc = "  ".join(f"{100 * a:5.1f}" for a in r["accuracy"])
        cost = r.get("sample_backwards_mean")
        cost = "" if cost is None else " grads/sample " + "/".join(f"{c:.0f}" for c in cost)
        print(f"{r['model']:14s} {r['attack']:12s} eps {eps:14s} clean {100 * r['clean_acc']:5.1f}"
              f"  acc% {acc}  {r['seconds']:6.0f}s{cost}")
        if r["backend"] == "native":
            key = (r["model"], tuple(r["eps"]))
            ok = torch.tensor(r["correct"])
            worst[key] = ok if key not in worst else worst[key] & ok
    for (model, eps), ok in worst.items():
        acc = "  ".join(f"{100 * a:5.1f}" for a in ok.double().mean(dim=1).tolist())
        print(f"{model:14s} {'worst-native':12s} eps {', '.join(f'{e:g}' for e in eps):14s}"
              f"              acc% {acc}")


if __name__ == "__main__":
    main()
