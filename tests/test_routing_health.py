"""The router routes: token dependence at init, a balance loss that can undo a collapse, and the
routing-health record (docs/method.md section 6).

Each behaviour is checked against the published form too (``expert_features: paper``,
``balance: paper``), which fails it: that is what the departure from the paper is for.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_base

from graphlora.config import MoELoRAConfig
from graphlora.health import (
    COLLAPSE_ENTROPY,
    HEALTH_FIELDS,
    batch_health,
    collapsed_layers,
    health_summary,
)
from graphlora.inject import inject_adapter, moe_blocks, routing_health
from graphlora.losses import (
    batch_balance_loss,
    normal_balance_loss,
    poisson_distinction_loss,
    switch_loss,
)
from graphlora.routers import GraphRouter, route

N = 8


def _distinct_top2(router: GraphRouter, tokens: torch.Tensor) -> int:
    with torch.no_grad():
        return int(batch_health(route(router(tokens), 2).indices, router(tokens), N)[2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_at_init_the_router_depends_on_the_token(seed):
    torch.manual_seed(seed)
    tokens = torch.randn(64, 64)
    routes = GraphRouter(64, N, gcn_hidden=64, expert_features="token")
    published = GraphRouter(64, N, gcn_hidden=64, expert_features="paper")
    assert _distinct_top2(routes, tokens) >= 5
    # The published form sends most tokens to the same few pairs (2-7 here; 1-4 on MiniLM's
    # hidden states): the token's term is nearly the same for every expert node.
    assert _distinct_top2(routes, tokens) >= 2 * _distinct_top2(published, tokens)


def test_token_router_still_depends_on_the_graph():
    torch.manual_seed(0)
    tokens = torch.randn(64, 32)

    def top2(**kw):
        torch.manual_seed(1)  # same parameters: only the graph differs
        router = GraphRouter(32, N, gcn_hidden=32, **kw)
        with torch.no_grad():
            return route(router(tokens), 2).indices.sort(-1).values

    base = top2(edge_density=0.1)
    assert not torch.equal(base, top2(edge_density=0.8))  # density changes the routing
    assert not torch.equal(base, top2(edge_density=0.1, graph_seed=5))  # so do the edges
    assert not torch.equal(base, top2(edge_density=0.1, gcn_layers=3))  # and the depth


def _collapsed_logits() -> torch.Tensor:
    torch.manual_seed(0)
    logits = torch.randn(64, N) * 0.1
    logits[:, :2] += 5.0  # every token to experts 0 and 1
    return logits.requires_grad_()


def _batch_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    probs = logits.softmax(-1)
    r = route(probs, 2)
    counts = torch.bincount(r.indices.reshape(-1), minlength=N).float()
    return probs, r.topk_probs, counts / counts.sum()


@pytest.mark.parametrize("form", ["batch", "switch"])
def test_balance_gradient_at_a_collapse_points_unused_experts_toward_use(form):
    logits = _collapsed_logits()
    probs, _, frac = _batch_terms(logits)
    if form == "batch":
        loss = batch_balance_loss(frac, probs.mean(0), N / 2)
    else:
        loss = switch_loss(frac, probs.mean(0))
    loss.backward()
    grad = logits.grad.sum(0)
    assert (grad[2:] < 0).all(), grad  # descent raises every unused expert's logit
    assert (grad[:2] > 0).all(), grad  # and lowers the two in use


def test_paper_balance_gives_unused_experts_no_gradient():
    logits = _collapsed_logits()
    probs, topk, _ = _batch_terms(logits)
    r = route(probs, 2)
    load = torch.zeros(N).index_add(0, r.indices.reshape(-1), topk.reshape(-1))
    normal_balance_loss(load, torch.tensor(N / 2)).backward()
    assert logits.grad[:, 2:].abs().max() < 1e-6  # nothing moves an expert nobody picks


def _train_balance(form: str, steps: int) -> list[float]:
    """A paper-form router, collapsed by 100 steps of the paper's loss, then ``steps`` steps of
    the balance loss ``form`` alone on fresh random tokens; the per-batch entropies."""
    torch.manual_seed(0)
    router = GraphRouter(32, N, gcn_hidden=32, expert_features="paper")
    sigma = torch.nn.Parameter(torch.tensor(N / 2))
    opt = torch.optim.Adam([*router.parameters(), sigma], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    load = torch.zeros(N)
    entropies = []
    for step in range(100 + steps):
        probs = router(torch.randn(64, 32, generator=gen))
        r = route(probs, 2)
        counts = torch.bincount(r.indices.reshape(-1), minlength=N).float()
        if step < 100 or form == "paper":
            topk = r.topk_probs.reshape(-1)
            new = load + torch.zeros(N).index_add(0, r.indices.reshape(-1), topk)
            load = new.detach()
            loss = normal_balance_loss(new, torch.nn.functional.softplus(sigma))
        else:
            loss = batch_balance_loss(counts / counts.sum(), probs.mean(0), N / 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        entropies.append(batch_health(r.indices, probs.detach(), N)[0].item())
    return entropies


def test_batch_balance_alone_undoes_a_collapse():
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    paper = _train_balance("paper", 300)
    assert mean(paper[80:100]) < 0.4  # collapsed: nearly one pair for every token of a batch
    batch = _train_balance("batch", 300)
    assert mean(batch[-20:]) > 0.8
    assert mean(paper[100:]) < COLLAPSE_ENTROPY  # the paper's loss keeps the batches collapsed


def _balance_with_poisson(poisson_coef: float, steps: int = 200) -> torch.Tensor:
    """A token-conditioned router trained ``steps`` steps on the batch balance loss plus
    ``poisson_coef`` x the Poisson distinction loss alone; the last 20 batches' mean health."""
    torch.manual_seed(0)
    router = GraphRouter(32, N, gcn_hidden=32)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    health = []
    for _ in range(steps):
        probs = router(torch.randn(64, 32, generator=gen))
        r = route(probs, 2)
        counts = torch.bincount(r.indices.reshape(-1), minlength=N).float()
        loss = batch_balance_loss(counts / counts.sum(), probs.mean(0), N / 2)
        if poisson_coef:
            loss = loss + poisson_coef * poisson_distinction_loss(probs, torch.tensor(1.5))
        opt.zero_grad()
        loss.backward()
        opt.step()
        health.append(batch_health(r.indices, probs.detach(), N))
    return torch.stack(health[-20:]).mean(0)


def test_the_poisson_term_makes_the_softmax_depend_on_the_token():
    # The balance loss alone spreads every batch over the experts from near-uniform, identical
    # softmaxes (token_mi ~ 0: the choice rides on tiny differences); the Poisson term at a tenth
    # of its weight makes each token commit to its experts while the batch stays spread.
    entropy, _, _, mi = _balance_with_poisson(0.0).tolist()
    assert entropy > 0.9 and mi < 0.02
    entropy, used, _, mi = _balance_with_poisson(0.1).tolist()
    assert entropy > 0.9 and used > 7 and mi > 0.2


def test_batch_health_by_hand():
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [3, 0]])  # 8 assignments: 4, 2, 1, 1
    probs = torch.full((4, 4), 0.25)
    entropy, used, distinct, mi = batch_health(idx, probs, 4).tolist()
    frac = [0.5, 0.25, 0.125, 0.125]
    assert entropy == pytest.approx(-sum(f * math.log(f) for f in frac) / math.log(4))
    assert used == 4 and distinct == 3
    assert mi == pytest.approx(0.0, abs=1e-6)  # every token has the same distribution
    onehot = torch.eye(4)
    assert batch_health(idx[:, :1], onehot, 4)[3].item() == pytest.approx(1.0)  # token -> expert


def test_health_summary_and_collapse():
    layers = [torch.tensor([2.0, 1.8, 14.0, 20.0, 0.6]), torch.tensor([2.0, 0.66, 4.0, 2.0, 0.0])]
    out = health_summary(layers + [torch.zeros(5)])  # a layer that saw no batch is left out
    assert out["layer0/batch_entropy"] == pytest.approx(0.9)
    assert out["layer1/experts_used"] == pytest.approx(2.0)
    assert "layer2/batch_entropy" not in out
    assert out["routing/min_batch_entropy"] == pytest.approx(0.33)
    assert out["routing/collapsed_layers"] == 1.0
    assert collapsed_layers(out) == [1]
    assert set(HEALTH_FIELDS) <= {k.split("/")[1] for k in out}


@pytest.mark.parametrize("method", ["graphlora", "graphlora-paper", "mixlora", "lora"])
def test_every_training_forward_counts_and_evaluation_does_not(method):
    torch.manual_seed(0)
    experts = 1 if method == "lora" else 4
    model = inject_adapter(tiny_base("qwen2"), MoELoRAConfig(method=method, num_experts=experts))
    batch = {
        "input_ids": torch.randint(0, 97, (3, 10)),
        "attention_mask": torch.ones(3, 10, dtype=torch.long),
    }
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert routing_health(model) == {}
    model.graphlora_context.health_in_eval = True  # held-out routing, on request
    with torch.no_grad():
        model(**batch)
    held_out = routing_health(model)
    model.graphlora_context.health_in_eval = False
    model.train()
    model(**batch)
    model(**batch)
    out = routing_health(model)
    if method == "lora":
        assert out == {} and held_out == {}
        return
    assert {"layer0/batch_entropy", "layer1/token_mi", "routing/min_experts_used"} <= set(out)
    assert 0.0 <= out["routing/batch_entropy"] <= 1.0
    assert held_out["layer0/distinct_topk"] >= 1
    assert all(b.routing_health.sum() == 0 for b in moe_blocks(model))  # reset for the window


def test_batch_balance_form_has_a_fixed_sigma_and_the_paper_form_trains_it():
    ours = inject_adapter(tiny_base(), MoELoRAConfig(method="graphlora", num_experts=4))
    paper = inject_adapter(tiny_base(), MoELoRAConfig(method="graphlora-paper", num_experts=4))
    names = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert not any("coord_sigma" in n for n in names(ours))
    assert any("coord_sigma" in n for n in names(paper))
    assert moe_blocks(ours)[0].sigma.item() == pytest.approx(2.0)  # N / 2, constant


def test_config_rejects_unknown_forms():
    with pytest.raises(ValueError, match="balance"):
        MoELoRAConfig(balance="running")
    with pytest.raises(ValueError, match="expert_features"):
        MoELoRAConfig(expert_features="static")
    cfg = MoELoRAConfig(method="graphlora-paper")
    assert (cfg.expert_features, cfg.balance, cfg.router) == ("paper", "paper", "graph")
