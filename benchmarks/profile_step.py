"""Where one training step of our DenseNet goes: torch.profiler's table for a step, and the step
time with the fused element-wise kernels replaced by no-ops (``--floor``: wrong numbers, right
timing of everything else - how fast the step could be if the element-wise work were free).

    .venv/bin/python benchmarks/profile_step.py [--model densenet_bc100_k12] [--floor]
"""

import argparse
import statistics
import time

import torch

from densenet.ops import cpu as kernels
from densenet.bench import CONFIGS, build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="densenet_bc100_k12", choices=sorted(CONFIGS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--floor", action="store_true", help="element-wise kernels as no-ops")
    args = p.parse_args()
    if args.floor:
        kernels.bn_relu = lambda x, s, t, out: out
        kernels.col_stats = lambda x, state=None: ((torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
                                                   if state is None else state)
        kernels.bn_relu_grad = lambda x, g, s, t, mu, dx=None, sums=None, z=None, assign=False: sums
        kernels.bn_grad_apply = lambda x, g, s, t, mu, a, b, out: out
        kernels.col_affine_add = lambda x, c, k, src, out: out
        kernels.copy_cols = lambda src, dst: dst
        kernels.bn_relu_maxpool = lambda x, s, t, k, st, pad, out: out
        kernels.bn_relu_maxpool_grad = lambda x, s, t, mu, k, st, pad, gout, dx, sums=None: (
            torch.zeros(2, x.shape[-1], dtype=torch.float64) if sums is None else sums)
    batch, _, size = CONFIGS[args.model]
    torch.manual_seed(0)
    model = build(args.model, "ours").to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, model.classifier.out_features, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(f"{args.model} batch {batch}{' (kernels as no-ops)' if args.floor else ''}: "
          f"median step {med:.3f} s, {batch / med:.1f} img/s, {torch.get_num_threads()} threads")
    if not args.floor:
        from torch.profiler import profile
        with profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
