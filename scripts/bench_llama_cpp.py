#!/usr/bin/env python
"""r1c against llama.cpp on the CPU, side by side in one process, at every precision (issue 11).

The model: a DeepSeek-V3 checkpoint made with transformers (`DeepseekV3ForCausalLM`, r1c's seeded weights,
`save_pretrained`): 4 layers, hidden 1024, 64 routed experts top-8 in 8 groups (4 kept), one shared expert,
MLA (q_lora 384, kv_lora 256), YaRN; ~188M parameters, ~47.5M read per decoded token.
Both systems run the same weights:
  r1c:       r1c export -> r1c build --precision fp32 | int8 | int4 (ONNX Runtime bundles)
  llama.cpp: llama.cpp's convert_hf_to_gguf.py (F32; from llama-cpp-python's sdist, with the `gguf` package)
             -> its quantizer (llama_model_quantize) to Q8_0, Q4_0, Q4_K_M -> llama-cpp-python's llama_decode
and pairs are timed interleaved (one call of each per round, `r1c.runtime.bench.runner.run_bench`): decode
(TPOT) and prefill of a 128-token prompt (TTFT), batch 1 and 8, 1 and 2 threads; r1c int4 (128-blocks, 4.25
bits) against both Q4_0 (32-blocks, 4.5 bits) and Q4_K_M (256-superblocks). Each system's decode floor is its
own bytes per step (r1c: the bundle's initializers; llama.cpp: the GGUF's tensors) / the read bandwidth, which is
timed as a third system in the same rounds (`roofline.ReadProbe`: r1c's bytes per step streamed from memory
once per token of --new-tokens, on the same threads), so a round's floor and steps see the same bandwidth: % of
floor = the probe's TPOT (scaled to the system's bytes) / the system's, with a bootstrap interval for r1c. The
read bandwidth is also measured before and after each pair (`measure_read_bandwidth`), and % of floor against the
higher of those two passes is reported beside it (`*_of_floor_passes`; this VM's bandwidth changes within
seconds, so a pass can meet another bandwidth than the timing did). Before each pair loads, both systems'
weight files are dropped from the page cache (`posix_fadvise` DONTNEED), so both read them afresh.
Accuracy: teacher-forced logits over `--accuracy-tokens` positions against transformers' float32 model
(relative error per position = max |l - ref| / max |ref|: mean and max over positions; top-1 agreement);
greedy tokens of r1c fp32, llama.cpp F32 and transformers compared.

Needs llama-cpp-python compiled here (not a dependency of r1c; ~6-25 min):
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python --no-binary llama-cpp-python; pip install gguf
and the llama.cpp sources of its sdist (`--llama-src`; default: downloaded with `pip download` and unpacked).
Usage: python scripts/bench_llama_cpp.py [--workdir DIR] [--threads 1,2] [--batch 1,8] [--repeat 5] ...
Writes DIR/report-<clock>-t<threads>.json and prints markdown tables (ratios > 1: r1c is faster).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

PAIRS = (("fp32", "F32"), ("int8", "Q8_0"), ("int4", "Q4_0"), ("int4", "Q4_K_M"))
ORT_MOE = "fp32 ORT MoE"  # timed beside the fp32 pair when the fp32 bundle runs r1c's CPU kernels (MoE, Linear)
PROBE = "read probe"  # the bandwidth floor timed in the same rounds (roofline.ReadProbe)


def bench_config() -> Any:
    from r1c.config import preset

    return preset("small").replace(vocab_size=8192, hidden_size=1024, num_hidden_layers=4, intermediate_size=2048,
                                   moe_intermediate_size=256, num_attention_heads=16, q_lora_rank=384,
                                   kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_checkpoint(out: Path, seed: int) -> None:
    """transformers' DeepseekV3ForCausalLM with r1c's seeded weights (activations O(1), routing spread), saved
    by transformers in the DeepSeek per-expert layout that llama.cpp's converter and r1c both read."""
    import torch
    import transformers

    from r1c.exporter.checkpoint import random_checkpoint

    config = bench_config()
    hf_config = transformers.DeepseekV3Config(**config.to_hf_dict())
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(hf_config)
    model.load_state_dict(random_checkpoint(config, seed=seed), strict=True, assign=True)
    model.save_pretrained(str(out))


def r1c_cli(*args: str) -> None:
    say("r1c " + " ".join(args))
    subprocess.run([sys.executable, "-m", "r1c.cli", *args], check=True)


def llama_sources(workdir: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    found = sorted(workdir.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    say("downloading llama-cpp-python's sdist for llama.cpp's converter")
    subprocess.run([sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-binary", ":all:", "--no-deps",
                    "-d", str(workdir)], check=True)
    sdist = sorted(workdir.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    return sorted(workdir.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def prepare(workdir: Path, llama_src: Path | None, seed: int) -> dict[str, Path]:
    from r1c.runtime.bench.llama_cpp import convert_to_gguf, quantize_gguf

    ckpt, export = workdir / "ckpt", workdir / "export"
    if not (ckpt / "config.json").is_file():
        say("making the checkpoint with transformers")
        make_checkpoint(ckpt, seed)
    # r1c's export and bundles are made anew by every run (seconds): what is measured is this r1c, never a bundle
    # an older r1c left in the workdir; the checkpoint and llama.cpp's GGUFs (minutes) are kept
    shutil.rmtree(export, ignore_errors=True)
    r1c_cli("export", str(ckpt), "-o", str(export), "--no-progress")
    paths = {"ckpt": ckpt}
    for precision in dict.fromkeys(p for p, _ in PAIRS):
        bundle = workdir / f"r1c-{precision}"
        shutil.rmtree(bundle, ignore_errors=True)
        r1c_cli("build", str(export), "-o", str(bundle), "--precision", precision, "--threads", "2")
        paths[precision] = bundle
    ort_moe = workdir / "r1c-fp32-ort-moe"  # the fp32 bundle on ONNX Runtime's MoE and MLAS instead of r1c's kernels
    shutil.rmtree(ort_moe, ignore_errors=True)
    r1c_cli("build", str(export), "-o", str(ort_moe), "--precision", "fp32", "--threads", "2", "--cpu-moe", "ort")
    paths[ORT_MOE] = ort_moe
    f32 = workdir / "llama-F32.gguf"
    if not f32.is_file():
        say("llama.cpp: convert_hf_to_gguf --outtype f32")
        convert_to_gguf(ckpt, f32, llama_sources(workdir, llama_src))
    paths["F32"] = f32
    for _, ftype in PAIRS[1:]:
        path = workdir / f"llama-{ftype}.gguf"
        if not path.is_file():
            say(f"llama.cpp: quantize to {ftype}")
            quantize_gguf(f32, path, ftype)
        paths[ftype] = path
    return paths


# ---- accuracy ------------------------------------------------------------------------------------------------
def accuracy(paths: dict[str, Path], tokens: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch
    import transformers

    from r1c.runtime import load
    from r1c.runtime.bench.llama_cpp import LlamaCppGenerator

    vocab = bench_config().vocab_size
    rng = np.random.default_rng(seed)
    seq_len = 64
    seqs = rng.integers(2, vocab, size=(max(1, tokens // seq_len), seq_len))
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(str(paths["ckpt"]), dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = model(torch.from_numpy(seqs)).logits.numpy()
        prompts = seqs[:4, :16]
        hf_tokens = model.generate(torch.from_numpy(prompts), max_new_tokens=32, do_sample=False,
                                   attention_mask=torch.ones_like(torch.from_numpy(prompts)))[:, 16:].tolist()
    del model
    rows = []
    greedy: dict[str, Any] = {"transformers": hf_tokens}
    done: set[str] = set()
    for precision, ftype in PAIRS:
        got: dict[str, np.ndarray] = {}
        if precision not in done:
            done.add(precision)
            engine = load(paths[precision], session_options={"intra_op_num_threads": 2})
            got[f"r1c {precision}"] = engine.forward(seqs)
            if precision == "fp32":
                greedy["r1c fp32"] = engine.generate(prompts.tolist(), 32)
            del engine
        llama = LlamaCppGenerator(paths[ftype], threads=2, max_batch=4, max_prompt=seq_len, max_tokens=seq_len + 32)
        got[f"llama.cpp {ftype}"] = np.stack([llama.logits(s) for s in seqs])
        if ftype == "F32":
            greedy["llama.cpp F32"] = llama.generate(prompts.tolist(), 32)
        llama.close()
        for name, logits in got.items():
            err = np.abs(logits - ref).max(-1) / np.abs(ref).max(-1)  # per position
            rows.append({"system": name, "positions": int(err.size), "mean_rel_err": float(err.mean()),
                         "max_rel_err": float(err.max()), "top1": float((logits.argmax(-1) == ref.argmax(-1)).mean())})
            say(f"accuracy {name}: mean {err.mean():.2e} max {err.max():.2e} top-1 {rows[-1]['top1']:.3f}")
    greedy["equal"] = {k: v == hf_tokens for k, v in greedy.items() if k != "transformers"}
    return rows, greedy


# ---- speed -----------------------------------------------------------------------------------------------------
def evict_from_page_cache(*paths: Path) -> None:
    """Drop the clean page-cache pages of these weight files (a bundle's directory: its model.onnx.data), so that
    both systems map weights freshly read from disk. The page cache's state moved one bundle's decode step by 20-35%
    against an identical copy here (scripts/ab_step.py), and r1c's bundles are rebuilt every run while the GGUFs
    are kept: without this, the older files' pages would decide part of the ratio."""
    for path in paths:
        for f in ([path / "model.onnx.data"] if path.is_dir() else [path]):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def speed(paths: dict[str, Path], threads: list[int], batches: list[int], prompt_len: int, new_tokens: int,
          repeat: int, warmup: int, clock: str = "wall") -> list[dict[str, Any]]:
    from r1c.manifest import read_manifest
    from r1c.runtime import load
    from r1c.runtime.bench.compare import ratios
    from r1c.runtime.bench.llama_cpp import LlamaCppGenerator, gguf_reads
    from r1c.runtime.bench.roofline import ReadProbe, bundle_reads, decode_floor, measure_read_bandwidth
    from r1c.runtime.bench.runner import Settings, System, Workload, run_bench

    config = bench_config()
    rows = []
    settings = Settings(warmup=warmup, repeat=repeat, clock=clock)
    for t in threads:
        say(f"measuring the read bandwidth with {t} thread(s)")
        before = measure_read_bandwidth(threads=t)
        for precision, ftype in PAIRS:
            manifest = read_manifest(paths[precision])
            r1c_reads, _ = bundle_reads(paths[precision], manifest)
            llama_reads = gguf_reads(paths[ftype])
            evict_from_page_cache(paths[precision], paths[ftype], paths[ORT_MOE])
            engine = load(paths[precision], session_options={"intra_op_num_threads": t})
            llama = LlamaCppGenerator(paths[ftype], threads=t, max_batch=max(batches), max_prompt=prompt_len,
                                      max_tokens=prompt_len + new_tokens)
            systems = [System(f"r1c {precision}", engine, required=True),
                       System(f"llama.cpp {ftype}", llama, info=llama.info, required=True)]
            with_ort_moe = precision == "fp32" and manifest.target_options.get("cpu_moe") == "r1c"
            if with_ort_moe:
                ort_engine = load(paths[ORT_MOE], session_options={"intra_op_num_threads": t})
                systems.append(System(f"r1c {ORT_MOE}", ort_engine, required=True))
            # the floor timed as a peer in the same rounds (roofline.ReadProbe: r1c's bytes per decode step
            # streamed from memory), so each round's floor and the systems' steps see the same bandwidth
            def r1c_step_bytes(b: int, reads: Any = r1c_reads) -> float:  # r1c's bytes per decode step at batch b
                return decode_floor(reads, config, b, prompt_len, new_tokens, bandwidth=1.0).bytes_active

            probe = ReadProbe(r1c_step_bytes, threads=t)
            systems.append(System(PROBE, probe, info=probe.info, required=True))
            workloads = [Workload(b, prompt_len, new_tokens) for b in batches]
            say(f"timing r1c {precision} vs llama.cpp {ftype}, {t} thread(s), batch {batches}")
            series = run_bench(systems, workloads, config.vocab_size, settings)
            # measured again right after the pair: this VM's bandwidth drifts (2 threads: 30-35 GB/s or 54-56 from
            # one minute to the next), and the floor takes the higher of the two passes around the pair's timing
            # (the stricter floor), not one measurement minutes earlier
            after = measure_read_bandwidth(threads=t)
            bandwidth, passes, before = max(before, after), [before / 1e9, after / 1e9], after
            by = {(s.system, s.workload.batch): s for s in series}
            ratio = {(r["system"], r["batch"]): r for r in ratios(series, f"r1c {precision}")}
            for b in batches:
                r1c_s, llama_s = by[(f"r1c {precision}", b)], by[(f"llama.cpp {ftype}", b)]
                rr = ratio[(f"llama.cpp {ftype}", b)]
                row: dict[str, Any] = {"threads": t, "batch": b, "r1c": precision, "llama.cpp": ftype, "clock": clock,
                                       "bandwidth_GBs": bandwidth / 1e9, "bandwidth_passes_GBs": passes,
                                       "tokens_match": rr.get("tokens_match")}
                probe_tpot = by[(PROBE, b)].summary()["tpot_s"].p50
                r1c_bytes = r1c_step_bytes(b)
                row["probe_GBs"] = r1c_bytes / probe_tpot / 1e9
                for name, s, reads in (("r1c", r1c_s, r1c_reads), ("llama", llama_s, llama_reads)):
                    summ = s.summary()
                    floor = decode_floor(reads, config, b, prompt_len, new_tokens, bandwidth=bandwidth)
                    tpot, ttft = summ["tpot_s"].p50, summ["ttft_s"].p50
                    row[f"{name}_tpot_ms"], row[f"{name}_ttft_ms"] = tpot * 1e3, ttft * 1e3
                    # against the probe of the same rounds (the headline), and against the higher of the two
                    # bandwidth passes around the pair (stricter when the bandwidth changed during the pair)
                    row[f"{name}_floor_ms"] = probe_tpot * floor.bytes_active / r1c_bytes * 1e3
                    row[f"{name}_of_floor"] = row[f"{name}_floor_ms"] / 1e3 / tpot
                    row[f"{name}_of_floor_passes"] = floor.floor_active_s / tpot
                pr = ratio[(PROBE, b)]["tpot_s"]  # probe TPOT / r1c TPOT per round: r1c's achieved/floor, with CI
                row["r1c_of_floor_ci"] = {k: pr[k] for k in ("ratio", "low", "high")}
                for m in ("tpot_s", "ttft_s"):
                    row[f"speedup_{m[:4]}"] = {k: rr[m][k] for k in ("ratio", "low", "high")}
                if with_ort_moe:  # r1c's kernel against ORT's MoE: speedup = ORT MoE time / kernel time
                    om = ratio[(f"r1c {ORT_MOE}", b)]
                    summ = by[(f"r1c {ORT_MOE}", b)].summary()
                    row["ort_moe_tpot_ms"], row["ort_moe_ttft_ms"] = summ["tpot_s"].p50 * 1e3, summ["ttft_s"].p50 * 1e3
                    row["kernel_vs_ort_moe"] = {m[:4]: {k: om[m][k] for k in ("ratio", "low", "high")}
                                                for m in ("tpot_s", "ttft_s")}
                    say(f"  B={b}: r1c's CPU kernels vs ORT's MoE and MLAS: decode x{om['tpot_s']['ratio']:.2f}, "
                        f"prefill x{om['ttft_s']['ratio']:.2f}")
                rows.append(row)
                say(f"  B={b}: TPOT r1c {row['r1c_tpot_ms']:.2f} ms llama {row['llama_tpot_ms']:.2f} ms "
                    f"(x{row['speedup_tpot']['ratio']:.2f}); prefill r1c {row['r1c_ttft_ms']:.0f} llama "
                    f"{row['llama_ttft_ms']:.0f} ms; r1c {row['r1c_of_floor']:.0%} of floor (probe "
                    f"{row['probe_GBs']:.1f} GB/s in the same rounds; {row['r1c_of_floor_passes']:.0%} against the "
                    f"read bandwidth {passes[0]:.1f} / {passes[1]:.1f} GB/s before / after)")
            llama.close()
            del engine
            if with_ort_moe:
                del ort_engine
    return rows


def tables(speed_rows: list[dict[str, Any]], acc_rows: list[dict[str, Any]], greedy: dict[str, Any]) -> str:
    out = ["| threads | batch | r1c vs llama.cpp | decode ms/token r1c / llama | speedup (95% CI) | "
           "prefill 128 ms r1c / llama | speedup (95% CI) | % of floor r1c [95% CI] / llama (against the passes) | "
           "same tokens |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in speed_rows:
        d, p = r["speedup_tpot"], r["speedup_ttft"]
        out.append(f"| {r['threads']} | {r['batch']} | {r['r1c']} vs {r['llama.cpp']} | {r['r1c_tpot_ms']:.2f} / "
                   f"{r['llama_tpot_ms']:.2f} | {d['ratio']:.2f} [{d['low']:.2f}, {d['high']:.2f}] | "
                   f"{r['r1c_ttft_ms']:.0f} / {r['llama_ttft_ms']:.0f} | {p['ratio']:.2f} [{p['low']:.2f}, "
                   f"{p['high']:.2f}] | {r['r1c_of_floor']:.0%} [{r['r1c_of_floor_ci']['low']:.0%}, "
                   f"{r['r1c_of_floor_ci']['high']:.0%}] / {r['llama_of_floor']:.0%} "
                   f"({r['r1c_of_floor_passes']:.0%} / {r['llama_of_floor_passes']:.0%}) | "
                   f"{'-' if r['tokens_match'] is None else 'yes' if r['tokens_match'] else 'no'} |")
    kernel_rows = [r for r in speed_rows if "kernel_vs_ort_moe" in r]
    if kernel_rows:
        out += ["", "r1c fp32 with r1c's CPU kernels (MoE, Linear) against the same export built with ONNX "
                "Runtime's MoE and MLAS (`--cpu-kernels ort`; speedup > 1: r1c's kernels are faster)", "",
                "| threads | batch | decode ms kernel / ORT MoE | speedup (95% CI) | prefill ms kernel / ORT MoE | "
                "speedup (95% CI) |", "| --- | --- | --- | --- | --- | --- |"]
        for r in kernel_rows:
            d, p = r["kernel_vs_ort_moe"]["tpot"], r["kernel_vs_ort_moe"]["ttft"]
            out.append(f"| {r['threads']} | {r['batch']} | {r['r1c_tpot_ms']:.2f} / {r['ort_moe_tpot_ms']:.2f} | "
                       f"{d['ratio']:.2f} [{d['low']:.2f}, {d['high']:.2f}] | {r['r1c_ttft_ms']:.0f} / "
                       f"{r['ort_moe_ttft_ms']:.0f} | {p['ratio']:.2f} [{p['low']:.2f}, {p['high']:.2f}] |")
    out += ["", "| system | positions | mean rel. logit error | max rel. logit error | top-1 agreement |",
            "| --- | --- | --- | --- | --- |"]
    out += [f"| {r['system']} | {r['positions']} | {r['mean_rel_err']:.2e} | {r['max_rel_err']:.2e} | "
            f"{r['top1']:.3f} |" for r in acc_rows]
    out += ["", "greedy tokens equal to transformers (4 prompts x 32 tokens): "
            + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in greedy.get("equal", {}).items())]
    return "\n".join(out)


@click.command(help=(__doc__ or "").replace("\n\n", "\n\n\b\n"))  # \b: click prints the paragraph as written
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/r1c-vs-llama"), show_default=True,
              help="checkpoint, bundles, GGUFs and the report go here (the checkpoint and GGUFs are kept "
                   "for a later run; r1c's bundles are rebuilt every run)")
@click.option("--llama-src", type=click.Path(path_type=Path), default=None,
              help="llama.cpp source tree (has convert_hf_to_gguf.py)")
@click.option("--threads", default="1,2", show_default=True, help="thread counts, comma-separated")
@click.option("--batch", default="1,8", show_default=True, help="batch sizes, comma-separated")
@click.option("--prompt-len", type=int, default=128, show_default=True, help="prompt tokens per row (TTFT)")
@click.option("--new-tokens", type=int, default=32, show_default=True, help="decoded tokens per row (TPOT)")
@click.option("--repeat", type=int, default=5, show_default=True, help="timed rounds per workload (at least 3)")
@click.option("--warmup", type=int, default=1, show_default=True, help="untimed rounds per workload first")
@click.option("--accuracy-tokens", type=int, default=320, show_default=True,
              help="teacher-forced positions compared with transformers")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the weights and the prompts")
@click.option("--skip-accuracy", is_flag=True, help="time only (no accuracy against transformers)")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="cpu: process CPU time (robust to other processes on a shared machine at 1 thread)")
def main(workdir: Path, llama_src: Path | None, threads: str, batch: str, prompt_len: int, new_tokens: int,
         repeat: int, warmup: int, accuracy_tokens: int, seed: int, skip_accuracy: bool, clock: str) -> None:
    ctx = click.get_current_context()
    args = {p.name: str(ctx.params[p.name]) for p in ctx.command.params if p.name in ctx.params}  # as given
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = list(os.getloadavg())
    paths = prepare(workdir, llama_src, seed)
    acc_rows, greedy = ([], {}) if skip_accuracy else accuracy(paths, accuracy_tokens, seed)
    speed_rows = speed(paths, [int(x) for x in threads.split(",")], [int(x) for x in batch.split(",")],
                       prompt_len, new_tokens, repeat, warmup, clock)
    report = {"config": bench_config().to_hf_dict(), "speed": speed_rows, "accuracy": acc_rows, "greedy": greedy,
              "args": args}
    report["load_average"] = {"before": load_before, "after": list(os.getloadavg())}
    out = workdir / f"report-{clock}-t{threads.replace(',', '_')}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"load average (1, 5, 15 min) before / after: {load_before} / {report['load_average']['after']}")
    print(tables(speed_rows, acc_rows, greedy))


if __name__ == "__main__":
    main()
