"""GPU measurements of graphlora in one process: MoE-layer timings, packed training at a 7B layer
shape, and MiniLM on ARC-Easy; each part prints its figures and never stops the parts after it.

0. Import check: graphlora's training path (train, packed_train, packing, encoder, models) imports
   with ray, mlflow, optuna and datasets blocked (``sys.modules[name] = None``), as on a machine
   that lacks them.
1. ``benchmarks/moe_layer.py --device DEVICE --pack-slots 4`` with ``--dtype bf16`` and
   ``--dtype fp32``, each in a subprocess; its JSON last line is kept.
2. Packed training (``graphlora.packed_train.PackedTrainer``) over a randomly initialised Qwen2
   decoder of Qwen2-7B layer shape (hidden 3584, intermediate 18944, 28 heads, 4 key/value heads,
   vocab 152064, untied head) but 2 layers, bf16 weights and autocast, the byte tokenizer of the
   tiny presets, saved with ``save_pretrained`` to a local folder and loaded by path. ARC-Easy
   rows cut to 256 tokens (bytes), 16 rows per slot and step. For P = 1, 2, 4 graphlora slots
   (8 experts, top-2, rank 16, alpha 32, learning rates 1e-4 .. 1e-3): seconds per
   ``PackedTrainer.step()`` (median of 10 after 3 warm-up steps) against P single-slot trainers
   stepping one after the other (the same total work), and the peak GPU memory of the steps
   (``torch.cuda.max_memory_allocated``, with what was resident before them). The P-slot trainer
   is built once and grown 1 -> 2 -> 4; after that its slots 2..4 are removed, so it is also the
   first of the single-slot trainers.
3. ``graphlora.train.run_training`` of all-MiniLM-L6-v2 on ARC-Easy (the whole test split, 2376
   questions), fp32 without autocast, method graphlora, from the ``minilm-l6`` preset's training
   defaults (128 tokens, 150 steps of 16, lr 2e-3, evaluation every 50 steps and at step 0).
   First the token lengths of the ARC-Easy train questions and option texts as the encoder
   tokenizes them (max, 95th percentile, mean, share over 64 and 128 tokens). Then a sweep
   (``--sweep``; ``SWEEPS``), each run wrapped so that a failure does not stop the rest, its
   step-0 and final test accuracy, best validation accuracy and wall time printed as it ends:
   sweep 2 (default): rank 8, alpha 16, Normal 0.1 (seeds 0, 1, 2), then gcn_hidden 64,
   max_length 64, both, lr 3e-3, both for 200 steps, rank 16 / alpha 32, batch 8 for 300 steps;
   sweep 1 (the first round): the preset adapter (rank 2, alpha 4, 8 experts, Poisson 0.005,
   Normal 8), rank 8 / alpha 16 / Normal 0.1, rank 8 / alpha 16 with the preset's auxiliary
   coefficients, and the second for 300 steps. No run starts after ``--start-by`` seconds of the
   script, nor when its estimated end (the slowest seconds per step so far) is after
   ``--end-by``. The model is loaded from ``--minilm`` (default ``.gpucarry/minilm``: a copy of
   the packaged model with its weights stored in float16, loaded as float32), else from the
   ``minilm-l6`` package. With ``--json PATH``, part 3's results so far are also written to
   ``PATH`` with suffix ``.part3.json`` after each run.

A summary JSON object is printed last (and written to ``--json`` if given).

The device defaults to ``cuda:0`` (a bare ``cuda`` made ``run_training`` and ``PackedTrainer``
raise before graphlora resolved it to this rank's GPU). A ``PackedTrainer`` sits in a reference
cycle (``del`` does not free its model; the cyclic garbage collector does), so the script
collects garbage after each part and each run, else part 2's trainers stay on the GPU and
inflate part 3's peak-memory figures.

Run (device; ``.gpucarry/`` carried)::

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py [--parts 1,2,3]

Smoke test on a CPU (tiny sizes, a few steps, a test subset)::

    PYTHONPATH=. python benchmarks/gpu_check.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

MISSING = ("ray", "mlflow", "optuna", "datasets")
ROOT = Path(__file__).resolve().parent.parent
STARTED = time.perf_counter()


def _elapsed() -> float:
    return time.perf_counter() - STARTED


def _say(msg: str) -> None:
    print(f"[{_elapsed():7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# 0. imports


def import_check() -> dict[str, Any]:
    """Block the packages the device lacks, then import graphlora's training path."""
    import importlib.util

    present = {name: importlib.util.find_spec(name) is not None for name in MISSING}
    for name in MISSING:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises, find_spec: None
    import torch
    import transformers

    import graphlora
    import graphlora.encoder
    import graphlora.models
    import graphlora.packed_train
    import graphlora.packing
    import graphlora.train  # noqa: F401

    loaded = [n for n in MISSING if sys.modules.get(n) is not None]
    info = {
        "installed_before_blocking": present,
        "imported_despite_block": loaded,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
    }
    _say(f"import check: graphlora training path imports without {', '.join(MISSING)}: {info}")
    return info


# ----------------------------------------------------------------------------------------------
# 1. moe_layer.py


def part1(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    extra = ["--pack-slots", "4"]
    if args.smoke:
        extra = ["--pack-slots", "2", "--tokens", "64", "--rounds", "1"]
        extra += ["--hidden", "64", "--intermediate", "176"]
    for dtype in ("bf16", "fp32"):
        cmd = [sys.executable, "benchmarks/moe_layer.py", "--device", args.device]
        cmd += ["--dtype", dtype, *extra]
        _say("part 1: " + " ".join(cmd[1:]))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=args.part1_timeout,
                env=os.environ | {"PYTHONPATH": str(ROOT)},
            )
            text, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as err:
            text, rc = (err.output or "") if isinstance(err.output, str) else "", "timeout"
        print(text, end="" if text.endswith("\n") else "\n", flush=True)
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        result: dict[str, Any] = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}
        if lines:
            try:
                result["json"] = json.loads(lines[-1])
            except ValueError:
                result["json_error"] = lines[-1][:200]
        _say(f"part 1 {dtype}: rc {rc}, {result['wall_s']} s")
        out[dtype] = result
    return out


# ----------------------------------------------------------------------------------------------
# 2. packed training at Qwen2-7B layer shape


def _qwen2_folder(args: argparse.Namespace) -> Path:
    """A random Qwen2 decoder of Qwen2-7B layer shape (2 layers) with the byte tokenizer, saved to
    a local folder that ``load_model_and_tokenizer`` loads by path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from graphlora.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    if args.smoke:
        shape = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4)
        shape |= dict(num_key_value_heads=2, vocab_size=1024)
    else:
        shape = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28)
        shape |= dict(num_key_value_heads=4, vocab_size=152064)
    config = Qwen2Config(
        **shape,
        num_hidden_layers=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    folder = Path(args.workdir) / "qwen2-7b-shape-2layers"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    t0 = time.perf_counter()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    _free(args.device)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
    _say(
        f"part 2: random Qwen2 ({n / 1e9:.3f} B params, {dtype}) saved to {folder} "
        f"({size:.2f} GiB) in {time.perf_counter() - t0:.1f} s"
    )
    return folder


def _free(device: str) -> None:
    """Collect garbage (a PackedTrainer sits in a reference cycle); return cached GPU memory."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _measure(step, device: str, warmup: int, timed: int) -> dict[str, float]:  # noqa: ANN001
    """Median seconds of ``step()`` over ``timed`` calls after ``warmup``, and peak memory."""
    import torch

    cuda = device.startswith("cuda")
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    times = []
    for _ in range(timed):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"s_per_step": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        out |= {"peak_gib": peak / 2**30, "resident_gib": resident / 2**30}
        out["step_extra_gib"] = (peak - resident) / 2**30
    return out


def part2(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from graphlora.config import MoELoRAConfig
    from graphlora.data import load_task
    from graphlora.packed_train import PackedTrainer
    from graphlora.train import TrainConfig

    folder = _qwen2_folder(args)
    data = load_task("arc-easy")
    big = 10**6  # no evaluation, no end within the measurement
    base = TrainConfig(
        model=str(folder),
        dataset="arc-easy",
        max_length=64 if args.smoke else 256,
        batch_size=4 if args.smoke else 16,
        dtype="float32" if args.smoke else "bfloat16",
        device=args.device,
        max_steps=big,
        eval_every=big,
        eval_at_start=False,
        eval_test=False,
        log_every=0,
    )
    adapter = MoELoRAConfig(method="graphlora", num_experts=8, top_k=2, rank=16, alpha=32.0)
    lrs = [1e-4, 2e-4, 5e-4, 1e-3]
    cfgs = [dataclasses.replace(base, learning_rate=lr, seed=i) for i, lr in enumerate(lrs)]
    warmup, timed = (1, 2) if args.smoke else (3, 10)
    dev = args.device
    results: dict[str, Any] = {"adapter": adapter.to_dict(), "rows": {}}

    t0 = time.perf_counter()
    packed = PackedTrainer(base, data)
    _say(f"part 2: trainer 1 built in {time.perf_counter() - t0:.1f} s ({packed.info})")
    if dev.startswith("cuda"):
        results["base_gib"] = torch.cuda.memory_allocated() / 2**30
    for p in (1, 2, 4):
        while len(packed.slots) < p:
            i = len(packed.slots)
            packed.add(f"s{i}", cfgs[i], adapter)
        m = _measure(packed.step, dev, warmup, timed)
        results["rows"][p] = {"packed": m}
        _say(f"part 2: packed P={p}: {m}")
    trainable = sum(p.numel() for p in packed.pack.adapter("s0").parameters() if p.requires_grad)
    results["trainable_params_per_slot"] = trainable
    for s in packed.slots[1:]:
        packed.remove(s)
    singles = [packed]
    for i in range(1, 4):
        t0 = time.perf_counter()
        trainer = PackedTrainer(base, data)
        trainer.add(f"s{i}", cfgs[i], adapter)
        singles.append(trainer)
        _say(f"part 2: single-slot trainer {i + 1} built in {time.perf_counter() - t0:.1f} s")
    for p in (1, 2, 4):

        def separate(trainers: list = singles[:p]) -> None:
            for trainer in trainers:
                trainer.step()

        m = _measure(separate, dev, warmup, timed)
        results["rows"][p]["separate"] = m
        _say(f"part 2: separate P={p}: {m}")
    shape = "tiny smoke shape" if args.smoke else "Qwen2-7B layer shape"
    print(f"\npart 2: PackedTrainer.step(), {shape}, 2 layers, {base.dtype}, ", end="")
    print(f"{base.batch_size} rows x {base.max_length} tokens per slot, device {dev}")
    print(
        "   P | packed s/step | separate s/step | packed/separate | packed peak GiB "
        "| packed step extra GiB | separate step extra GiB"
    )
    for p, row in results["rows"].items():
        pk, sp = row["packed"], row["separate"]
        row["ratio"] = pk["s_per_step"] / sp["s_per_step"]
        print(
            f"{p:4d} | {pk['s_per_step']:13.4f} | {sp['s_per_step']:15.4f} | {row['ratio']:15.3f} "
            f"| {pk.get('peak_gib', float('nan')):15.2f} "
            f"| {pk.get('step_extra_gib', float('nan')):21.2f} "
            f"| {sp.get('step_extra_gib', float('nan')):23.2f}"
        )
    print(
        "(peak: torch.cuda.max_memory_allocated over the timed steps, with only the P-slot "
        "trainer's base resident; step extra: peak minus what was allocated before the steps; "
        f"base weights {results.get('base_gib', float('nan')):.2f} GiB; "
        f"{trainable:,} trainable parameters per slot)\n",
        flush=True,
    )
    del singles, packed
    _free(dev)
    return results


# ----------------------------------------------------------------------------------------------
# 3. MiniLM on ARC-Easy


RUN_KEYS = [
    "step0_val_accuracy",
    "step0_test_accuracy",
    "val_accuracy",
    "best_val_accuracy",
    "test_accuracy",
    "val_loss",
    "test_loss",
    "train_loss",
    "trainable_params",
    "samples_per_sec",
    "peak_memory_mb",
    "setup_time_s",
    "train_time_s",
    "eval_time_total_s",
    "step0_eval_time_s",
    "test_time_s",
    "gcn_hidden_used",
]

# Part 3's sweeps: name -> (TrainConfig overrides, MoELoRAConfig fields). Round 1 (``--sweep 1``)
# is the one in the first report; round 2 (the default) varies rank 8 / alpha 16 / Normal 0.1,
# most important runs first (the script stops starting runs when its time is up).
R8 = dict(method="graphlora", rank=8, alpha=16.0, normal_coef=0.1)
SWEEPS: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    "1": {
        "a_preset": ({}, dict(method="graphlora")),
        "b_r8_normal0.1": ({}, R8),
        "c_r8_preset_aux": ({}, dict(method="graphlora", rank=8, alpha=16.0)),
        "d_r8_normal0.1_300steps": ({"max_steps": 300}, R8),
    },
    "2": {
        "01_base_seed0": ({}, R8),
        "02_base_seed1": ({"seed": 1}, R8),
        "03_base_seed2": ({"seed": 2}, R8),
        "04_gcn64": ({}, R8 | dict(gcn_hidden=64)),
        "05_len64": ({"max_length": 64}, R8),
        "06_gcn64_len64": ({"max_length": 64}, R8 | dict(gcn_hidden=64)),
        "07_lr3e-3": ({"learning_rate": 3e-3}, R8),
        "08_gcn64_len64_200steps": ({"max_length": 64, "max_steps": 200}, R8 | dict(gcn_hidden=64)),
        "09_r16_a32": ({}, R8 | dict(rank=16, alpha=32.0)),
        "10_bs8_300steps": ({"batch_size": 8, "max_steps": 300}, R8),
    },
}


def _length_stats(lengths: list[int]) -> dict[str, float]:
    s = sorted(lengths)
    n = len(s)

    def pct(q: float) -> int:  # nearest-rank percentile
        return s[min(n - 1, max(0, math.ceil(q / 100 * n) - 1))]

    return {
        "n": n,
        "max": s[-1],
        "p95": pct(95),
        "p50": pct(50),
        "mean": round(sum(s) / n, 2),
        "frac_over_64": round(sum(x > 64 for x in s) / n, 4),
        "frac_over_128": round(sum(x > 128 for x in s) / n, 4),
    }


def token_lengths(tokenizer: Any, data: Any) -> dict[str, Any]:
    """Token counts of ARC-Easy train texts as ``graphlora.encoder._encode`` tokenizes them
    (special tokens included), before truncation: questions and option texts go through the
    encoder in separate forwards, each text cut to ``max_length``."""
    questions = [ex.question for ex in data.train if ex.question is not None]
    options = [t for ex in data.train for t in ex.options]
    out = {}
    for name, texts in (("question", questions), ("option", options)):
        ids = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        out[name] = _length_stats([len(x) for x in ids])
    out["all"] = _length_stats(
        [len(x) for x in tokenizer(questions + options, truncation=False)["input_ids"]]
    )
    _say(f"part 3: ARC-Easy train token lengths (special tokens included, untruncated): {out}")
    return out


def part3(args: argparse.Namespace) -> dict[str, Any]:
    from graphlora.config import MoELoRAConfig
    from graphlora.data import load_task
    from graphlora.models import load_model_and_tokenizer
    from graphlora.presets import training_defaults
    from graphlora.train import TrainConfig, run_training

    model = args.minilm if Path(args.minilm).is_dir() else "minilm-l6"
    _, tokenizer, info = load_model_and_tokenizer(model, dtype="float32")
    _say(f"part 3: model {model}: {info}")
    if info.architecture != "encoder":
        raise RuntimeError(f"{model}: loaded as {info.architecture}, expected an encoder")
    defaults = training_defaults("minilm-l6")
    common = dict(defaults, max_test_examples=None, log_every=50)
    if args.smoke:
        common |= dict(max_steps=4, eval_every=2, batch_size=4, max_eval_examples=16)
        common |= dict(max_test_examples=16)
    base = TrainConfig(
        model=model, dataset="arc-easy", device=args.device, dtype="float32", bf16=False, **common
    )
    data = load_task("arc-easy")
    _say(
        f"part 3: arc-easy {len(data.train)} train / {len(data.validation)} val / "
        f"{len(data.test)} test; sweep {args.sweep}; base training settings {base.to_dict()}"
    )
    out: dict[str, Any] = {"model": info.to_dict(), "sweep": args.sweep, "runs": {}}
    try:
        out["token_lengths"] = token_lengths(tokenizer, data)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        out["token_lengths"] = {"error": repr(err)}
    partial = Path(args.json).with_suffix(".part3.json") if args.json else None
    per_step: list[float] = []  # wall seconds per step of the runs so far (evaluations included)
    for name, (train_over, adapter_fields) in SWEEPS[args.sweep].items():
        over = dict(train_over)
        if args.smoke and "max_steps" in over:  # keep the smoke run's steps in proportion
            over["max_steps"] = max(1, round(base.max_steps * over["max_steps"] / 150))
        if args.smoke and "batch_size" in over:
            over["batch_size"] = max(1, base.batch_size * over["batch_size"] // 16)
        cfg = dataclasses.replace(base, **over)
        est = max(per_step) * cfg.max_steps if per_step else 0.0
        now = _elapsed()
        if now > args.start_by or now + est > args.end_by:
            why = (
                f"time: at {now:.0f} s (start by {args.start_by:.0f} s), "
                f"~{est:.0f} s more (end by {args.end_by:.0f} s)"
            )
            _say(f"part 3: {name} left out: {why}")
            out["runs"][name] = {"skipped": why}
            continue
        adapter = MoELoRAConfig(**adapter_fields)
        changed = {k: v for k, v in cfg.to_dict().items() if base.to_dict().get(k) != v}
        _say(f"part 3: {name}: adapter {adapter.to_dict()}; training changes {changed}")
        t0 = time.perf_counter()
        row: dict[str, Any] = {"train_changes": changed, "adapter_fields": adapter_fields}
        try:
            metrics = run_training(cfg, adapter, data=data)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            row |= {"error": repr(err), "wall_s": time.perf_counter() - t0}
            out["runs"][name] = row
            _free(args.device)
            continue
        wall = time.perf_counter() - t0
        _free(args.device)
        per_step.append(wall / cfg.max_steps)
        row |= {k: metrics[k] for k in RUN_KEYS if k in metrics}
        row |= {k: v for k, v in metrics.items() if k.startswith("aux_") or "entropy" in k}
        row |= {"wall_s": wall, "steps": cfg.max_steps}
        out["runs"][name] = row
        s0, fin = row.get("step0_test_accuracy", float("nan")), row.get("test_accuracy")
        _say(
            f"part 3: RESULT {name}: step-0 test {s0:.4f} -> final test {fin:.4f} "
            f"({100 * (fin - s0):+.2f} pts); val {row.get('step0_val_accuracy', float('nan')):.4f}"
            f" -> {row.get('val_accuracy', float('nan')):.4f} "
            f"(best {row.get('best_val_accuracy', float('nan')):.4f}); wall {wall:.1f} s, "
            f"train {row.get('train_time_s', float('nan')):.1f} s"
        )
        if partial is not None:
            partial.write_text(json.dumps(out, default=str) + "\n")
    print("\npart 3: MiniLM-L6 on ARC-Easy, full test split, fp32, device", args.device)
    print(
        "  run                      | step-0 test | final test |  gain pts | best val | "
        "wall s | train s"
    )
    for name, row in out["runs"].items():
        if "wall_s" not in row or "test_accuracy" not in row:
            print(f"  {name:24s} | {row}")
            continue
        s0 = row.get("step0_test_accuracy", float("nan"))
        print(
            f"  {name:24s} | {s0:11.4f} | {row['test_accuracy']:10.4f} | "
            f"{100 * (row['test_accuracy'] - s0):+9.2f} | "
            f"{row.get('best_val_accuracy', float('nan')):8.4f} | "
            f"{row['wall_s']:6.1f} | {row.get('train_time_s', float('nan')):7.1f}"
        )
    seeds = [
        row["test_accuracy"]
        for name, row in out["runs"].items()
        if name in ("01_base_seed0", "02_base_seed1", "03_base_seed2") and "test_accuracy" in row
    ]
    if len(seeds) >= 2:
        out["base_seed_test"] = {
            "values": seeds,
            "mean": statistics.mean(seeds),
            "sd": statistics.stdev(seeds),
            "range": max(seeds) - min(seeds),
        }
        print(f"  base over seeds: {out['base_seed_test']}")
    print(flush=True)
    return out


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="1,2,3", help="comma-separated parts to run (1, 2, 3)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: a quick check")
    p.add_argument("--device", default=None, help="default: cuda:0 if available, else cpu")
    p.add_argument("--workdir", default="/tmp/gpu_check", help="where part 2 saves its model")
    p.add_argument("--minilm", default=str(ROOT / ".gpucarry" / "minilm"))
    p.add_argument("--part1-timeout", type=float, default=150.0, help="seconds per subprocess")
    p.add_argument("--sweep", default="2", choices=sorted(SWEEPS), help="part 3's run list")
    p.add_argument(
        "--start-by", type=float, default=330.0, help="part 3 starts no run after this (script s)"
    )
    p.add_argument(
        "--end-by",
        type=float,
        default=395.0,
        help="part 3 starts no run whose estimated end (script s) is later",
    )
    p.add_argument("--json", help="also write the summary JSON here")
    args = p.parse_args(argv)
    summary: dict[str, Any] = {}
    try:
        summary["imports"] = import_check()
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        summary["imports"] = {"error": repr(err)}
    import torch

    args.device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    parts = {"1": part1, "2": part2, "3": part3}
    for key in args.parts.split(","):
        _say(f"===== part {key} =====")
        t0 = time.perf_counter()
        try:
            summary[f"part{key}"] = parts[key](args)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            summary[f"part{key}"] = {"error": repr(err)}
        _free(args.device)
        _say(f"===== part {key} done in {time.perf_counter() - t0:.1f} s =====")
    text = json.dumps(summary, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
