"""AdapterHub's composition blocks, as plain data: ``Stack``, ``Parallel`` and ``Fuse``.

    Stack("a", "b")            # a's output feeds b, at every adapter site (AdapterHub's Stack)
    Parallel("a", "b")         # the batch is copied once per child; copy i runs adapter i
    Fuse("a", "b")             # AdapterFusion: attention over a's and b's outputs (a fusion adapter must exist)
    Stack("a", Fuse("b", "c")) # nesting as AdapterHub allows it

A child is an adapter name or a block. AdapterHub's ``BatchSplit`` (rows of one batch to different
adapters) is :func:`slimtune.mixed_batch`; ``Split``, ``Average`` and ``MultiTask`` are not offered.
"""

from __future__ import annotations

from collections.abc import Iterator


class Block:
    """A composition block: an ordered list of children (adapter names or blocks)."""

    def __init__(self, *children: str | Block) -> None:
        if not children:
            raise ValueError(f"{type(self).__name__}() needs at least one adapter name or block.")
        for child in children:
            if not isinstance(child, (str, Block)):
                raise TypeError(f"{type(self).__name__} children are adapter names or blocks, got {child!r}.")
        self.children: list[str | Block] = list(children)

    def __iter__(self) -> Iterator[str | Block]:
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, Block) and other.children == self.children

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self.children)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(c) for c in self.children)})"

    def flatten(self) -> set[str]:
        """Every adapter name in the block, at any depth."""
        return {n for c in self.children for n in ({c} if isinstance(c, str) else c.flatten())}

    def first(self) -> str:
        child = self.children[0]
        return child if isinstance(child, str) else child.first()

    def last(self) -> str:
        child = self.children[-1]
        return child if isinstance(child, str) else child.last()

    @property
    def parallel_channels(self) -> int:
        """How many copies of the batch the block needs (AdapterHub's ``parallel_channels``)."""
        return max(1 if isinstance(c, str) else c.parallel_channels for c in self.children)


class Stack(Block):
    """Adapters in sequence: each child's output is the next child's input."""


class Parallel(Block):
    """Each child on its own copy of the batch, in one forward; the outputs come back stacked along the batch
    (rows ``i·B … (i+1)·B`` are child i's)."""

    @property
    def parallel_channels(self) -> int:
        return len(self.children)


class Fuse(Block):
    """AdapterFusion over the children's outputs; ``name`` defaults to AdapterHub's: the children joined by ","."""

    def __init__(self, *children: str | Block, name: str | None = None) -> None:
        super().__init__(*children)
        self._name = name

    @property
    def name(self) -> str:
        return self._name or ",".join(c if isinstance(c, str) else c.last() for c in self.children)

    def __repr__(self) -> str:
        named = f", name={self._name!r}" if self._name else ""
        return f"Fuse({', '.join(repr(c) for c in self.children)}{named})"


# What may sit inside what (AdapterHub's ALLOWED_NESTINGS, restricted to the blocks offered here).
ALLOWED = {Stack: (str, Fuse, Parallel), Fuse: (str, Stack), Parallel: (str, Stack)}


def validate(block: Block, level: int = 0) -> None:
    """Raise if ``block`` nests as AdapterHub does not allow (or deeper than one level below a Stack)."""
    for child in block:
        kind = str if isinstance(child, str) else type(child)
        if kind not in ALLOWED[type(block)]:
            allowed = ", ".join("adapter names" if t is str else t.__name__ for t in ALLOWED[type(block)])
            raise ValueError(f"{child!r} cannot sit inside {type(block).__name__}; it takes {allowed}.")
        if isinstance(child, Block):
            if level >= 1 and not isinstance(child, Stack):
                raise ValueError(f"{block!r} nests too deep: AdapterHub allows only a Stack below level 1.")
            if isinstance(block, Stack) and level >= 1:
                raise ValueError(f"{block!r} nests too deep: a nested Stack takes adapter names only.")
            validate(child, level + 1)
