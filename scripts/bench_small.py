#!/usr/bin/env python
"""The small preset against its peers: r1c's ONNX Runtime bundle vs transformers (eager) vs the stock
torch.onnx export under ONNX Runtime, at batch 1 and 8, with the decode roofline (achieved / floor).

Builds /tmp/small and /tmp/small.bundle first when they are missing (~560 MB of float32 weights), then runs

    r1c bench /tmp/small.bundle --batch 1,8 --prompt-len 32 --new-tokens 16 --warmup 1 --repeat 5 --threads 1 \
        --peer transformers --peer stock-onnx --json /tmp/small-bench.json --plot /tmp/small-bench.png

One thread per system by default: on a shared 2-core machine a two-thread torch or ONNX Runtime pool stalls at
its barriers whenever another process takes a core (transformers measured 60x slower per token that way), so
two-thread numbers there say more about the neighbours than about the stacks. On a quiet machine pass
`--threads 0` (one per core). Extra arguments go to `r1c bench` and win over these (e.g. `--repeat 10`).
Usage: python scripts/bench_small.py [--workdir DIR] [R1C BENCH OPTIONS...]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def r1c(*args: str) -> None:
    cmd = [sys.executable, "-m", "r1c.cli", *args]
    print("+ r1c " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str]) -> int:
    workdir = Path("/tmp")
    if argv[:1] == ["--workdir"]:
        workdir, argv = Path(argv[1]), argv[2:]
    export, bundle = workdir / "small", workdir / "small.bundle"
    if not (bundle / "manifest.json").is_file():
        if not (export / "model.onnx").is_file():
            r1c("export", "--preset", "small", "-o", str(export))
        r1c("build", str(export), "-o", str(bundle))
    try:
        r1c("bench", str(bundle), "--batch", "1,8", "--prompt-len", "32", "--new-tokens", "16", "--warmup", "1",
            "--repeat", "5", "--threads", "1", "--peer", "transformers", "--peer", "stock-onnx",
            "--json", str(workdir / "small-bench.json"), "--plot", str(workdir / "small-bench.png"), *argv)
    except subprocess.CalledProcessError as e:
        return e.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
