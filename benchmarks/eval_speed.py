"""Evaluation time and memory: today's scorer against the one-pass scorer.

Today's scorer (``score_examples_reference``) runs every prompt + candidate as its own sequence
and takes a log-softmax over the vocabulary at every position; the one-pass scorer
(``score_examples``) runs each prompt once, scores the candidates from its KV cache, and runs the
output head at the candidate positions only. Both score the same two sets in one run:

- ``quickstart``: the quickstart's validation set (synthetic task, 200 questions, 4 candidates of
  4 tokens each, prompts of about 40 tokens);
- ``arc``: ARC-Challenge's test file (``--data-dir``, default the copy shipped with graphlora;
  1172 questions, candidates `` answer1``..`` answer4``, prompts of about 450 byte tokens).

The model is the tiny-qwen2 preset with the quickstart's adapter (graphlora, ``gcn_hidden`` 32,
the searched fields at their defaults; LoRA B random so the experts matter), scored with the
training default ``eval_batch_size`` 64. The scorers run round-robin in one process, so machine
noise hits them alike; each time is the median over rounds. Agreement: the largest absolute score
difference and the number of questions whose prediction differs.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` per scorer; on a CPU, each scorer runs
again in a fresh process that reports its peak RSS above the RSS it had before scoring (Linux:
the peak is reset through /proc/self/clear_refs after the model is built). Memory is
measured at the preset's vocabulary and at ``--memory-vocab`` (default 151,936, Qwen2's: the
preset's embeddings are resized, the byte tokenizer's ids stay as they are). Next to it, the
largest log-probability tensor each scorer builds (fp32: positions the output head ran on in its
largest forward, times the vocabulary, times 4 bytes); a measurement whose tensor would exceed
``--memory-limit-gib`` is skipped (the size is still printed).
The last line printed is one JSON object with every figure.

    python benchmarks/eval_speed.py [--data-dir DIR] [--rounds 3] [--arc-questions N]
        [--batch-size 64] [--memory-vocab 151936] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from graphlora.config import MoELoRAConfig
from graphlora.data import Example, load_task
from graphlora.evaluate import choose, score_examples, score_examples_reference
from graphlora.inject import inject_adapter
from graphlora.presets import build_preset_model
from graphlora.synthetic import make_synthetic_task

SCORERS: dict[str, Callable] = {"today": score_examples_reference, "one_pass": score_examples}
QWEN2_VOCAB = 151_936


def build(vocab: int | None, device: str):  # noqa: ANN201
    """The tiny-qwen2 preset with the quickstart's adapter, LoRA B random; vocab resized."""
    model, tok = build_preset_model("tiny-qwen2")
    torch.manual_seed(0)  # the adapter's A matrices and graphs: the same model in every process
    if vocab is not None and vocab != len(tok):
        model.resize_token_embeddings(vocab, mean_resizing=False)
    inject_adapter(model, MoELoRAConfig(method="graphlora", gcn_hidden=32, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.to(device).eval(), tok


def load_sets(data_dir: str | None, arc_questions: int | None) -> dict[str, list[Example]]:
    arc = load_task("arc-challenge", data_dir=data_dir).test
    return {
        "quickstart": make_synthetic_task().validation,
        "arc": arc[:arc_questions] if arc_questions else arc,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_child(args: argparse.Namespace) -> None:
    """Child process: score one set with one scorer once; print its peak memory in MiB."""
    model, tok = build(args.vocab, args.device)
    examples = load_sets(args.data_dir, args.arc_questions)[args.set]
    fn = SCORERS[args.scorer]
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Reset the process's peak RSS (VmHWM) so building the model does not count (Linux).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kib("VmRSS") * 1024
    fn(model, tok, examples, batch_size=args.batch_size, device=args.device)
    _sync(args.device)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _proc_status_kib("VmHWM") * 1024 - base
    print(json.dumps({"peak_mib": round(peak / 2**20, 1)}))


def measure_peak(args: argparse.Namespace, set_name: str, scorer: str, vocab: int | None) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--_peak",
        "--set",
        set_name,
        "--scorer",
        scorer,
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    if vocab is not None:
        cmd += ["--vocab", str(vocab)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.arc_questions:
        cmd += ["--arc-questions", str(args.arc_questions)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="folder holding ARC-Challenge/test.json (default: shipped)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--arc-questions", type=int, help="score only the first N ARC questions")
    p.add_argument("--batch-size", type=int, default=64, help="eval_batch_size (rows)")
    p.add_argument("--memory-vocab", type=int, default=QWEN2_VOCAB)
    p.add_argument("--memory-limit-gib", type=float, default=8.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (Tune: 1)")
    p.add_argument("--_peak", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--set", help=argparse.SUPPRESS)
    p.add_argument("--scorer", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._peak:
        peak_child(args)
        return {}

    model, tok = build(None, args.device)
    sets = load_sets(args.data_dir, args.arc_questions)
    times: dict[str, dict[str, list[float]]] = {s: {k: [] for k in SCORERS} for s in sets}
    scores: dict[str, dict[str, list[list[float]]]] = {s: {} for s in sets}
    # Positions the output head runs on, largest forward: logits and fp32 log-probs are that
    # many rows of the vocabulary.
    positions: dict[str, dict[str, int]] = {s: dict.fromkeys(SCORERS, 0) for s in sets}
    current: list[str] = ["", ""]

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen = positions[current[0]]
        seen[current[1]] = max(seen[current[1]], output.shape[:-1].numel())

    hook = model.get_output_embeddings().register_forward_hook(count)
    for rnd in range(args.rounds):
        for set_name, examples in sets.items():
            for name, fn in SCORERS.items():
                current[:] = [set_name, name]
                _sync(args.device)
                t0 = time.perf_counter()
                out, _ = fn(model, tok, examples, batch_size=args.batch_size, device=args.device)
                _sync(args.device)
                times[set_name][name].append(time.perf_counter() - t0)
                scores[set_name][name] = out
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    hook.remove()

    result: dict = {
        "device": args.device,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "sets": {},
    }
    for set_name, examples in sets.items():
        med = {k: statistics.median(v) for k, v in times[set_name].items()}
        a, b = scores[set_name]["today"], scores[set_name]["one_pass"]
        diff = max(abs(x - y) for r, s in zip(a, b, strict=True) for x, y in zip(r, s, strict=True))
        flips = sum(choose(r) != choose(s) for r, s in zip(a, b, strict=True))
        memory: dict[str, dict] = {}
        for vocab in (len(tok), args.memory_vocab):
            entry: dict = {}
            for name in SCORERS:
                gib = positions[set_name][name] * vocab * 4 / 2**30
                entry[f"{name}_logprobs_gib"] = round(gib, 3)
                if gib > args.memory_limit_gib:
                    entry[f"{name}_peak_mib"] = None  # skipped: over --memory-limit-gib
                else:
                    entry[f"{name}_peak_mib"] = measure_peak(args, set_name, name, vocab)
            memory[f"vocab_{vocab}"] = entry
        result["sets"][set_name] = {
            "questions": len(examples),
            "seconds_per_question": {k: round(v / len(examples), 5) for k, v in med.items()},
            "seconds_total": {k: round(v, 3) for k, v in med.items()},
            "one_pass_vs_today": round(med["one_pass"] / med["today"], 3),
            "max_abs_score_diff": diff,
            "head_positions_largest_forward": positions[set_name],
            "predictions_differing": flips,
            "memory": memory,
        }
        print(
            f"{set_name:10s} today {med['today'] / len(examples) * 1e3:8.2f} ms/q  one-pass "
            f"{med['one_pass'] / len(examples) * 1e3:8.2f} ms/q  ratio "
            f"{med['one_pass'] / med['today']:.3f}  max|diff| {diff:.2e}  flips {flips}",
            file=sys.stderr,
        )
        for key, entry in memory.items():
            print(f"{'':10s} {key}: {entry}", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
