"""Ingest cost of an honest delta versus the worst files the caps still let through.

Run: python benchmarks/hostile_ingest.py [--quick] [--reps 5] [--threads 1] [--max-rank-row R]
     python benchmarks/hostile_ingest.py --attacks [--uploads 3]   (live attacks: hostile_clients.py)

Times what the ingest worker does with a downloaded delta: ``DeltaFile.open`` (header),
``check_delta`` against the federation's declared model (header only) and ``build_index``
(every tensor read once: finite check, digests, update norms). The declared model is
llama-3.2-3b (28 layers x q,k,v,o,gate,up,down); the honest delta trains all 196 modules at
r=16 in fp32 (about 97 MB). The other rows stay under every cap: as many entries in each of
rank_pattern, alpha_pattern and target_modules as check_delta allows (one per declared module,
196, at most CHORUS_MAX_PATTERN_ENTRIES), written in the slowest form the pattern rules allow;
2 x 196 tensors; a header padded up to its bound; tensors laid out so no factor pair is adjacent.
Two rows are files the caps refuse (time to refusal), and the "uncapped" row indexes a file
with CHORUS_MAX_PATTERN_ENTRIES entries per list without check_delta: what the per-module cap
saves. ``--max-rank-row R`` adds a delta at rank R (the caps allow ranks up to min(d_out, d_in)).

Files are written to a temporary directory first (not timed). Each row runs in a fresh
subprocess on ``--threads`` torch threads (the worker pins one), so its peak RSS (VmHWM)
is its own; "above base" subtracts the RSS the process had before the first file was opened.
Time is the median of ``--reps`` runs after one warm-up, as wall-clock and as this process's CPU
time (far less disturbed by other processes on a shared host); "x honest" divides each by the
honest row's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import chorus_mq  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from chorus_mq.adapters import DeltaFile, LocalAdapter, LoraSpec, ModelDecl, build_index, check_delta, write_delta
from chorus_mq.adapters.checks import PATTERN_FLOOR, header_bound
from chorus_mq.errors import InvalidAdapter
from chorus_mq.settings import Settings

P = "base_model.model."
HIDDEN, INTERMEDIATE, KV, LAYERS = 3072, 8192, 1024, 28
SHAPES = {  # (d_out, d_in) in B @ A layout
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
TARGETS = tuple(sorted({m.rsplit(".", 1)[-1] for m in SHAPES}))
SETTINGS = Settings()
#: rows run without check_delta: what a file the caps refuse would cost if it were let through
UNCAPPED = "uncapped: "


def declared(layers: int) -> ModelDecl:
    modules = {f"{P}model.layers.{i}.{m}": shape for i in range(layers) for m, shape in SHAPES.items()}
    return ModelDecl(modules=modules, target_modules=TARGETS, task_type="CAUSAL_LM")


def factors(decl: ModelDecl, r: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for module, (d_out, d_in) in decl.modules.items():
        out[f"{module}.lora_A.weight"] = torch.randn(r, d_in, generator=g) / d_in**0.5
        out[f"{module}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 1e-2
    return out


def hostile_spec(r: int, n: int) -> LoraSpec:
    """n entries in each list; one unbounded quantifier each (the most the rules allow), matching nothing."""
    return LoraSpec(
        r=r,
        lora_alpha=2 * r,
        target_modules=TARGETS + tuple(f"x{i}_proj" for i in range(n - len(TARGETS))),
        rank_pattern={rf"[a-z_.0-9]*zz{i}": r for i in range(n)},
        alpha_pattern={rf"[a-z_.0-9]*yy{i}": 2.0 * r for i in range(n)},
        task_type="CAUSAL_LM",
    )


def write_scattered(path: Path, tensors: dict[str, torch.Tensor], spec: LoraSpec) -> None:
    """A delta whose tensors are laid out A, A, ..., B, B, ...: no pair adjacent (the index must re-read)."""
    from chorus_mq.adapters.fileformat import encode_header

    order = sorted(tensors, key=lambda k: (".lora_B." in k, k))
    meta = {"adapter_config": json.dumps(spec.to_peft_config(), sort_keys=True)}
    # encode_header lays out offsets in the order given, which is all the safetensors format asks
    head = encode_header([(k, "F32", tuple(tensors[k].shape)) for k in order], meta)
    with open(path, "wb") as f:
        f.write(head)
        for k in order:
            f.write(tensors[k].contiguous().numpy().tobytes())


def pad_header(path: Path, tensors: dict[str, torch.Tensor], spec: LoraSpec) -> None:
    """Write the delta again with junk metadata that brings its header just under the bound."""
    write_delta(LocalAdapter(spec=spec, tensors=tensors), path)
    with DeltaFile.open(path, max_header_bytes=SETTINGS.max_header_bytes) as delta:
        room = header_bound(delta) - delta.header.header_len - 64
    from chorus_mq.adapters import write_safetensors
    from chorus_mq.names import DELTA_FORMAT

    meta = {"format": DELTA_FORMAT, "adapter_config": json.dumps(spec.to_peft_config(), sort_keys=True)}
    meta["padding"] = "x" * room
    write_safetensors(path, tensors, meta)


def build(tmp: Path, layers: int, r: int, n_patterns: int, max_rank_row: int | None) -> dict[str, Path]:
    """The files of every row (``n_patterns``: the most pattern entries check_delta lets through)."""
    decl = declared(layers)
    honest = factors(decl, r)
    spec = LoraSpec(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM")
    rows: dict[str, Path] = {}
    rows["honest r=16"] = tmp / "honest.safetensors"
    write_delta(LocalAdapter(spec=spec, tensors=honest), rows["honest r=16"])
    rows["max patterns"] = tmp / "patterns.safetensors"
    write_delta(LocalAdapter(spec=hostile_spec(r, n_patterns), tensors=honest), rows["max patterns"])
    cap_off = f"{UNCAPPED}{SETTINGS.max_pattern_entries} patterns"
    rows[cap_off] = tmp / "patterns-setting.safetensors"
    write_delta(LocalAdapter(spec=hostile_spec(r, SETTINGS.max_pattern_entries), tensors=honest), rows[cap_off])
    rows["max tensors, scattered"] = tmp / "scattered.safetensors"
    write_scattered(rows["max tensors, scattered"], honest, spec)
    rows["max header"] = tmp / "header.safetensors"
    pad_header(rows["max header"], honest, spec)
    rows["all caps at once"] = tmp / "all.safetensors"
    pad_header(rows["all caps at once"], honest, hostile_spec(r, n_patterns))
    if max_rank_row:
        rows[f"rank {max_rank_row}"] = tmp / "rank.safetensors"
        write_delta(LocalAdapter(spec=spec.replace(r=max_rank_row, lora_alpha=2 * max_rank_row),
                                 tensors=factors(decl, max_rank_row)), rows[f"rank {max_rank_row}"])  # fmt: skip
    # refused: over a cap, the check stops at the header
    rows["refused: 2x patterns"] = tmp / "refused-patterns.safetensors"
    write_delta(LocalAdapter(spec=hostile_spec(r, 2 * n_patterns), tensors=honest), rows["refused: 2x patterns"])
    rows["refused: 10x tensors"] = tmp / "refused-tensors.safetensors"
    many = {f"{P}m{i}.lora_{w}.weight": torch.zeros(1, 1) for i in range(10 * len(decl.modules)) for w in "AB"}
    write_delta(LocalAdapter(spec=spec.replace(target_modules=("m0",)), tensors=many), rows["refused: 10x tensors"])
    return rows


def vm(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def run_row(path: Path, layers: int, reps: int, threads: int, checked: bool) -> dict[str, object]:
    torch.set_num_threads(threads)
    decl = declared(layers)
    base = vm("VmRSS")
    seconds, cpu, outcome = [], [], "indexed"
    for rep in range(reps + 1):  # the first run warms up torch's kernels and the page cache
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            opened = DeltaFile.open(path, max_header_bytes=SETTINGS.max_header_bytes, max_tensors=decl.max_tensors)
            with opened as delta:
                if checked:
                    check_delta(delta, decl, max_pattern_entries=SETTINGS.max_pattern_entries)
                build_index(delta)
        except InvalidAdapter as exc:
            outcome = f"{type(exc).__name__}: {str(exc)[:60]}"
        if rep:
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"median": statistics.median(seconds), "cpu": statistics.median(cpu), "peak": vm("VmHWM"), "base": base,
            "outcome": outcome}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 28")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-rank-row", type=int, default=None)
    parser.add_argument("--attacks", action="store_true", help="the live attack rows instead (hostile_clients.py)")
    parser.add_argument("--uploads", type=int, default=3, help="with --attacks: honest uploads timed per phase")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--unchecked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attacks:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from hostile_clients import main as attacks

        attacks(["--uploads", str(args.uploads)])
        return
    if args.row:
        print(json.dumps(run_row(Path(args.row), args.layers, args.reps, args.threads, not args.unchecked)))
        return
    layers = 4 if args.quick else LAYERS
    with tempfile.TemporaryDirectory(prefix="chorus-hostile-") as tmp:
        decl = declared(layers)
        n_patterns = min(SETTINGS.max_pattern_entries, max(len(decl.modules), PATTERN_FLOOR))
        rows = build(Path(tmp), layers, 16, n_patterns, args.max_rank_row)
        print(f"llama-3.2-3b shapes, {layers} layers, r=16 fp32; caps: {n_patterns} entries per pattern list, "
              f"{decl.max_tensors} tensors, header bound; {args.threads} torch thread(s), "
              f"median of {args.reps}")  # fmt: skip
        print(f"{'file':<26} {'MB':>6} {'header KB':>9} {'median s':>8} {'x honest':>8} {'cpu s':>6} {'x honest':>8} "
              f"{'peak RSS MB':>11} {'above base':>10}  outcome")  # fmt: skip
        honest: dict[str, float] = {}
        for name, path in rows.items():
            cmd = [sys.executable, __file__, "--row", str(path), "--layers", str(layers), "--reps", str(args.reps),
                   "--threads", str(args.threads), *(["--unchecked"] if name.startswith(UNCAPPED) else [])]  # fmt: skip
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            honest = honest or {"median": out["median"], "cpu": out["cpu"]}
            head = int.from_bytes(path.read_bytes()[:8], "little")
            print(f"{name:<26} {path.stat().st_size / 1e6:>6.1f} {head / 1e3:>9.1f} {out['median']:>8.3f} "
                  f"{out['median'] / honest['median']:>8.2f} {out['cpu']:>6.3f} {out['cpu'] / honest['cpu']:>8.2f} "
                  f"{out['peak'] / 2**20:>11.0f} {(out['peak'] - out['base']) / 2**20:>10.0f}  "
                  f"{out['outcome']}")  # fmt: skip


if __name__ == "__main__":
    main()
