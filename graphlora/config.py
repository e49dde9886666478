"""Adapter configuration: one dataclass for every MoE-LoRA knob, and the method presets.

A method (docs/method.md section 4) is only a set of defaults over the same block: router x top-k x
auxiliary losses x expert layout. Any field left as ``None`` is filled from the method's preset in
``__post_init__``; any field given explicitly wins. ``to_dict`` always writes the resolved values,
so a saved config reloads to exactly the same adapter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ROUTERS = ("none", "softmax", "dense", "graph")
BALANCE_FORMS = ("batch", "paper", "switch")
EXPERT_FEATURES = ("token", "paper")

# The Poisson term at a tenth of the balance weight: at the paper's 0.005 the router's softmax is
# the same for every token (docs/method.md section 6).
_GRAPHLORA: dict[str, Any] = {
    "router": "graph",
    "top_k": 2,
    "rank": 2,
    "alpha": 4.0,
    "poisson_coef": 0.8,
    "normal_coef": 8.0,
}

# Each preset lists only what differs from the dataclass' base defaults below.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "lora": {"router": "none", "num_experts": 1, "top_k": 1, "rank": 8, "alpha": 16.0},
    "mixlora": {"router": "softmax", "top_k": 2, "rank": 8, "alpha": 16.0, "balance_coef": 0.01},
    "loramoe": {"router": "dense", "rank": 8, "alpha": 16.0},
    "mingmoe": {"router": "softmax", "top_k": 2, "rank": 16, "alpha": 32.0},
    "mola": {
        "router": "softmax",
        "top_k": 2,
        "rank": 8,
        "alpha": 16.0,
        "experts_per_layer": [5, 7, 9, 11],
    },
    "graphlora": _GRAPHLORA,
    # The published form, exactly: expert nodes blind to the token, the Normal loss on the run's
    # running load with a trainable sigma (docs/method.md section 6 says why it is not the default).
    "graphlora-paper": {
        **_GRAPHLORA,
        "poisson_coef": 0.005,
        "expert_features": "paper",
        "balance": "paper",
    },
    # Ablations: graphlora with one of its parts taken out.
    "graphlora-no-graph": {**_GRAPHLORA, "router": "softmax"},
    "graphlora-no-poisson": {k: v for k, v in _GRAPHLORA.items() if k != "poisson_coef"},
    "graphlora-no-normal": {k: v for k, v in _GRAPHLORA.items() if k != "normal_coef"},
}

_BASE_DEFAULTS: dict[str, Any] = {
    "num_experts": 8,
    "top_k": 2,
    "rank": 8,
    "alpha": 16.0,
    "router": "softmax",
    "poisson_coef": 0.0,
    "normal_coef": 0.0,
    "balance_coef": 0.0,
    "experts_per_layer": None,
    "expert_features": "token",
    "balance": "batch",
}


@dataclass
class MoELoRAConfig:
    """Every knob of the MoE-LoRA adapter (docs/method.md sections 1-4).

    Fields set to ``None`` take the value of ``method``'s preset (see ``METHOD_PRESETS``).
    """

    method: str = "graphlora"
    """Preset: lora, mixlora, loramoe, mingmoe, mola, graphlora, graphlora-paper,
    graphlora-no-graph, graphlora-no-poisson, graphlora-no-normal."""
    num_experts: int | None = None
    """Experts N per MoE layer (ignored where ``experts_per_layer`` is set)."""
    top_k: int | None = None
    """Experts K each token is routed to. The dense router always uses K = N."""
    rank: int | None = None
    """LoRA rank r of every expert (and of the attention LoRAs)."""
    alpha: float | None = None
    """LoRA scale numerator: deltas are scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    router: str | None = None
    """none (single plain LoRA), softmax, dense (softmax with K = N) or graph (GCN router)."""
    gcn_layers: int = 2
    """GCN layers L of the graph router."""
    gcn_hidden: int = 256
    """GCN node feature size d_gcn asked for. The router uses at most the model's hidden size:
    ``gcn_hidden_for(hidden_size)`` gives the width actually built, which ``save_adapter``
    records as ``gcn_hidden_used``."""
    edge_density: float = 0.1
    """Expert-expert edge density beta in [0, 1]."""
    expert_features: str | None = None
    """Graph router's expert-node features: token (x_i * act(P h), so routing depends on the token
    from the first step) or paper (a trainable x_i shared by every token, as published)."""
    graph_seed: int = 0
    """Seed of the random expert-expert edges (layer i uses graph_seed + i)."""
    poisson_coef: float | None = None
    """Weight c_P of the Poisson distinction loss (0 disables it)."""
    normal_coef: float | None = None
    """Weight c_N of GraphLoRA's load-balance loss (0 disables it); ``balance`` says its form."""
    balance: str | None = None
    """Form of the load-balance loss weighted by ``normal_coef``: batch (the Normal target on the
    current global batch: value from the hard top-k assignment fractions, gradient through the
    full softmax to every expert, sigma fixed), paper (eqs. 8-9: the run's running total of top-k
    mass, trainable sigma) or switch (N * sum_i f_i P_i on the current batch)."""
    balance_coef: float | None = None
    """Weight of the Switch/Mixtral load-balance loss (0 disables it)."""
    lambda_init: float = 1.5
    """Initial Poisson rate lambda."""
    lambda_range: tuple[float, float] = (1.0, 2.0)
    """lambda is clamped into this closed range."""
    sigma_init: float | None = None
    """Normal sigma (initial value with balance paper, where it trains; fixed otherwise); None
    means N / 2."""
    experts_per_layer: list[int] | None = None
    """MoLA layout: expert counts for equal contiguous groups of the target layers, shallow to
    deep (e.g. [5, 7, 9, 11] = one count per quarter). Overrides num_experts."""
    attention_lora: bool = True
    """Add one plain LoRA to each of q, k, v, o projections."""
    target_layers: list[int] | None = None
    """Decoder layer indices that get the MoE block; None means all. Negative indices count
    from the end."""
    router_init_std: float = 0.02
    """Std of the softmax router's N(0, std) init."""

    def __post_init__(self) -> None:
        if self.method not in METHOD_PRESETS:
            raise ValueError(
                f"method: unknown method {self.method!r}; choose one of {sorted(METHOD_PRESETS)}"
            )
        preset = {**_BASE_DEFAULTS, **METHOD_PRESETS[self.method]}
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        if isinstance(self.lambda_range, list):
            self.lambda_range = tuple(self.lambda_range)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        if self.router not in ROUTERS:
            raise bad("router", f"must be one of {list(ROUTERS)}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise bad("num_experts", "must be an integer >= 1")
        if self.router == "none" and self.num_experts != 1:
            raise bad("num_experts", "router 'none' (plain LoRA) needs exactly 1 expert")
        if self.experts_per_layer is not None:
            if self.router == "none":
                raise bad("experts_per_layer", "cannot be used with router 'none'")
            if not self.experts_per_layer or any(
                not isinstance(n, int) or n < 1 for n in self.experts_per_layer
            ):
                raise bad("experts_per_layer", "must be a non-empty list of integers >= 1")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise bad("top_k", "must be an integer >= 1")
        if self.router != "dense" and self.top_k > self.min_experts:
            raise bad("top_k", f"must not exceed the number of experts ({self.min_experts})")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise bad("rank", "must be an integer >= 1")
        if self.alpha <= 0:
            raise bad("alpha", "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if not 0.0 <= self.edge_density <= 1.0:
            raise bad("edge_density", "must be in [0, 1]")
        if self.expert_features not in EXPERT_FEATURES:
            raise bad("expert_features", f"must be one of {list(EXPERT_FEATURES)}")
        if self.balance not in BALANCE_FORMS:
            raise bad("balance", f"must be one of {list(BALANCE_FORMS)}")
        if self.gcn_layers < 1:
            raise bad("gcn_layers", "must be >= 1")
        if self.gcn_hidden < 1:
            raise bad("gcn_hidden", "must be >= 1")
        for name in ("poisson_coef", "normal_coef", "balance_coef"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        lo, hi = self.lambda_range
        if not 0 < lo <= hi:
            raise bad("lambda_range", "must be (low, high) with 0 < low <= high")
        if not lo <= self.lambda_init <= hi:
            raise bad("lambda_init", f"must lie in lambda_range {self.lambda_range}")
        if self.sigma_init is not None and self.sigma_init <= 0:
            raise bad("sigma_init", "must be > 0")
        if self.router_init_std <= 0:
            raise bad("router_init_std", "must be > 0")

    @property
    def scaling(self) -> float:
        """LoRA scale s = alpha / rank."""
        return self.alpha / self.rank

    @property
    def min_experts(self) -> int:
        """Smallest expert count of any layer."""
        return min(self.experts_per_layer) if self.experts_per_layer else self.num_experts

    def experts_for(self, position: int, num_targets: int) -> int:
        """Expert count of the ``position``-th targeted layer out of ``num_targets``."""
        if not self.experts_per_layer:
            return self.num_experts
        groups = len(self.experts_per_layer)
        return self.experts_per_layer[min(groups - 1, position * groups // num_targets)]

    def top_k_for(self, num_experts: int) -> int:
        """Top-k of a layer with ``num_experts`` experts (dense routes to all)."""
        return num_experts if self.router == "dense" else self.top_k

    def gcn_hidden_for(self, hidden_size: int) -> int | None:
        """The GCN width d_gcn the graph router is built with on a model of width ``hidden_size``.

        A GCN wider than the token's own representation buys nothing, so ``gcn_hidden`` is capped
        at ``hidden_size``. None when the router is not the graph router (no GCN is built).

        Args:
            hidden_size: the base model's hidden size d (``config.hidden_size`` of the model).
        """
        if self.router != "graph":
            return None
        if hidden_size < 1:
            raise ValueError(f"hidden_size: must be >= 1 (got {hidden_size!r})")
        return min(self.gcn_hidden, hidden_size)

    def to_dict(self) -> dict[str, Any]:
        """Resolved, JSON-ready values of every field."""
        out = dataclasses.asdict(self)
        out["lambda_range"] = list(self.lambda_range)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoELoRAConfig:
        """Build from a dict (YAML, JSON or Ray Tune); unknown keys raise a ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{unknown[0]}: unknown adapter field; known fields are {sorted(known)}"
            )
        return cls(**data)


__all__ = [
    "BALANCE_FORMS",
    "EXPERT_FEATURES",
    "METHOD_PRESETS",
    "ROUTERS",
    "MoELoRAConfig",
]
