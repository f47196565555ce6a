"""How smoothly a training run's outcome moves with one example's data weight: what MAGIC's exact derivative needs
to predict retraining (docs/METHODS.md §11; the MAGIC paper calls it metasmoothness).

    python benchmarks/magic_smoothness.py [--experiment digits] [--variants "" "train.lr=1e-4" float64 ...]
                                          [--examples 2] [--eps 1e-2,1e-1,1] [--metagradient]

For each training variant (space-separated Hydra overrides of the experiment; the word ``float64`` trains in double
precision): the bit-exact replay of the training (``diffattr.methods.magic.replay_of``) at w = 1 and at w = 1 - eps
e_i, for ``--examples`` training examples drawn at random (numpy seed 0) and every eps, and the validation's measured
output F of the first test image. Prints ΔF = F(w) - F(1) and the slope ΔF / (-eps), an estimate of dF/dw_i. Where
training is smooth the slopes agree across eps (ΔF shrinks with eps); where it is chaotic ΔF keeps about the same
size at every eps, so the slope grows as 1/eps and no derivative predicts a removal. ``--metagradient`` adds dF/dw_i
from MAGIC's reverse pass (a few trainings more). Times nothing.
"""

from __future__ import annotations

import argparse


def probe(experiment: str, variant: str, examples: int, eps: list[float], metagradient: bool) -> list[dict]:
    import numpy as np
    import torch

    from diffattr.config import compose
    from diffattr.data import load_dataset
    from diffattr.methods.magic import query_outputs, replay_of
    from diffattr.models import build_scheduler

    overrides = variant.split()
    double = "float64" in overrides
    cfg = compose(experiment, [o for o in overrides if o != "float64"]).cfg
    torch.set_default_dtype(torch.float64 if double else torch.float32)
    try:
        train_set, test_set = load_dataset(cfg.data, "train"), load_dataset(cfg.data, "test")
        dtype = torch.get_default_dtype()
        train_set.images, image = train_set.images.to(dtype), test_set.images[:1].to(dtype)
        scheduler = build_scheduler(cfg.model)
        replay, unet = replay_of(cfg, train_set, scheduler, torch.device("cpu"), use_ema=False)
        (output,) = query_outputs(cfg, unet, scheduler, image, test_set.ids[:1].numpy(), torch.device("cpu"))
        names = [name for name, _ in unet.named_parameters()]

        def f(weights):
            with torch.no_grad():
                return float(output(dict(zip(names, replay.final_params(replay.run(weights))))))

        n = len(train_set)
        ones = torch.ones(n)
        base = f(ones)
        chosen = np.random.default_rng(0).choice(n, examples, replace=False)
        exact = replay.metagradients(ones, [output])[1][0] if metagradient else None
        rows = []
        for i in chosen:
            for e in eps:
                weights = ones.clone()
                weights[i] -= e
                delta = f(weights) - base
                rows.append({"variant": variant or "as configured", "example": int(i), "eps": e, "F": base,
                             "dF": delta, "slope": delta / -e,
                             "dF/dw": float(exact[i]) if exact is not None else float("nan")})
        return rows
    finally:
        torch.set_default_dtype(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="digits")
    parser.add_argument("--variants", nargs="+", default=[""])
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--eps", default="1e-2,1e-1,1")
    parser.add_argument("--metagradient", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    eps = [float(e) for e in args.eps.split(",")]
    print("| variant | F(1) | example | eps | dF | slope dF/(-eps) | dF/dw (reverse pass) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for variant in args.variants:
        for r in probe(args.experiment, variant, args.examples, eps, args.metagradient):
            print(f"| {r['variant']} | {r['F']:.5f} | {r['example']} | {r['eps']:g} | {r['dF']:.3e} | "
                  f"{r['slope']:.3e} | {r['dF/dw']:.3e} |", flush=True)


if __name__ == "__main__":
    main()
