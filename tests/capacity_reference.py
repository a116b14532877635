"""Plain-loop statements of the capacity rules, written independently of moe_serve.layer.capacity."""

from __future__ import annotations


def reference_capacity(
    expert_ids: list[list[int]], scores: list[list[float]], capacity: int, rule: str
) -> tuple[list[list[int]], list[list[str]]]:
    """(final expert per slot, status per slot: 'kept' | 'rerouted' | 'dropped').

    Priority: slot position first (all first choices, then all second choices, ...), then token
    order. Under 'reroute', overflow slots, in that priority order, then take their token's best
    remaining expert with room that the token does not use yet.
    """
    num_tokens, top_k = len(expert_ids), len(expert_ids[0])
    load: dict[int, int] = {}
    final = [row[:] for row in expert_ids]
    status = [["dropped"] * top_k for _ in range(num_tokens)]
    priority = [(slot, token) for slot in range(top_k) for token in range(num_tokens)]
    for slot, token in priority:
        expert = expert_ids[token][slot]
        if load.get(expert, 0) < capacity:
            load[expert] = load.get(expert, 0) + 1
            status[token][slot] = "kept"
    if rule != "reroute":
        return final, status
    for slot, token in priority:
        if status[token][slot] != "dropped":
            continue
        ranked = sorted(range(len(scores[token])), key=lambda e: (-scores[token][e], e))
        for expert in ranked:
            if load.get(expert, 0) < capacity and expert not in final[token] and scores[token][expert] > float("-inf"):
                load[expert] = load.get(expert, 0) + 1
                final[token][slot] = expert
                status[token][slot] = "rerouted"
                break
    return final, status
