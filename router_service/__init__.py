"""Router service: gating, capacity, replica choice and fan-out of token rows to expert workers."""
