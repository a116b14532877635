"""Running a stack on a cluster: launching, supervising, placing and scaling.

- `launcher`: starts the router, the gateway and the deployment controller of a stack (`moe-serve up`);
  `lifecycle` and `watchdog`: nothing of it outlives `up`; `supervisor`: restarts a service that died;
- `controller`: the deployment controller, a Ray actor that owns the expert-worker actors; its
  changes are computed by `reconcile` (desired state in, actions out) and decided by `policies/`
  (rebalance, autoscale);
- placement: `placement` (expert keys, the standard block plan), `placement_planner` and
  `placement_packing` (node-aware plans with replica shares), `placement_figures`, `balancer`
  (DeepSeek's EPLB), `capacity_model` (how many GPUs a shape and traffic need).

Nothing here imports a service package: the worker actor class is handed in by the caller.
"""
