from __future__ import annotations

import pytest

from graphlora.config import METHOD_PRESETS, MoELoRAConfig


def test_presets_follow_the_spec_table():
    g = MoELoRAConfig(method="graphlora")
    assert (g.router, g.num_experts, g.top_k, g.rank, g.alpha) == ("graph", 8, 2, 2, 4.0)
    assert (g.gcn_hidden, g.gcn_layers, g.edge_density) == (256, 2, 0.1)
    assert (g.poisson_coef, g.normal_coef, g.balance_coef) == (0.8, 8.0, 0.0)  # Poisson: a tenth
    p = MoELoRAConfig(method="graphlora-paper")  # the published coefficients
    assert (p.poisson_coef, p.normal_coef, p.balance_coef) == (0.005, 8.0, 0.0)
    m = MoELoRAConfig(method="mixlora")
    assert (m.router, m.top_k, m.rank, m.alpha, m.balance_coef) == ("softmax", 2, 8, 16.0, 0.01)
    assert MoELoRAConfig(method="loramoe").router == "dense"
    assert MoELoRAConfig(method="mingmoe").rank == 16
    assert MoELoRAConfig(method="mola").experts_per_layer == [5, 7, 9, 11]
    assert MoELoRAConfig(method="graphlora-no-graph").router == "softmax"
    assert MoELoRAConfig(method="graphlora-no-poisson").poisson_coef == 0.0
    assert MoELoRAConfig(method="graphlora-no-normal").normal_coef == 0.0
    assert MoELoRAConfig(method="lora").num_experts == 1


def test_every_field_overrides_the_preset():
    c = MoELoRAConfig(method="graphlora", num_experts=16, top_k=4, rank=8, normal_coef=0.0)
    assert (c.num_experts, c.top_k, c.rank, c.normal_coef, c.router) == (16, 4, 8, 0.0, "graph")
    assert MoELoRAConfig(method="mixlora", router="graph").router == "graph"


@pytest.mark.parametrize("method", sorted(METHOD_PRESETS))
def test_round_trip(method):
    c = MoELoRAConfig(method=method)
    assert MoELoRAConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "nope"}, "method"),
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"edge_density": 1.5}, "edge_density"),
        ({"edge_density": -0.1}, "edge_density"),
        ({"rank": 0}, "rank"),
        ({"router": "mlp"}, "router"),
        ({"dropout": 1.0}, "dropout"),
        ({"lambda_init": 3.0}, "lambda_init"),
        ({"lambda_range": (2.0, 1.0)}, "lambda_range"),
        ({"method": "mola", "experts_per_layer": [4, 0]}, "experts_per_layer"),
        ({"method": "mola", "experts_per_layer": [1, 8]}, "top_k"),
        ({"method": "lora", "num_experts": 4}, "num_experts"),
        ({"poisson_coef": -1.0}, "poisson_coef"),
    ],
)
def test_invalid_combinations_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        MoELoRAConfig(**kwargs)


def test_unknown_key_from_dict():
    with pytest.raises(ValueError, match="^num_expert: unknown adapter field"):
        MoELoRAConfig.from_dict({"num_expert": 3})


def test_dense_router_uses_all_experts_and_mola_layout():
    c = MoELoRAConfig(method="loramoe", num_experts=6)
    assert c.top_k_for(6) == 6
    mola = MoELoRAConfig(method="mola")
    assert [mola.experts_for(i, 8) for i in range(8)] == [5, 5, 7, 7, 9, 9, 11, 11]
    assert [mola.experts_for(i, 2) for i in range(2)] == [5, 9]


def test_gcn_width_is_capped_at_the_hidden_size():
    g = MoELoRAConfig(method="graphlora")  # gcn_hidden 256
    assert g.gcn_hidden_for(3584) == 256 and g.gcn_hidden_for(128) == 128
    assert MoELoRAConfig(method="graphlora", gcn_hidden=16).gcn_hidden_for(128) == 16
    assert MoELoRAConfig(method="mixlora").gcn_hidden_for(128) is None  # no GCN is built
    with pytest.raises(ValueError, match="^hidden_size:"):
        g.gcn_hidden_for(0)
