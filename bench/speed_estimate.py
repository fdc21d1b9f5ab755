"""Benchmark: the decode speed hw.speed estimates for this machine against what llama.cpp generates here.

The default model is chosen by an estimate (tokens/s ~= bandwidth / model size, hw/speed.py), so this
checks the estimate where it decides: models shaped as qwen2.5-coder:1.5b and :3b (Q4_K matrices, a
Q6_K output, the real layer counts and widths; zero weights, which llama.cpp reads and multiplies like
any others), written to a temp dir, loaded by xllamacpp (the built-in engine's llama.cpp) on the
machine's physical cores, and asked for 48 tokens (ignore_eos) a few times. Prints, per model and
thread count, the estimate, the measured median [range], the effective GB/s (file size x tokens/s)
and measured / estimate (>= 1 means the estimate is the floor it is meant to be).

    python bench/speed_estimate.py [--repeat 3] [--threads 1,2] [--models 1.5b,3b]

About 3 GB of temp files (removed at the end); ~2-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

# bench/_common.py: `python bench/NAME.py` puts bench/ first on sys.path
from _common import CpuWatch, machine_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.doubles

from tests.doubles import gguf_writer as w  # noqa: E402

from stigmer.hw import speed  # noqa: E402
from stigmer.hw.report import detect  # noqa: E402

SHAPES = {  # qwen2.5-coder's published configurations
    "1.5b": {"n_layers": 28, "n_head": 12, "n_head_kv": 2, "n_embd": 1536, "n_ff": 8960},
    "3b": {"n_layers": 36, "n_head": 16, "n_head_kv": 2, "n_embd": 2048, "n_ff": 11008},
    "7b": {"n_layers": 28, "n_head": 28, "n_head_kv": 4, "n_embd": 3584, "n_ff": 18944},
}
VOCAB = 151936
KEY = "bench"


def write_model(folder: Path, name: str) -> Path:
    meta, tensors = w.llama_like(
        "qwen2", n_ctx=4096, n_vocab=VOCAB, file_type=w.FT_Q4_K_M, matrix_type=w.Q4_K, output_type=w.Q6_K,
        qkv_bias=True, name=f"qwen2.5-coder-{name}-shaped", **SHAPES[name],
    )  # fmt: skip
    meta["qwen2.attention.layer_norm_rms_epsilon"] = 1e-6
    meta["tokenizer.ggml.model"] = "llama"  # a plain vocabulary: prompts are given as token ids
    meta["tokenizer.ggml.scores"] = w.array(w.FLOAT32, [0.0] * VOCAB)
    meta["tokenizer.ggml.tokens"] = w.array(
        w.STRING, ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(VOCAB - 3)]
    )
    meta["tokenizer.ggml.token_type"] = w.array(w.INT32, [2, 3, 3] + [1] * (VOCAB - 3))
    return w.write_gguf(folder / f"{name}.gguf", meta, tensors)


def measure(path: Path, threads: int, repeat: int) -> list[float]:
    """Decode tokens/s of `repeat` 48-token completions (llama.cpp's own timings), in a child process:
    each model and thread count gets a fresh llama.cpp, and nothing outlives the measurement."""
    code = f"""
import json, os, sys, urllib.request
from stigmer.llm.llamacpp.engine import start_internal
server, url = start_internal(model_path={str(path)!r}, alias="m", ctx_size=1024, threads={threads}, key={KEY!r})
def complete(n):
    body = json.dumps({{"prompt": [5, 6, 7, 8], "n_predict": n, "ignore_eos": True, "temperature": 0}}).encode()
    req = urllib.request.Request(url + "/completion", data=body, headers={{"Authorization": "Bearer {KEY}", "Content-Type": "application/json"}})
    return json.loads(urllib.request.urlopen(req, timeout=600).read())["timings"]["predicted_per_second"]
complete(4)
out = [complete(48) for _ in range({repeat})]
sys.stdout.write("RESULT " + json.dumps(out) + "\\n"); sys.stdout.flush()
os._exit(0)
"""
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the engine failed on {path.name}:\n{r.stderr[-2000:]}")
    return [float(x) for x in json.loads(line.removeprefix("RESULT "))]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", default="", help="comma-separated; default 1 and the physical cores")
    ap.add_argument("--models", default="1.5b,3b", help=f"comma-separated, of {', '.join(SHAPES)}")
    args = ap.parse_args()
    machine_line()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-speed-"))
    watch = CpuWatch()
    try:
        hw = detect(tmp)
        cores = hw.cpu.physical_cores
        threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
        print(f"cpu: {cores} physical cores, flags {' '.join(sorted(hw.cpu.flags))}")
        for name in args.models.split(","):
            path = write_model(tmp, name)
            size = path.stat().st_size
            for n in threads:
                cpu = speed.cpu_bandwidth(dataclasses.replace(hw.cpu, physical_cores=n, logical_cores=n))
                estimate = speed.tokens_per_second(size, cpu)
                tps = measure(path, n, args.repeat)
                med = statistics.median(tps)
                print(
                    f"{name} ({size / 1e9:.2f} GB), {n} thread{'s' if n != 1 else ''}: estimate {estimate:.1f} "
                    f"tokens/s | measured median {med:.1f} [{min(tps):.1f}-{max(tps):.1f}] "
                    f"= {med * size / 1e9:.1f} GB/s effective | measured / estimate {med / estimate:.2f}",
                    flush=True,
                )
            path.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(watch.report())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
