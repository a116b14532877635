"""The controller's decisions, as pure functions of what it measured.

- `rebalance`: where each expert's replicas go and which share of its rows each takes (the
  node-aware placement planner, applied with hysteresis);
- `autoscale`: how many workers to have, from the workers' queued rows and throughput.

The controller (`moe_serve.cluster.controller`) measures, asks a policy, and turns the answer into
actions (`moe_serve.cluster.reconcile`); nothing here calls Ray, gRPC or a clock.
"""
