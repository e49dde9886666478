"""The balance loss under data parallelism: 2 gloo ranks, each with half of a global batch, must
see the same load (the paper form's cumulative c), the same balance loss and (after the ranks'
gradients are averaged, as ``run_training`` does) the same gradient as one process on the whole
batch, in both forms that need the whole batch's load (paper and batch)."""

from __future__ import annotations

import pytest
import torch
from gloo_ranks import run_on_ranks
from tiny_models import VOCAB, tiny_base

from graphlora.config import MoELoRAConfig
from graphlora.inject import inject_adapter, moe_blocks

GLOBAL_BATCH, SEQ, STEPS = 4, 7, 2


def _global_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # padding on both ranks' shards
        mask[2, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def normal_loss_trace(rank: int, world: int, method: str) -> dict[str, list]:
    """Per step: every layer's load c (paper form), the layer-averaged balance loss, and the
    gradient of that loss on every trainable parameter, averaged over ranks."""
    torch.manual_seed(0)  # the same adapter in every process
    model = inject_adapter(
        tiny_base(),
        MoELoRAConfig(method=method, num_experts=4, gcn_hidden=16, dropout=0.0),
    )
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B: routing weights reach the next layer's router input
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        elif "router_" in name:  # a larger router spreads the tokens over all experts
            p.data.copy_(torch.randn(p.shape, generator=gen))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    trace: dict[str, list] = {"load": [], "normal": [], "grad": []}
    for batch in _global_batches():
        out = model(**{k: v[rows] for k, v in batch.items()})
        normal = out.aux_losses["normal"]
        model.zero_grad(set_to_none=True)
        normal.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if world > 1:  # data-parallel averaging, as run_training does
            torch.distributed.all_reduce(flat)
            flat /= world
        trace["load"].append([b.coord_load.tolist() for b in moe_blocks(model)])
        trace["normal"].append(normal.item())
        trace["grad"].append(flat.tolist())
    return trace


RANK = r"""
from gloo_ranks import join, result
from test_ddp_load import normal_loss_trace
rank, world, _ = join()
result(normal_loss_trace(rank, world, "METHOD"))
"""


@pytest.mark.parametrize("method", ["graphlora-paper", "graphlora"])
def test_two_gloo_ranks_match_one_process_on_the_global_batch(tmp_path, method):
    ranks = run_on_ranks(RANK.replace("METHOD", method), tmp_path)
    single = normal_loss_trace(0, 1, method)  # torch.distributed not initialised here
    assert len(single["grad"]) == STEPS and any(v != 0 for v in single["grad"][-1])
    if method == "graphlora-paper":
        assert all(c > 0 for layer in single["load"][0] for c in layer), "an expert got no token"
    for trace in ranks:
        for key in ("load", "normal", "grad"):
            torch.testing.assert_close(
                torch.tensor(trace[key]),
                torch.tensor(single[key]),
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m, key=key: f"{key}: {m}",
            )
