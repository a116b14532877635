"""The MoE layer's math, one module per stage, free of transport and of any service.

The stages follow vLLM's and MegaBlocks' names, Router -> Dispatch -> Experts -> Combine:

- Router: `gating.py` turns hidden states into router logits, top-k expert ids and combine weights,
  exactly as each family's `transformers` router does; `capacity.py` then applies the expert capacity
  (GShard/Switch priority rule) and the overflow rule (drop or reroute).
- Dispatch: `dispatch.py` groups the kept (token, slot) pairs by expert (sort + bincount).
- Experts: the expert FFN runs in the worker, `expert_service/experts.py` (`expert_forward`), next to
  the weights it owns.
- Combine: `combine.py` places the rows delivered for a request by slot position and reduces them to
  the layer output as the model does.

The router service (`router_service/planner.py`) runs gating, capacity and dispatch; the gateway
(`gateway/deliveries.py`) runs combine.
"""
