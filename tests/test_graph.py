from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GCNConv

from graphlora.graph import build_moe_graph, normalized_adjacency, num_expert_edges
from graphlora.routers import GraphRouter, SoftmaxRouter, route


@pytest.mark.parametrize(
    "n, density", [(8, 0.1), (8, 0.0), (8, 1.0), (12, 0.4), (32, 0.2), (1, 0.5)]
)
def test_graph_structure(n, density):
    ei = build_moe_graph(n, density, seed=3)
    edges = {tuple(e) for e in ei.t().tolist()}
    assert all((b, a) in edges for a, b in edges), "graph must be symmetric"
    assert all(a != b for a, b in edges), "no self-loops in the edge index"
    assert all((i, n) in edges for i in range(n)), "token node connects to every expert"
    expert_pairs = {(a, b) for a, b in edges if a < b < n}
    assert len(expert_pairs) == round(density * n * (n - 1) / 2) == num_expert_edges(n, density)


def test_graph_is_seeded():
    assert torch.equal(build_moe_graph(16, 0.3, 7), build_moe_graph(16, 0.3, 7))
    assert not torch.equal(build_moe_graph(16, 0.3, 7), build_moe_graph(16, 0.3, 8))


def test_normalized_adjacency_is_gcn_normalisation():
    n = 6
    ei = build_moe_graph(n, 0.4, 0)
    a = torch.zeros(n + 1, n + 1)
    a[ei[0], ei[1]] = 1.0
    a = a + torch.eye(n + 1)
    d = a.sum(1).rsqrt()
    expected = d[:, None] * a * d[None, :]
    torch.testing.assert_close(normalized_adjacency(ei, n + 1), expected)


@pytest.mark.parametrize("features", ["token", "paper"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_gcn_router_equals_torch_geometric_gcnconv(layers, features):
    torch.manual_seed(0)
    d, n, h, t = 24, 8, 16, 5
    router = GraphRouter(
        d,
        n,
        gcn_hidden=h,
        gcn_layers=layers,
        edge_density=0.3,
        graph_seed=1,
        expert_features=features,
    )
    x = torch.randn(t, d)
    ours = router.gcn_nodes(x)  # (T, N, h)

    convs = []
    for w in router.router_gcn_weights:
        conv = GCNConv(h, h, bias=False)
        conv.lin.weight.data.copy_(w.data.t())
        convs.append(conv)
    tok = F.silu(x @ router.router_token_proj.t())
    experts = router.router_expert_features
    graphs = [
        Data(
            # token form: each expert node's vector modulated by the token's
            x=torch.cat([experts * tok[i] if features == "token" else experts, tok[i : i + 1]]),
            edge_index=router.router_edge_index,
        )
        for i in range(t)
    ]
    batch = Batch.from_data_list(graphs)
    hid = batch.x
    for conv in convs:
        hid = F.silu(conv(hid, batch.edge_index))
    ref = hid.reshape(t, n + 1, h)[:, :n]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    probs = router(x)
    torch.testing.assert_close(probs, (ref @ router.router_out).softmax(-1), rtol=1e-5, atol=1e-6)


def test_routers_are_fp32_and_normalised():
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    for r in (SoftmaxRouter(16, 4), GraphRouter(16, 4, gcn_hidden=8)):
        p = r(x)
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.sum(-1), torch.ones(10))


def test_topk_renormalisation():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.2, 0.3]])
    r = route(probs, 2)
    assert r.indices[0].tolist() == [1, 2]
    torch.testing.assert_close(r.weights[0], torch.tensor([0.5 / 0.8, 0.3 / 0.8]))
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(2))
    torch.testing.assert_close(r.topk_probs[0], torch.tensor([0.5, 0.3]))
    dense = route(probs, 4)
    assert dense.indices.tolist() == [[0, 1, 2, 3]] * 2
    torch.testing.assert_close(dense.weights, probs)


def test_saved_graph_survives_a_different_seed():
    a = GraphRouter(8, 6, gcn_hidden=4, edge_density=0.5, graph_seed=0)
    b = GraphRouter(8, 6, gcn_hidden=4, edge_density=0.5, graph_seed=99)
    assert not torch.equal(a.router_adj, b.router_adj)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.router_adj, b.router_adj)
    assert torch.equal(a.router_edge_index, b.router_edge_index)
