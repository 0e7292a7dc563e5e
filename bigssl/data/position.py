"""Which samples of the current epoch the trainer has consumed: the resumable stream position.

Shards are read front to back, and a sample only leaves a small shuffle buffer out of order,
so what has been consumed of a shard is a prefix plus a few ordinals beyond it. That is
exact, small (a number per shard touched this epoch plus at most a buffer's worth of
ordinals) and independent of how many ranks and workers read the shards, so a run can resume
at another world size.
"""

from __future__ import annotations

from collections.abc import Iterable


class Consumed:
    def __init__(self) -> None:
        self.prefix: dict[int, int] = {}  # shard → ordinals [0, prefix) consumed
        self.beyond: dict[int, set[int]] = {}  # shard → consumed ordinals past the prefix

    def mark(self, shard: int, ordinal: int) -> None:
        start = self.prefix.get(shard, 0)
        if ordinal < start:
            return
        if ordinal > start:
            self.beyond.setdefault(shard, set()).add(ordinal)
            return
        start += 1
        extra = self.beyond.get(shard)
        while extra and start in extra:
            extra.remove(start)
            start += 1
        if extra is not None and not extra:
            del self.beyond[shard]
        self.prefix[shard] = start

    def mark_all(self, shards: Iterable[int], ordinals: Iterable[int]) -> None:
        for shard, ordinal in zip(shards, ordinals, strict=True):
            self.mark(int(shard), int(ordinal))

    def contains(self, shard: int, ordinal: int) -> bool:
        return ordinal < self.prefix.get(shard, 0) or ordinal in self.beyond.get(shard, ())

    def count(self, shard: int) -> int:
        return self.prefix.get(shard, 0) + len(self.beyond.get(shard, ()))

    def merge(self, other: Consumed) -> None:
        for shard, start in other.prefix.items():
            for ordinal in range(self.prefix.get(shard, 0), start):
                self.mark(shard, ordinal)
        for shard, extra in other.beyond.items():
            for ordinal in extra:
                self.mark(shard, ordinal)

    def state_dict(self) -> dict[str, list[int]]:
        """Plain lists of ints, so checkpoints load with weights_only=True."""
        pairs = [(s, o) for s, extra in sorted(self.beyond.items()) for o in sorted(extra)]
        return {"prefix_shards": sorted(self.prefix), "prefix_ends": [self.prefix[s] for s in sorted(self.prefix)],
                "beyond_shards": [s for s, _ in pairs], "beyond_ordinals": [o for _, o in pairs]}

    @classmethod
    def from_state(cls, state: dict[str, list[int]]) -> Consumed:
        consumed = cls()
        consumed.prefix = dict(zip(state["prefix_shards"], state["prefix_ends"], strict=True))
        for shard, ordinal in zip(state["beyond_shards"], state["beyond_ordinals"], strict=True):
            consumed.beyond.setdefault(shard, set()).add(ordinal)
        return consumed

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Consumed) and self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        return f"Consumed({sum(self.count(s) for s in set(self.prefix) | set(self.beyond))} samples)"
