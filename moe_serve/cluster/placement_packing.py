"""Packing one node's expert pieces onto its GPUs with weighted replica shares.

`pack_node` takes the load each expert has on the node and returns, per GPU, the load each of its
slots serves. It is McNaughton's wrap-around rule with a choice of order: GPUs are filled one after
the other to exactly their fair share t = W / G; each GPU takes some experts whole and ends with one
"crossing" expert, of which it takes just the part that brings it to t; the rest of that expert
goes back to the pool for a later GPU (a second replica, one more slot). Every GPU but the last
adds at most one replica, so the node needs at most (its experts + G - 1) slots for perfect balance.

Which experts a GPU takes decides whether the slot limit S holds everywhere: each GPU takes about
its even share of the remaining slots, the smallest experts whole and the largest as its crossing
one, so heavy experts (even those above t) are cut into parts that sit beside small ones instead of
filling a GPU alone, which would waste its other slots.
"""

from __future__ import annotations

import math

# a crossing expert's remainder below this share of a GPU's fair load is not worth a slot: kept whole
RELATIVE_TOLERANCE = 1e-9


def pack_node(pieces: dict[int, float], gpus: int, slots: int) -> list[dict[int, float]]:
    """Per GPU, expert id -> load it serves. pieces: expert id -> load on this node (> 0)."""
    if len(pieces) > gpus * slots:
        raise ValueError(f"{len(pieces)} experts do not fit {gpus} GPUs x {slots} slots")
    total = sum(pieces.values())
    fair = total / gpus if total > 0 else 1.0
    pool = dict(pieces)
    held: list[dict[int, float]] = []
    for gpu in range(gpus):
        bins_left = gpus - gpu
        if not pool:
            held.append({})
            continue
        if bins_left == 1:
            held.append(pool)
            break
        taken = _fill_one_gpu(pool, fair, slots, bins_left)
        held.append(taken)
    _spread_overflow(held, slots)
    return held


def _fill_one_gpu(pool: dict[int, float], fair: float, slots: int, bins_left: int) -> dict[int, float]:
    """Take experts from `pool` (changed in place) for one GPU: smallest whole, largest crossing."""
    remaining = len(pool)
    # the pool after this GPU (one remainder back) must fit the later GPUs with their own remainders
    must_take = remaining + (bins_left - 1) - (bins_left - 1) * slots
    even = math.ceil((remaining + bins_left - 1) / bins_left)
    count = max(1, min(slots, max(even, must_take), remaining))
    ordered = sorted(pool, key=lambda e: (pool[e], e))
    if remaining + bins_left - 1 > bins_left * slots:
        # short of slots for a remainder at every later GPU: this one takes whole experts only
        return _fill_whole(pool, ordered, fair, count)
    crossing, rest = ordered[-1], ordered[:-1]
    inside = rest[: count - 1]
    inside_load = sum(pool[e] for e in inside)
    while inside and inside_load >= fair:  # the smallest already fill the GPU: take fewer
        inside_load -= pool[inside.pop()]
    # too little load for the slots: swap the smallest taken for the largest left that still leaves
    # room for a crossing part, until the crossing expert can bring the GPU to its fair share
    left = [e for e in rest if e not in inside]
    while inside_load + pool[crossing] < fair and left:
        fits = [e for e in left if inside_load + pool[e] < fair]
        if len(inside) + 1 < slots and fits:
            inside.append(fits[-1])
            left.remove(fits[-1])
            inside_load += pool[fits[-1]]
            continue
        smallest = min(inside, key=lambda e: (pool[e], e))
        room = fair - inside_load + pool[smallest]
        fitting = [e for e in left if pool[smallest] < pool[e] < room]
        if not fitting:
            break
        bigger = fitting[-1]
        inside[inside.index(smallest)] = bigger
        left.remove(bigger)
        left.append(smallest)
        left.sort(key=lambda e: (pool[e], e))
        inside_load += pool[bigger] - pool[smallest]
    taken = {e: pool.pop(e) for e in inside}
    part = min(fair - inside_load, pool[crossing])
    if pool[crossing] - part <= fair * RELATIVE_TOLERANCE:
        taken[crossing] = pool.pop(crossing)
    else:
        taken[crossing] = part
        pool[crossing] -= part
    return taken


def _fill_whole(pool: dict[int, float], ordered: list[int], fair: float, count: int) -> dict[int, float]:
    """Take `count` whole experts whose load comes closest to `fair`: one by one the expert closest
    to the load still wanted per slot left, then swaps of a taken expert for one left that bring the
    sum closer, best swap first."""
    inside, left, load = [], list(ordered), 0.0
    for slots_left in range(count, 0, -1):
        wanted = (fair - load) / slots_left
        pick = min(left, key=lambda e: (abs(pool[e] - wanted), e))
        inside.append(pick)
        left.remove(pick)
        load += pool[pick]
    while left:
        gap = fair - load
        best = min(((pool[j] - pool[i], i, j) for i in inside for j in left), key=lambda c: abs(gap - c[0]))
        if abs(gap - best[0]) >= abs(gap):
            break
        _, out, into = best
        inside[inside.index(out)] = into
        left[left.index(into)] = out
        load += best[0]
    return {e: pool.pop(e) for e in inside}


def _spread_overflow(held: list[dict[int, float]], slots: int) -> None:
    """Where a GPU ended with more experts than slots (only when the node is short of slots), move
    its smallest experts whole to the least-loaded GPUs with a free slot that lack them."""
    for gpu in range(len(held)):
        while len(held[gpu]) > slots:
            expert = min(held[gpu], key=lambda e: (held[gpu][e], e))
            options = [g for g in range(len(held)) if len(held[g]) < slots and expert not in held[g]]
            if not options:
                options = [g for g in range(len(held)) if g != gpu and expert in held[g]]
            if not options:
                raise ValueError(f"cannot fit the node's experts into {slots} slots per GPU")
            target = min(options, key=lambda g: (sum(held[g].values()), g))
            held[target][expert] = held[target].get(expert, 0.0) + held[gpu].pop(expert)
