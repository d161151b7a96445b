"""Parameter-server load balancing: a load model, a planner and a runtime rebalancing policy.

Round-robin placement of unequal variables makes hot parameter servers, and placing whole
variables largest-first by bytes piles the dense weights, pulled whole every step, onto one PS.
This package models each variable's load in two dimensions -- resident bytes (optimizer slots
included) and bytes moved per step (dense weights whole; embedding tables only the distinct rows
a batch touches, from declared or measured id frequencies) -- and plans, for a number of PS and
optional memory capacities, how many shards each variable gets, how many rows each holds and
which PS holds it, so that the largest normalised PS load is within a few percent of the lower
bound no plan can beat. :class:`RebalancePolicy` watches per-PS load in windows and, when one PS
stays hot, re-places shards moving as few bytes as it can. Everything here is pure (no
TensorFlow): the TF trainers apply a plan through their placement hooks. The command line,
``python -m kubeai_train.balance plan|report``, checks plans offline and prints placement reports.

Example::

    from kubeai_train import balance
    tables = [balance.embedding(f"emb_{i}", rows, 16, batch_size=512, slots=2, zipf=1.05)
              for i, rows in enumerate([1460, 583, 10131227])]
    plan = balance.Planner().plan(tables + [balance.dense("mlp/kernel", (512, 256), slots=2)], num_ps=4)
    plan.max_over_mean(), plan.lower_bound, plan.shard_counts(), plan.assignment()
"""

from kubeai_train.balance.load import dense, embedding, from_variable_infos, state
from kubeai_train.balance.planner import BalancedPlacement, Planner, lower_bound
from kubeai_train.balance.rebalance import RebalanceDecision, RebalancePolicy
from kubeai_train.balance.types import BalanceError, Plan, Shard, VariableLoad

__all__ = [
    "BalanceError",
    "BalancedPlacement",
    "Plan",
    "Planner",
    "RebalanceDecision",
    "RebalancePolicy",
    "Shard",
    "VariableLoad",
    "dense",
    "embedding",
    "from_variable_infos",
    "lower_bound",
    "state",
]
