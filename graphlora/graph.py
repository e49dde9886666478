"""The per-layer MoE graph of GraphLoRA (docs/method.md section 2, paper eqs. 3-4).

Nodes 0..N-1 are the experts, node N is the input token. The token node is connected to every
expert; expert-expert edges are random, undirected, ``round(beta * N(N-1)/2)`` of them, drawn with a
seeded generator. The graph is fixed for a run and saved with the adapter.
"""

from __future__ import annotations

import itertools

import torch
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import to_dense_adj, to_undirected


def num_expert_edges(num_experts: int, density: float) -> int:
    """Undirected expert-expert edge count for edge density ``density``."""
    possible = num_experts * (num_experts - 1) // 2
    return max(0, min(possible, round(density * possible)))


def build_moe_graph(num_experts: int, density: float, seed: int) -> torch.Tensor:
    """Edge index (2, E) of the MoE graph, both directions of every undirected edge, no self-loops.

    Args:
        num_experts: N expert nodes; the token node gets index N.
        density: expert-expert edge density beta in [0, 1].
        seed: seed of the edge draw (same seed, same graph).
    """
    pairs = list(itertools.combinations(range(num_experts), 2))
    count = num_expert_edges(num_experts, density)
    gen = torch.Generator().manual_seed(seed)
    chosen = [pairs[i] for i in torch.randperm(len(pairs), generator=gen)[:count].tolist()]
    token_edges = [(i, num_experts) for i in range(num_experts)]
    edges = chosen + token_edges
    edge_index = torch.tensor(edges, dtype=torch.long).t().reshape(2, -1)
    return to_undirected(edge_index, num_nodes=num_experts + 1)


def normalized_adjacency(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Dense GCN propagation matrix A_hat = D^-1/2 (A + I) D^-1/2, shape (num_nodes, num_nodes).

    Uses torch_geometric's ``gcn_norm`` so the router propagates exactly as ``GCNConv`` does
    (row = target node, column = source node).
    """
    ei, w = gcn_norm(edge_index, None, num_nodes=num_nodes, add_self_loops=True)
    return to_dense_adj(ei, edge_attr=w, max_num_nodes=num_nodes)[0].t().contiguous()
