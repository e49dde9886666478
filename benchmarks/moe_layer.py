"""Forward+backward time of one MoE-LoRA FFN block for every method, side by side.

Shape: hidden 1024, intermediate 2816, 2048 tokens, 8 experts, top-2, rank 8; GraphLoRA
with the paper's defaults (d_gcn 256, 2 GCN layers, density 0.1). Methods are timed round-robin in
the same process so machine noise hits them alike; each figure is the median over rounds. The last
line printed is one JSON object with the per-method seconds and their ratios.

Packing: P GraphLoRA adapters (8 experts, top-2) over one frozen FFN, each with its own
``--tokens`` rows, in one packed forward+backward of the site (``packed_p{P}``: graphlora.packing),
against the same P blocks run one after the other on the same rows, each with its own frozen FFN
pass and backward (``separate_p{P}``); ``packed_vs_separate_p{P}`` is their ratio. Both do the same
frozen work. On a CPU, glibc's malloc hands the packed step's larger working set (every slot's
activations at once) back to the OS after each step and faults it in again;
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736`` keeps it.

    python benchmarks/moe_layer.py [--tokens 2048] [--rounds 7] [--device cuda] [--dtype bf16]
        [--pack-slots 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import DenseGCNConv

from graphlora.config import MoELoRAConfig
from graphlora.inject import collect_aux_losses
from graphlora.losses import weighted_aux_loss
from graphlora.moe import MoELoRAMLP, RoutingContext
from graphlora.packing import Pack, inject_packed


class GatedMLP(nn.Module):
    def __init__(self, d: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)
        self.act_fn = nn.SiLU()


class NaiveGraphRouter(nn.Module):
    """The straightforward router: per-token (N+1)-node graphs through DenseGCNConv, all rows."""

    def __init__(self, ref: nn.Module) -> None:
        super().__init__()
        self.ref = ref
        h = ref.router_expert_features.shape[1]
        self.convs = nn.ModuleList(DenseGCNConv(h, h, bias=False) for _ in ref.router_gcn_weights)
        n1 = ref.router_adj.shape[0]
        adj = torch.zeros(n1, n1)
        adj[ref.router_edge_index[0], ref.router_edge_index[1]] = 1.0
        self.register_buffer("adj", adj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.ref.num_experts
        tok = F.silu(x @ self.ref.router_token_proj.t())  # (T, h)
        feats = self.ref.router_expert_features.expand(x.shape[0], -1, -1)
        h = torch.cat([feats, tok[:, None]], dim=1)  # (T, N+1, h)
        for conv in self.convs:
            h = F.silu(conv(h, self.adj))
        return (h[:, :n] @ self.ref.router_out).softmax(-1)


def make_block(cfg: MoELoRAConfig, d: int, inter: int, device: str, dtype: torch.dtype):
    mlp = GatedMLP(d, inter).to(device=device, dtype=dtype).requires_grad_(False)
    n = cfg.experts_for(0, 1)
    block = MoELoRAMLP(mlp, cfg, num_experts=n, act=mlp.act_fn, context=RoutingContext())
    return block.to(device).train()


def step(block: MoELoRAMLP, x: torch.Tensor, cfg: MoELoRAConfig) -> None:
    out = block(x)
    loss = out.float().pow(2).mean()
    aux = collect_aux_losses(block)
    if aux:
        loss = loss + weighted_aux_loss(aux, cfg)
    loss.backward()
    block.zero_grad(set_to_none=True)
    x.grad = None


class OneFFN(nn.Module):
    """A model that is one gated FFN: the site a pack wraps."""

    def __init__(self, mlp: GatedMLP) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def make_pack(cfg: MoELoRAConfig, slots: int, d: int, inter: int, device: str, dtype: torch.dtype):
    mlp = GatedMLP(d, inter).to(device=device, dtype=dtype)
    pack = inject_packed(OneFFN(mlp), {f"s{i}": cfg for i in range(slots)})
    pack.model.to(device).train()
    return pack


def _slot_loss(pack: Pack, slot: str, out: torch.Tensor, aux: dict) -> torch.Tensor:
    loss = out.float().pow(2).mean()
    if aux:
        loss = loss + pack.weighted_aux_loss(slot, aux)
    return loss


def packed_step(pack: Pack, x: torch.Tensor) -> None:
    """One forward of the packed site over every slot's rows, one backward."""
    with pack.layout({slot: 1 for slot in pack.slots}):
        parts = pack.split(pack.model(x))
    aux = pack.collect_aux_losses()
    sum(_slot_loss(pack, s, out, aux.get(s, {})) for s, out in parts.items()).backward()
    pack.model.zero_grad(set_to_none=True)
    x.grad = None


def separate_step(pack: Pack, x: torch.Tensor) -> None:
    """The same blocks one after the other on the same rows: a frozen pass and a backward each."""
    for i, slot in enumerate(pack.slots):
        block = pack.model.mlp.slots[slot]
        out = block(x[i : i + 1])
        _slot_loss(pack, slot, out, collect_aux_losses(block)).backward()
    pack.model.zero_grad(set_to_none=True)
    x.grad = None


def router_step(router: nn.Module, x: torch.Tensor) -> None:
    router(x).pow(2).sum().backward()
    router.zero_grad(set_to_none=True)
    x.grad = None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--pack-slots", type=int, default=4, help="adapters P in the packed measure")
    args = p.parse_args(argv)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    d, inter, dev = args.hidden, args.intermediate, args.device
    torch.manual_seed(0)

    common = {"rank": args.rank, "num_experts": 8, "top_k": 2}
    configs = {
        "lora": MoELoRAConfig(method="lora", rank=args.rank),
        "mixlora": MoELoRAConfig(method="mixlora", **common),
        "loramoe": MoELoRAConfig(method="loramoe", rank=args.rank, num_experts=8),
        "mingmoe": MoELoRAConfig(method="mingmoe", **common),
        "mola": MoELoRAConfig(method="mola", rank=args.rank, top_k=2, experts_per_layer=[8]),
        "graphlora": MoELoRAConfig(method="graphlora", **common),
        "graphlora-no-graph": MoELoRAConfig(method="graphlora-no-graph", **common),
        "mixlora_e32": MoELoRAConfig(method="mixlora", **{**common, "num_experts": 32}),
        "graphlora_e32": MoELoRAConfig(method="graphlora", **{**common, "num_experts": 32}),
    }
    blocks = {k: make_block(c, d, inter, dev, dtype) for k, c in configs.items()}
    routers = {
        "graph_router_e8": blocks["graphlora"].router,
        "graph_router_e32": blocks["graphlora_e32"].router,
    }
    routers["naive_graph_router_e8"] = NaiveGraphRouter(routers["graph_router_e8"]).to(dev)
    routers["naive_graph_router_e32"] = NaiveGraphRouter(routers["graph_router_e32"]).to(dev)
    x = torch.randn(1, args.tokens, d, device=dev, dtype=dtype, requires_grad=True)
    xr = torch.randn(args.tokens, d, device=dev, requires_grad=True)
    slots = args.pack_slots
    packed_cfg = MoELoRAConfig(method="graphlora", attention_lora=False, **common)
    pack = make_pack(packed_cfg, slots, d, inter, dev, dtype)
    xp = torch.randn(slots, args.tokens, d, device=dev, dtype=dtype, requires_grad=True)

    def timed(fn) -> float:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    jobs = {k: (lambda b=b, c=configs[k]: step(b, x, c)) for k, b in blocks.items()}
    jobs.update({k: (lambda r=r: router_step(r, xr)) for k, r in routers.items()})
    jobs[f"packed_p{slots}"] = lambda: packed_step(pack, xp)
    jobs[f"separate_p{slots}"] = lambda: separate_step(pack, xp)
    for fn in jobs.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for rnd in range(args.rounds):
        for k, fn in jobs.items():
            times[k].append(timed(fn))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:24s} {v * 1000:9.1f} ms", file=sys.stderr)
    result = {
        "device": dev,
        "dtype": args.dtype,
        "shape": {"hidden": d, "intermediate": inter, "tokens": args.tokens, "rank": args.rank},
        "seconds": {k: round(v, 5) for k, v in med.items()},
        "graphlora_vs_mixlora": round(med["graphlora"] / med["mixlora"], 3),
        "mixlora_experts32_vs_experts8": round(med["mixlora_e32"] / med["mixlora"], 3),
        "graphlora_experts32_vs_experts8": round(med["graphlora_e32"] / med["graphlora"], 3),
        "graph_router_speedup_vs_naive_e8": round(
            med["naive_graph_router_e8"] / med["graph_router_e8"], 2
        ),
        "graph_router_speedup_vs_naive_e32": round(
            med["naive_graph_router_e32"] / med["graph_router_e32"], 2
        ),
        f"packed_vs_separate_p{slots}": round(
            med[f"packed_p{slots}"] / med[f"separate_p{slots}"], 3
        ),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
