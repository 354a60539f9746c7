"""One prepared check for a lent GPU: the device tests and the benchmark commands, one table.

    python benchmarks/gpu_check.py --device cuda --out gpu.json   # on the GPU, under 10 minutes
    python benchmarks/gpu_check.py --device cpu --quick            # the same driver on a CPU

Everything runs as commands, each in its own process with a timeout out of one time budget
(``--budget-s``: 540 s on CUDA); this script only turns what they report into rows. In run
order (``--only`` picks sections, comma-separated):

  tests        pytest -m cuda tests/test_devices.py (on a CPU its twins, -m cpu): the efficient
               path against the reference in float32 (TF32 off), float64, with dropout, under
               bf16 autocast and torch.compile; the fused kernels counted; densenet train eager
               against --cuda-graph. One row per test.
  speed        densenet bench: DenseNet-BC-100 b64 training and inference, ours against
               torchvision (plain, channels_last, memory_efficient)
  train        densenet train on the packaged CIFAR-10 sample, eager and (CUDA) --cuda-graph
  depth        densenet bench --depth-only: peak training memory against depth, ours and the
               reference (plain modules); running out of memory is a row
  densenet121  densenet bench --model densenet121 (224 px)
  speed        densenet bench --modes: ours against the reference eager and under bf16
               autocast, then compiled (last: the slow, unpredictable part)

At the end one markdown table (| section | row | value | status | notes |) is printed and
written with the numbers as JSON to ``--out``, each command's output beside it (OUT.logs/). A
FAIL or ERROR row makes the exit status 1; a command the budget no longer covers is SKIP.
``--device cuda`` where PyTorch sees no GPU exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("tests", "speed", "train", "depth", "densenet121")
TESTS = "tests/test_devices.py"


def sizes(quick: bool) -> dict:
    """Each command's sizes: the full check, or ``--quick`` (tiny models, one step each)."""
    if quick:
        one = ["--steps", "1", "--warmup", "0", "--repeats", "1"]
        return dict(speed=["--model", "densenet_bc16_k4", "--batch-size", "4", "--infer-batch-size", "4", *one],
                    depth=["--depths", "16,22"], train=["--model", "densenet_bc16_k4", "--epochs", "1"],
                    densenet121=["--batch-size", "1", "--infer-batch-size", "1", "--size", "64", *one])
    timed = ["--warmup", "5", "--repeats", "1"]
    return dict(speed=["--model", "densenet_bc100_k12", "--batch-size", "64", "--steps", "20", *timed],
                depth=["--depths", "100,250,500,1000"], train=["--model", "densenet_bc100_k12", "--epochs", "3"],
                densenet121=["--batch-size", "64", "--infer-batch-size", "64", "--steps", "10", *timed])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Check:
    def __init__(self, device: str, budget: float, logs: Path):
        self.device, self.budget, self.logs = device, budget, logs
        self.t0, self.rows, self.commands = time.perf_counter(), [], []

    def add(self, section, row, value, status="", notes="", **data):
        self.rows.append(dict(section=section, row=row, value=value, status=status, notes=notes, data=data))

    def command(self, section, label, args, share, ok=(0,)):
        """``python ARGS`` with ``share`` of the budget at most; its result, or None when it did
        not finish with a status in ``ok`` (a row then says why)."""
        left = self.budget - (time.perf_counter() - self.t0)
        if left < 5:
            self.add(section, label, "not run", "SKIP", f"the {self.budget:g} s budget is spent")
            return None
        timeout = min(left, share * self.budget)
        log(f"[{time.perf_counter() - self.t0:5.0f} s] {section}: {label} (timeout {timeout:.0f} s)")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and every process it started
            out, err = proc.communicate()
            killed = True
        wall = time.perf_counter() - t
        path = self.logs / f"{len(self.commands) + 1:02d}-{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.txt"
        path.write_text(f"$ python {' '.join(args)}\nexit status {proc.returncode}, {wall:.1f} s\n"
                        f"--- stdout\n{out}\n--- stderr\n{err}")
        self.commands.append(dict(section=section, label=label, args=args, rc=proc.returncode, wall_s=wall,
                                  log=str(path)))
        tail = " ".join(err.strip().splitlines()[-3:])[-400:]
        if killed:
            cut = timeout >= left - 1  # stopped by the budget's end, not by its own share
            self.add(section, label, f"killed after {wall:.0f} s", "SKIP" if cut else "ERROR",
                     ("the budget ran out" if cut else f"over its {timeout:.0f} s share") + f"; {path.name}")
            return dict(out=out, wall=wall, killed=True)
        if proc.returncode not in ok:
            self.add(section, label, f"exit status {proc.returncode}", "ERROR", f"{tail} ({path.name})")
            return None
        return dict(out=out, wall=wall, killed=False)


def test_rows(check: Check, marker: str) -> None:
    xml = check.logs / "tests.xml"
    done = check.command("tests", f"pytest -m {marker} {TESTS}",
                         ["-m", "pytest", "-m", marker, TESTS, "-v", "-rfEs", "-p", "no:cacheprovider",
                          f"--junitxml={xml}"], share=0.35, ok=(0, 1))
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            status, note = "PASS", ""
            for tag, word in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "SKIP")):
                if case.find(tag) is not None:
                    status, note = word, case.find(tag).get("message", "")
                    break
            check.add("tests", case.get("name"), f"{float(case.get('time', 0)):.1f} s", status, note)
    elif done is not None:  # killed: the tests that finished, from pytest -v's lines
        for name, word in re.findall(r"::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", done["out"]):
            check.add("tests", name, "", {"PASSED": "PASS", "FAILED": "FAIL", "SKIPPED": "SKIP"}.get(word, word))
    if done is not None and not done["killed"] and not any(r["section"] == "tests" for r in check.rows):
        check.add("tests", f"pytest -m {marker}", "no test ran", "ERROR")


def bench(check: Check, section: str, label: str, args, share: float):
    done = check.command(section, label, ["-m", "densenet", "bench", "--device", check.device, "--json", *args], share)
    return json.loads(done["out"]) if done and not done["killed"] else None


PEAK = "peak: one training step's growth of allocated memory (densenet bench)"


def compare_rows(check: Check, section: str, report: dict | None) -> None:
    if report is None:  # the command failed: its row says so
        return
    names = {"ours": "ours", "tv": "torchvision", "tv-cl": "torchvision channels_last",
             "tv-me": "torchvision memory_efficient"}
    for res in report["results"]:
        s = res["summary"]
        for label, name in names.items():
            tr, inf = s[f"train:{label}"], s.get(f"infer:{label}")
            check.add(section, f"{res['model']} b{res['train_batch']} {res['size']}px {name}",
                      f"train {tr['images_per_s']:.1f} img/s, peak {tr['peak_mib']:.0f} MiB"
                      + (f"; infer b{res['infer_batch']} {inf['images_per_s']:.1f} img/s" if inf else ""),
                      notes=PEAK, train=tr, infer=inf)
        r = res["ratios"]
        check.add(section, f"{res['model']} ours / torchvision",
                  f"train speed {r['train_speed_vs_tv_best']:.2f}x, peak {r['peak_vs_tv_plain']:.2f}x",
                  notes=", ".join(f"{k} {v:.2f}" for k, v in r.items()), **r)


def modes_rows(check: Check, report: dict | None) -> None:
    if report is None:
        return
    res = report["modes"]
    for key, r in res["summary"].items():
        mode, variant = key.split(":")
        check.add("speed", f"{res['model']} b{res['batch']} {mode} {'ours' if variant == 'ours' else 'reference'}",
                  f"train {r['images_per_s']:.1f} img/s, peak {r['peak_mib']:.0f} MiB",
                  notes=f"first step {r['first_step_s']:.1f} s; reference: the plain modules; {PEAK}", **r)
    check.add("speed", f"{res['model']} {', '.join(sorted({k.split(':')[0] for k in res['summary']}))}: "
              f"ratios", ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()), **res["ratios"])


def depth_rows(check: Check, report: dict | None) -> None:
    if report is None:
        return
    m = report["memory_vs_depth"]
    for r in m["rows"]:
        name = "ours" if r["variant"] == "ours" else "reference"
        check.add("depth", f"DenseNet-BC L={r['depth']} k=12 b64 {name}",
                  "out of memory" if r.get("oom") else f"{r['peak_mib']:.0f} MiB",
                  notes="" if r.get("oom") else f"{r['images_per_s']:.1f} img/s; {PEAK}", **r)
    if m["fit"]:
        f = m["fit"]
        check.add("depth", "ours: linear fit", f"{f['intercept_mib']:.0f} MiB + {f['mib_per_depth']:.2f} MiB x L",
                  notes=f"worst relative residual {f['worst_relative_residual']:.3f}", **f)


def train_rows(check: Check, args, runs_dir: Path) -> None:
    cuda = check.device == "cuda"
    losses = {}
    for how in ["eager"] + (["--cuda-graph"] if cuda else []):
        out = runs_dir / how.strip("-")
        done = check.command("train", f"densenet train {how}",
                             ["-m", "densenet", "train", "--recipe", "quickstart", *args, "--device", check.device,
                              "--seed", "0", "--quiet", "--out", str(out)] + ([how] if how != "eager" else []), 0.2)
        if done is None or done["killed"]:  # its row says why
            continue
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        result = json.loads((out / "result.json").read_text())
        losses[how] = [r["train_loss"] for r in rows]
        notes = "epoch train losses " + ", ".join(f"{v:.4f}" for v in losses[how])
        if how != "eager" and "eager" in losses:
            rel = max(abs(a - b) / abs(b) for a, b in zip(losses[how], losses["eager"]))
            notes += f"; max relative difference to eager {rel:.1e} (the test judges it: {TESTS})"
        ips = statistics.median(r["images_per_s"] for r in rows)
        acc = None if result.get("test_error") is None else 1 - result["test_error"]
        check.add("train", f"densenet train {how}: {args[1]} quickstart, {len(rows)} epochs",
                  f"{done['wall']:.0f} s, {ips:.0f} img/s" + (f", test accuracy {acc:.1%}" if acc is not None else ""),
                  notes=notes + "; whole command: data, epochs, checkpoints, test", wall_s=done["wall"],
                  img_s=ips, test_accuracy=acc, train_losses=losses[how])


def environment(device: str) -> dict:
    import torch
    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               cpus=os.cpu_count(), machine=platform.processor() or platform.machine())
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(),
                   tf32=(f"cudnn conv fp32_precision={conv}, matmul {torch.backends.cuda.matmul.fp32_precision}"
                         if conv else f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                         f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}"))
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: minutes on a CPU")
    ap.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--out", help="write the table and the numbers as JSON here (command output in OUT.logs/)")
    ap.add_argument("--budget-s", type=float, help="seconds for all commands (default 540 on CUDA, 1800 on a CPU)")
    args = ap.parse_args(argv)
    only = [s.strip() for s in (args.only or ",".join(SECTIONS)).split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        log(f"gpu_check: --device cuda was asked for but CUDA is not available here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use --device cpu.")
        return 2
    budget = args.budget_s or (540.0 if device == "cuda" else 1800.0)
    logs = Path(args.out).with_suffix(".logs") if args.out else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    logs.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    header = (f"gpu_check: {'quick' if args.quick else 'full'} check on {device}, budget {budget:g} s; "
              + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(header, flush=True)
    check, size = Check(device, budget, logs), sizes(args.quick)
    with tempfile.TemporaryDirectory() as runs:
        parts = [("tests", lambda: test_rows(check, device)),
                 ("speed", lambda: compare_rows(check, "speed", bench(check, "speed", "densenet bench",
                                                                      [*size["speed"], "--depths", ""], 0.2))),
                 ("train", lambda: train_rows(check, size["train"], Path(runs))),
                 ("depth", lambda: depth_rows(check, bench(check, "depth", "densenet bench --depth-only",
                                                           ["--depth-only", "--depth-reference", *size["depth"]], 0.25))),
                 ("densenet121", lambda: compare_rows(check, "densenet121", bench(
                     check, "densenet121", "densenet bench --model densenet121",
                     [*size["densenet121"], "--model", "densenet121", "--depths", ""], 0.2))),
                 ("speed", lambda: modes_rows(check, bench(check, "speed", "densenet bench --modes eager,bf16",
                                                           [*size["speed"], "--modes", "eager,bf16"], 0.15))),
                 ("speed", lambda: modes_rows(check, bench(check, "speed", "densenet bench --modes compile",
                                                           [*size["speed"], "--modes", "compile"], 1.0)))]
        for section, part in parts:
            if section in only:
                try:
                    part()
                except Exception as e:  # output this script did not expect: that part's row
                    check.add(section, "reading the output", f"{type(e).__name__}: {e}"[:300], "ERROR")
    order = {s: i for i, s in enumerate(SECTIONS)}
    rows = sorted(check.rows, key=lambda r: order[r["section"]])  # stable: run order within a section
    cell = lambda v: str(v).replace("|", "/").replace("\n", " ")  # noqa: E731
    table = "\n".join(["| section | row | value | status | notes |", "|---|---|---|---|---|"]
                      + ["| " + " | ".join(cell(r[k]) for k in ("section", "row", "value", "status", "notes")) + " |"
                         for r in rows])
    counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
    total = time.perf_counter() - check.t0
    summary = f"{len(rows)} rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {total:.0f} s"
    print(f"\n{table}\n\n{summary}", flush=True)
    code = 1 if counts["FAIL"] or counts["ERROR"] else 0
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            header=header, environment=env, device=device, quick=args.quick, budget_s=budget, sections=only,
            rows=rows, commands=check.commands, table=table, summary=summary, total_s=total, exit_code=code),
            indent=1, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
