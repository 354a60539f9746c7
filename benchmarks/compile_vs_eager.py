"""DenseNet-BC-100 (k=12) training steps on the CPU, eager and ``torch.compile``d, alternating in
one process on one model (so both see the same memory and allocator state): median forward and
backward+SGD seconds of each.

    python benchmarks/compile_vs_eager.py [--steps 8] [--threads 2]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from densenet import create_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("densenet_bc100_k12").train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(64, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    calls = {"eager": model, "compiled": torch.compile(model)}

    def step(call):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = F.cross_entropy(call(x), y)
        t1 = time.perf_counter()
        loss.backward()
        opt.step()
        return t1 - t0, time.perf_counter() - t1

    for _ in range(3):  # the first compiled step compiles
        for call in calls.values():
            step(call)
    times = {name: [] for name in calls}
    for _ in range(args.steps):
        for name, call in calls.items():
            times[name].append(step(call))
    print("| model | forward s | backward + SGD s | step s | img/s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        f, b = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        print(f"| {name} | {f:.3f} | {b:.3f} | {f + b:.3f} | {64 / (f + b):.1f} |")


if __name__ == "__main__":
    main()
