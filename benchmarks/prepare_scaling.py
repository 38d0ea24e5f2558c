"""How `prepare` scales with the corpus: throughput, the driver's and the workers' peak memory.

    python benchmarks/prepare_scaling.py                          # 4, 16, 64 MB: a few minutes on 2 cores
    python benchmarks/prepare_scaling.py --sizes-mb 50,200,800 --cpus 16 --vocab-size 32000

For each size it writes a corpus of mixed-script lines (English, lower-case English, digit-initial,
Chinese, Arabic) in files of `--file-mb` MB, prepares it (`data.format=lines`, `task=text`, a BPE
tokenizer trained on a `--sample-mb` sample) in a fresh driver process connected to one local Ray cluster,
and prints MB/s, samples/s, the driver's peak RSS and the largest worker's peak private RSS (every 100 ms).
It also prints the practical limit: plain `tokenizers` `encode_batch` of the same text (the corpus's first
`--limit-mb` MB: a rate) with the same tokenizer in one process on one thread (and, beside it,
`encode_batch_fast`, which prepare calls: the same ids without character offsets). Targets (issue 12):
throughput per core >= 0.7x that limit; the driver's peak at the largest size <= 1.2x its peak at the
smallest; workers' peaks flat. The issue's sizes (50, 200, 800 MB) take ~13 minutes on 2 cores. With
`--repeat N` each corpus is prepared N times, each run followed by its own limit; the table shows the median
run by per-core/limit and the range of that ratio over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
EN = ("the river runs past old mills and quiet farms while birds sing over fields of wheat and barley near "
      "a small town where people walk slowly in the evening light").split()
ZH = "我们今天在公园里散步看见很多小鸟在树上唱歌天气非常好大家都很高兴"
AR = "ذهب الولد إلى المدرسة في الصباح الباكر وكان الجو جميلا جدا".split()


def line(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return " ".join(rng.choice(EN) for _ in range(rng.randint(8, 30))).capitalize() + "."
    if kind == 1:
        return f"{rng.randint(1, 9999)} " + " ".join(rng.choice(EN) for _ in range(rng.randint(8, 30)))
    if kind == 2:
        return "".join(rng.choice(ZH) for _ in range(rng.randint(12, 60))) + "。"
    return " ".join(rng.choice(AR) for _ in range(rng.randint(8, 30)))


def write_corpus(folder: Path, mb: int, file_mb: int, seed: int = 0) -> tuple[int, int]:
    """`mb` MB of lines in files of `file_mb` MB; (bytes, lines)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total = lines = 0
    part = 0
    while total < mb << 20:
        with open(folder / f"part{part:04d}.txt", "w", encoding="utf-8") as f:
            written = 0
            while written < file_mb << 20 and total + written < mb << 20:
                text = line(rng) + "\n"
                f.write(text)
                written += len(text.encode())
                lines += 1
        total += written
        part += 1
    return total, lines


DRIVER = """
import json, resource, sys, time, ray
from data_pipeline import DataConfig, prepare
address, corpus, out, vocab, sample = sys.argv[1:]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
t = time.perf_counter()
m = prepare(DataConfig(dir=out, sources=[corpus], format="lines", task="text", vocab_size=int(vocab),
                       num_sentinels=100, shard_samples=10000, doc_lines=100, min_words=3,
                       tokenizer_sample_bytes=int(sample)), progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "samples": m.data["num_samples"],
                  "driver_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

LIMIT = """
import json, sys, time
from pathlib import Path
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
files = sorted(Path(sys.argv[2]).glob("*.txt"))
files = files[:max(1, int(sys.argv[3]) * len(files) // max(1, sum(f.stat().st_size for f in files) >> 20))]
texts = [f.read_text(encoding="utf-8").splitlines() for f in files]
size = sum(f.stat().st_size for f in files) / 2**20
rates = {}
for name in ("encode_batch", "encode_batch_fast"):
    encode, t = getattr(tok, name), time.perf_counter()
    for lines in texts:
        for i in range(0, len(lines), 1024):
            encode(lines[i:i + 1024], add_special_tokens=False)
    rates[name] = size / (time.perf_counter() - t)
print(json.dumps(rates))
"""


class WorkerPeak:
    """Largest private RSS (RSS less shared pages: the object store's memory-mapped objects that a task reads
    zero-copy are shared, not the worker's own) of any Ray worker process under this process, every 100 ms,
    and the largest per stage (the task name in the worker's process title). The process list is refreshed
    once a second: walking every process each sample cost ~18% of a core, which the measured prepare lost."""

    def __init__(self):
        self.peak, self.stages, self._stop = 0, {}, threading.Event()

    def _run(self) -> None:
        me, workers, listed = psutil.Process(), [], 0.0
        while not self._stop.wait(0.1):
            if time.monotonic() - listed > 1.0:
                workers, listed = [p for p in me.children(recursive=True) if _is_worker(p)], time.monotonic()
            for p in workers:
                try:
                    mem, title = p.memory_info(), p.cmdline()[0]
                except (psutil.Error, IndexError):
                    continue
                stage = title[5:] if title.startswith("ray::") else "idle"
                self.stages[stage] = max(self.stages.get(stage, 0), mem.rss - mem.shared)
                self.peak = max(self.peak, mem.rss - mem.shared)

    def __enter__(self):
        self.peak, self.stages = 0, {}
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _is_worker(p: psutil.Process) -> bool:
    try:
        name = p.name()  # Ray's agents (ray::DashboardAgent, ray::RuntimeEnvAgent) run no tasks
        return (name.startswith("ray::") and not name.endswith("Agent")) or "default_worker" in " ".join(p.cmdline()[:3])
    except psutil.Error:
        return False


def run_json(code: str, *args: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, check=True, capture_output=True,
                         text=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="4,16,64")
    ap.add_argument("--file-mb", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--sample-mb", type=int, default=4, help="data.tokenizer_sample_bytes, in MB")
    ap.add_argument("--limit-mb", type=int, default=64,
                    help="measure the limit on the corpus's first files up to this many MB (a rate: the same "
                         "text, without minutes of encoding at 800 MB)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="prepare each corpus this many times, each followed by its limit; the table shows the "
                         "median run (by per-core/limit) and the ratio's spread: this machine's speed moves a few "
                         "percent between runs")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="prepare_scaling_"))
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    rows, stages = [], []
    try:
        for mb in map(int, args.sizes_mb.split(",")):
            corpus, out = work / f"corpus{mb}", work / f"out{mb}"
            size, _ = write_corpus(corpus, mb, args.file_mb)
            runs = [measure(args, address, mb, corpus, out, size) for _ in range(args.repeat)]
            runs.sort(key=lambda run: run[0][6])  # by per-core/limit
            row, peaks = runs[len(runs) // 2]
            rows.append((*row, runs[0][0][6], runs[-1][0][6]))
            stages.append((mb, peaks))
            shutil.rmtree(corpus)
            shutil.rmtree(out)
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows, args.cpus)
    print("largest worker private RSS MB by stage (the task running when sampled):")
    for mb, peaks in stages:
        print(f"{mb:>9} MB  " + "  ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(peaks.items())))


def measure(args, address: str, mb: int, corpus: Path, out: Path, size: int) -> tuple[tuple, dict]:
    """One prepare of `corpus` in a fresh driver, then the limit on its tokenizer: (the table's row, the
    largest worker per stage)."""
    shutil.rmtree(out, ignore_errors=True)
    with WorkerPeak() as workers:
        got = run_json(DRIVER, address, str(corpus), str(out), str(args.vocab_size), str(args.sample_mb << 20))
    limits = run_json(LIMIT, str(out / "tokenizer.json"), str(corpus), str(args.limit_mb),
                      env={"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"})
    limit, fast = limits["encode_batch"], limits["encode_batch_fast"]
    mbps = size / 2**20 / got["seconds"]
    return (mb, mbps, got["samples"] / got["seconds"], got["driver_rss"], workers.peak, limit,
            mbps / args.cpus / limit, fast, mbps / args.cpus / fast), dict(workers.stages)


def print_table(rows: list[tuple], cpus: int) -> None:
    print(f"prepare scaling ({cpus} CPUs; limit = tokenizers encode_batch, 1 process, 1 thread; "
          "fast = encode_batch_fast, the call prepare makes, the same way)")
    print(f"{'corpus MB':>9} {'MB/s':>7} {'samples/s':>10} {'driver RSS MB':>13} {'worker MB':>13} "
          f"{'limit MB/s':>10} {'per-core/limit':>14} {'fast MB/s':>9} {'per-core/fast':>13} {'per-core range':>17}")
    for mb, mbps, sps, drv, wrk, limit, ratio, fast, fast_ratio, low, high in rows:
        print(f"{mb:>9} {mbps:>7.2f} {sps:>10.0f} {drv / 2**20:>13.0f} {wrk / 2**20:>13.0f} {limit:>10.2f} "
              f"{ratio:>14.2f} {fast:>9.2f} {fast_ratio:>13.2f} {f'{low:.2f}-{high:.2f}':>17}")
    if len(rows) > 1:
        print(f"driver peak, largest/smallest: {rows[-1][3] / rows[0][3]:.2f}x (target <= 1.2x); "
              f"worker peak, largest/smallest: {rows[-1][4] / max(rows[0][4], 1):.2f}x")


if __name__ == "__main__":
    main()
