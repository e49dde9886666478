"""The memory plan (``graphlora.memory``) against measured steps, and what a 7B trial needs.

Part 1 plans a training step's peak from the model's config alone and measures one real step of
the real modules (``measure_step``: forward, loss, backward, AdamW step, every tensor tracked by
PyTorch's MemTracker), with and without gradient checkpointing, and prints plan / measured:

- on real CPU tensors (fp32): the tiny presets and MiniLM-L6 (``minilm-l6``, installed offline);
- on fake tensors (bf16, nothing allocated): Qwen2-7B's and Llama-3-8B's exact configurations
  (shipped in ``graphlora/model_configs``) with 2 of their layers, so a laptop can step them.

Part 2 plans Qwen2-7B and Llama-3-8B trials at the shapes of ``search_spaces/paper.yaml`` (its
batch of 16, the default 512 tokens per row, GraphLoRA at the paper's optimum and at the largest
corner of its grid) with and without checkpointing, against common GPUs.

    python benchmarks/memory_plan.py            # both parts (about 10 minutes on 2 cores)
    python benchmarks/memory_plan.py --part 2   # the GPU table only (seconds)
"""

from __future__ import annotations

import argparse
import copy
import platform
from datetime import date

import torch

from graphlora.config import MoELoRAConfig
from graphlora.memory import GPUS, measure_step, model_config, plan_memory

GiB = 2**30

CPU_RUNS = [  # (model, method, experts, rank): real CPU tensors, fp32, 8 rows of 64 tokens
    ("tiny-qwen2", "graphlora", 8, 8),
    ("tiny-llama", "mixlora", 8, 8),
    ("tiny-gpt2", "graphlora", 8, 8),
    ("tiny-opt", "loramoe", 4, 8),
    ("tiny-bert", "graphlora", 8, 8),
    ("minilm-l6", "graphlora", 8, 8),
]
FAKE_RUNS = ["Qwen/Qwen2-7B", "meta-llama/Meta-Llama-3-8B"]  # fake tensors, bf16, 2 layers

# search_spaces/paper.yaml: batch 16, max_length left at TrainConfig's 512, graphlora, alpha 4,
# d_gcn 256; the grid's corners for what grows memory (experts, top-k, rank).
PAPER_SHAPE = dict(batch_size=16, max_length=512, labelled_per_row=8)
PAPER_ADAPTERS = {
    "paper optimum (8 experts, top-2, rank 2)": dict(num_experts=8, top_k=2, rank=2),
    "largest of the grid (32 experts, top-5, rank 32)": dict(num_experts=32, top_k=5, rank=32),
}


def part1() -> None:
    print("## Plan against measured steps")
    print(
        "| model | tensors | method | checkpointing | measured peak GiB | planned GiB "
        "| plan / measured |"
    )
    print("|---|---|---|---|---|---|---|")
    for model, method, experts, rank in CPU_RUNS:
        adapter = MoELoRAConfig(method=method, num_experts=experts, rank=rank)
        shape = dict(batch_size=8, max_length=64, dtype="float32", labelled_per_row=4)
        for ckpt in (False, True):
            _row(model, "real CPU, fp32, 8 x 64 tokens", adapter, shape, ckpt, fake=False)
    for name in FAKE_RUNS:
        config = copy.deepcopy(model_config(name))
        config.num_hidden_layers = 2
        adapter = MoELoRAConfig(method="graphlora", num_experts=8, top_k=2, rank=16, alpha=32.0)
        shape = dict(batch_size=16, max_length=256, labelled_per_row=4)
        for ckpt in (False, True):
            _row(
                config,
                f"fake, bf16, 2 of its layers, 16 x 256 tokens ({name})",
                adapter,
                shape,
                ckpt,
                fake=True,
            )


def _row(model, tensors: str, adapter: MoELoRAConfig, shape: dict, ckpt: bool, fake: bool) -> None:  # noqa: ANN001
    measured = measure_step(model, adapter, gradient_checkpointing=ckpt, fake=fake, **shape)
    plan = plan_memory(model, adapter, gradient_checkpointing=ckpt, **shape)
    name = model if isinstance(model, str) else model.model_type
    top_k = "all (dense)" if adapter.router == "dense" else adapter.top_k
    print(
        f"| {name} | {tensors} | {adapter.method} (N {adapter.num_experts}, K {top_k}, "
        f"r {adapter.rank}) | {'on' if ckpt else 'off'} | "
        f"{measured.peak / GiB:.4f} | {plan.total / GiB:.4f} | "
        f"{plan.total / measured.peak:.3f} |",
        flush=True,
    )


def part2() -> None:
    print("\n## Qwen2-7B and Llama-3-8B trials at paper.yaml's shapes (planned)")
    print(
        "16 rows x 512 tokens per step (8192 tokens), bf16 weights and activations, 8 labelled "
        "positions per row, one adapter per GPU; fits = planned peak <= 90% of the GPU's memory"
    )
    gpus = list(GPUS)
    print(
        "| model | adapter | checkpointing | weights GiB | activations GiB | planned peak GiB | "
        + " | ".join(gpus)
        + " |"
    )
    print("|---|---|---|---|---|---|" + "---|" * len(gpus))
    for name in FAKE_RUNS:
        for label, fields in PAPER_ADAPTERS.items():
            adapter = MoELoRAConfig(method="graphlora", alpha=4.0, gcn_hidden=256, **fields)
            for ckpt in (False, True):
                plan = plan_memory(name, adapter, gradient_checkpointing=ckpt, **PAPER_SHAPE)
                fits = ["fits" if plan.fits(GPUS[g]) else "no" for g in gpus]
                print(
                    f"| {name} | {label} | {'on' if ckpt else 'off'} | "
                    f"{plan.weights / GiB:.1f} | {plan.activations / GiB:.1f} | "
                    f"{plan.total / GiB:.1f} | " + " | ".join(fits) + " |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", type=int, choices=(1, 2), help="one part only")
    args = parser.parse_args()
    print(
        f"# {date.today()}, {platform.machine()} CPU ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}"
    )
    if args.part in (None, 1):
        part1()
    if args.part in (None, 2):
        part2()


if __name__ == "__main__":
    main()
