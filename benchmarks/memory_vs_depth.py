"""Peak training memory of DenseNet-BC k=12 at L = 100, 190, 250, 400 (batch 64, 32x32), with a
linear fit and a plot, to show that the efficient block's memory grows linearly with depth.

    .venv/bin/python benchmarks/memory_vs_depth.py [--depth-reference] [--plot FILE]
"""

import sys

from densenet.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--plot" not in args:
        args += ["--plot", "benchmarks/memory_vs_depth.png"]
    sys.exit(main(["bench", "--depth-only", *args]))
