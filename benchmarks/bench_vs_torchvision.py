"""Our DenseNet against torchvision's, same architecture and weights (the issue's configurations).

    .venv/bin/python benchmarks/bench_vs_torchvision.py [densenet bench options]

A thin wrapper over ``densenet bench`` (densenet/bench.py), which documents what is measured.
"""

import sys

from densenet.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--depths", "", *sys.argv[1:]]))
