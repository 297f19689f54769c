"""SOAP and Shampoo rows (the Kronecker-factored family), against pytorch_optimizer's SOAP and Shampoo.

Every row routes like eopt: hidden matrices to the Kronecker optimizer, embeddings, head and 1-D
parameters to fused AdamW (the oracles are chained with torch's fused AdamW, see ``benchmarks.cases.Chain``).

Rows with periodic refreshes run >= 20 timed steps so refresh steps are included. The runner reports the
median step, which for a periodic refresh is the step *without* one; ``python -m benchmarks.cases.kronecker``
times the same rows and prints the mean (the amortized step), the median, and one root-inverse refresh.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.cases import Case, Chain, backup_adamw, split_params

BACKUP = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}


def _eopt(name: str, **hparams):
    def make(named, info) -> torch.optim.Optimizer:
        import eopt

        return eopt.build(named, name, hints=info["hints"], backup=BACKUP, **hparams)

    return make


def _oracle_soap(frequency: int):
    def make(named, info) -> torch.optim.Optimizer:
        from pytorch_optimizer import SOAP

        matrices, others = split_params(named, info)
        soap = SOAP([p for _, p in matrices], lr=3e-3, precondition_frequency=frequency)
        return Chain(soap, backup_adamw(others, **BACKUP))

    return make


def _oracle_shampoo(named, info) -> torch.optim.Optimizer:
    from pytorch_optimizer import Shampoo

    matrices, others = split_params(named, info)
    return Chain(Shampoo([p for _, p in matrices], lr=1e-3), backup_adamw(others, **BACKUP))


ORIGINAL = {
    "betas": (0.0, 1.0),
    "grafting": "none",
    "use_bias_correction": False,
    "start_preconditioning_step": 1,
    "epsilon": 1e-6,
}


def cases() -> list[Case]:
    return [
        Case("pytorch_optimizer.SOAP (f=10)", "soap", _oracle_soap(10), baseline=True, steps=30),
        Case("eopt.SOAP (f=10)", "soap", _eopt("soap", precondition_frequency=10), steps=30),
        Case("pytorch_optimizer.Shampoo (roots every step)", "shampoo", _oracle_shampoo, baseline=True, steps=5),
        Case(
            "eopt.Shampoo original (roots every step)",
            "shampoo",
            _eopt("shampoo", precondition_frequency=1, **ORIGINAL),
            steps=10,
        ),
        Case("eopt.Shampoo (f=1)", "shampoo", _eopt("shampoo", precondition_frequency=1), steps=10),
        Case("eopt.Shampoo (f=10)", "shampoo", _eopt("shampoo", precondition_frequency=10), steps=30),
        Case("eopt.Shampoo (f=100)", "shampoo", _eopt("shampoo", precondition_frequency=100), steps=100),
    ]


def main(argv: list[str] | None = None) -> None:
    """Mean (amortized) and median step of every row, and the cost of one Shampoo root-inverse refresh."""
    from benchmarks import optimizer_step
    from benchmarks.optimizer_step import CLOCKS, SIZES, build_model, time_family

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: thread CPU time (--threads 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu counts the calling thread only: use it with --threads 1")
    optimizer_step.clock = CLOCKS[args.clock]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU, {args.clock} clock")
    by_family: dict[str, list[Case]] = {}
    for case in cases():
        by_family.setdefault(case.family, []).append(case)
    for size in args.sizes.split(","):
        named, info = build_model(size)
        s = SIZES[size]
        n_params = sum(p.numel() for _, p in named) / 1e6
        print(f"\n### {size}: Llama {s['layers']} x {s['hidden']}, vocab {s['vocab']}, {n_params:.2f}M params\n")
        print("| optimizer | mean ms/step | median ms/step | mean vs baseline | state MiB | timed steps |")
        print("|---|---:|---:|---:|---:|---:|")
        medians = {}
        for family_cases in by_family.values():
            rows = time_family(family_cases, named, info, seed=0)
            base = next((r for r in rows if r["case"].baseline and r["times"]), None)
            base_mean = statistics.mean(base["times"]) if base else None
            for r in rows:
                if not r["times"]:
                    print(f"| {r['case'].name} | {r['note']} | | | | |")
                    continue
                mean = 1e3 * statistics.mean(r["times"])
                medians[r["case"].name] = r["ms"]
                ratio = f"{mean / (1e3 * base_mean):.2f}x" if base_mean else "-"
                print(
                    f"| {r['case'].name} | {mean:.1f} | {r['ms']:.1f} | {ratio} | {r['state'] / 2**20:.2f} | "
                    f"{len(r['times'])} |"
                )
        every, rare = medians.get("eopt.Shampoo (f=1)"), medians.get("eopt.Shampoo (f=100)")
        if every is not None and rare is not None:
            print(
                f"\none Shampoo root-inverse refresh (every factor of the model): {every - rare:.1f} ms "
                "(median step at f=1 minus median step at f=100, same configuration)"
            )


if __name__ == "__main__":
    main()
