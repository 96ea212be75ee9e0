"""Mission D training step cost: pt4 (all invariance terms) vs pt1 (cross-entropy only).

Both variants are built in-process at the smoke size of experiments/mission_d_sep.yml (the same
tiny GPT-2, the same init seed) on a Suite D train split drawn as prepare draws it, each with
its own AdamW. A step is what `pretrain` runs: `SepLoss` at that step (the clean forward, plus
for pt4 after thawing one bijective-scrambler view and one shuffle view: two extra forwards),
backward, gradient clipping and the optimizer step. The invariance weights are taken fully
thawed (the step is timed past `thaw_end`), so pt4 pays for every view.

Timing is interleaved: per step both variants run back to back, alternating which goes first,
after a warm-up; the ratio is the median over steps of (pt4 step time / pt1 step time) of the
same step. The last line is machine-readable:

    sep_step: invariance_overhead=<pt4 step / pt1 step>

Usage: python bench/sep_step.py [--steps N] [--warmup N] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bem_tasks.config.loader import load_fleet
from bem_tasks.data.splits import split_sizes
from bem_tasks.data.suites.scramble import make_scramble
from bem_tasks.missions.mission_d import SepLoss, WordVocab, _model, encode
from bem_tasks.missions.mission_d_params import MissionDParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = load_fleet(None, "smoke").params["mission_d"]
    assert isinstance(p, MissionDParams)
    d = p.data
    train = make_scramble(
        seed=d.seed, sizes=split_sizes(d.n_train, d.n_dev, d.n_test), n_ood=1,
        min_facts=d.min_facts, max_facts=d.max_facts,
    )["train"]  # fmt: skip
    vocab = WordVocab.of_suite()
    enc = encode(train, vocab)
    steppers = {}
    for v in ("pt1", "pt4"):
        model = _model(p, vocab, 0)
        model.train()
        weights = {str(k): w for k, w in p.invariance.variants[v].items()}
        loss = SepLoss(model, enc, train, vocab, weights, p, 0)
        opt = torch.optim.AdamW(model.parameters(), lr=p.pretraining.lr)
        steppers[v] = (model, loss, opt)
    start = max(p.invariance.thaw_end, p.invariance.thaw_start)

    def step(v: str, s: int) -> float:
        model, loss, opt = steppers[v]
        t = time.perf_counter()
        out = loss(s)
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t

    ratios, times = [], {"pt1": [], "pt4": []}
    for i in range(args.warmup + args.steps):
        order = ("pt1", "pt4") if i % 2 == 0 else ("pt4", "pt1")
        got = {v: step(v, start + i) for v in order}
        if i >= args.warmup:
            ratios.append(got["pt4"] / got["pt1"])
            for v in got:
                times[v].append(got[v])
    for v, ts in times.items():
        print(f"{v}: median step {1000 * statistics.median(ts):.2f} ms over {len(ts)} steps")
    print(f"sep_step: invariance_overhead={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
