"""A token-exact prefix cache of recurrent states, one per loaded model version.

A recurrent model's whole context is its state, a few kilobytes whatever the prompt's length, so the state
after any prefix of a prompt can be kept and a later prompt that starts with the same tokens resumes from it
instead of feeding them again. The cache is a radix tree over token ids (edges hold runs of tokens, so a long
prompt costs a few nodes, not one per token); a node may hold the state after the tokens on its path from
the root, which begins at the zero state (a fresh generation's <bos> is the first token).

A lookup returns the deepest state on a prompt's path no deeper than the caller allows: a generation that
chooses its first token from the prefill's last log-probs needs at least its last token fed, so for a prompt
of n tokens it asks for depth <= n - 1, and the state it gets is the sessions' form: the state before the last
token, that token pending. The lookup also says how far the prompt runs along paths already in the tree
(`shared`): where two prompts part, a state is worth keeping for the third one.

Bounded by bytes (every state's buffers, plus a small charge per node and per token of the tree), least
recently used first out. Only the engine's worker thread uses a cache, so it takes no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

State = tuple[np.ndarray, ...]

NODE_BYTES = 128  # bookkeeping charged per node of the tree (its object, its children's dict entry)
TOKEN_BYTES = 8  # charged per token on an edge (a pointer in a tuple; small ints are shared)


@dataclass(eq=False)
class _Node:
    edge: tuple[int, ...]  # the tokens from the parent to this node
    parent: _Node | None
    depth: int  # tokens from the root to this node
    children: dict[int, _Node] = field(default_factory=dict)  # by the first token of the child's edge
    state: State | None = None


@dataclass(frozen=True)
class CacheHit:
    depth: int  # tokens of the prompt the state covers (0: none, start from the zero state)
    state: State | None  # the state after those tokens; None when depth is 0
    shared: int  # tokens of the prompt that run along a path of the tree (>= depth)


class CacheMetrics:
    """What a cache reports, bound to its model's label (`server.metrics.ModelMetrics.prefix_cache`)."""

    def __init__(self, hit_tokens, hits, misses, bytes_held, evictions):
        self.hit_tokens = hit_tokens  # counter: prompt tokens not computed thanks to the cache
        self.hits = hits  # counter: lookups that found a state
        self.misses = misses  # counter: lookups that found none
        self.bytes_held = bytes_held  # gauge (versions of one model add up: moved by differences)
        self.evictions = evictions  # counter: states dropped to stay within the byte limit


class PrefixCache:
    """The states after prompt prefixes of one model version, within `capacity_bytes` (0: the cache is off)."""

    def __init__(self, capacity_bytes: int, stride: int = 64, metrics: CacheMetrics | None = None):
        if capacity_bytes < 0 or stride < 1:
            raise ValueError(f"a prefix cache needs capacity_bytes >= 0 and stride >= 1, got {capacity_bytes}, "
                             f"{stride}")
        self.capacity_bytes = capacity_bytes
        self.stride = stride  # a long prompt's state is also kept every `stride` tokens
        self.min_branch = max(1, stride // 8)  # a parting point is kept if it saves at least this many tokens
        self._metrics = metrics
        self._root = _Node((), None, 0)
        self._lru: OrderedDict[_Node, None] = OrderedDict()  # nodes holding a state, least recently used first
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    def states(self) -> int:
        """States held."""
        return len(self._lru)

    def lookup(self, tokens: Sequence[int], max_depth: int) -> CacheHit:
        """The deepest state on the path of `tokens` at depth <= `max_depth`, counted as a hit or
        a miss; the state found becomes the most recently used."""
        tokens = tokens if isinstance(tokens, tuple) else tuple(tokens)
        node, position, best = self._root, 0, None
        length = len(tokens)
        while position < length:
            child = node.children.get(tokens[position])
            if child is None:
                break
            edge = child.edge
            end = position + len(edge)
            if tokens[position:end] != edge:
                position += _common_length(edge, tokens, position)
                break
            node, position = child, end
            if child.state is not None and end <= max_depth:
                best = child
        metrics = self._metrics
        if best is None:
            if metrics is not None:
                metrics.misses.inc()
            return CacheHit(0, None, position)
        self._lru.move_to_end(best)
        if metrics is not None:
            metrics.hits.inc()
            metrics.hit_tokens.inc(best.depth)
        return CacheHit(best.depth, best.state, position)

    def insert(self, tokens: Sequence[int], state: State) -> None:
        """Keep `state`, the state after `tokens` fed from the zero state; the arrays are
        copied. A state already there is only marked used."""
        if not tokens:
            return
        node = self._node_at(tokens if isinstance(tokens, tuple) else tuple(tokens))
        if node.state is not None:
            self._lru.move_to_end(node)
            return
        node.state = tuple(np.array(s, dtype=np.float32, copy=True) for s in state)
        self._lru[node] = None
        self._grow(sum(s.nbytes for s in node.state))
        self._shrink_to(self.capacity_bytes)

    def clear(self) -> None:
        """Drop every state (the model version is leaving)."""
        self._root = _Node((), None, 0)
        self._lru.clear()
        self._grow(-self.bytes)

    # --- the tree -------------------------------------------------------------------------------------

    def _node_at(self, tokens: tuple[int, ...]) -> _Node:
        """The node at the end of `tokens`' path, made (and an edge split) if it is not there."""
        node, position, length = self._root, 0, len(tokens)
        while position < length:
            child = node.children.get(tokens[position])
            if child is None:
                leaf = _Node(tokens[position:], node, length)
                node.children[tokens[position]] = leaf
                self._grow(NODE_BYTES + TOKEN_BYTES * len(leaf.edge))
                return leaf
            edge = child.edge
            common = _common_length(edge, tokens, position)
            if common == len(edge):
                node, position = child, position + common
                continue
            # The path leaves (or ends inside) the child's edge: a node where it does.
            middle = _Node(edge[:common], node, node.depth + common, {edge[common]: child})
            node.children[edge[0]] = middle
            child.edge, child.parent = edge[common:], middle
            self._grow(NODE_BYTES)
            node, position = middle, position + common
        return node

    def _shrink_to(self, limit: int) -> None:
        evicted = 0
        while self.bytes > limit and self._lru:
            node, _ = self._lru.popitem(last=False)
            self._grow(-sum(s.nbytes for s in node.state))
            node.state = None
            self._prune(node)
            evicted += 1
        if evicted and self._metrics is not None:
            self._metrics.evictions.inc(evicted)

    def _prune(self, node: _Node) -> None:
        """A node that lost its state: remove it if it leads nowhere, merge it into its one child if it has
        one, and go on with its parent, which may now be the same."""
        while node is not self._root and node.state is None and len(node.children) <= 1:
            parent = node.parent
            if not node.children:
                del parent.children[node.edge[0]]
                self._grow(-(NODE_BYTES + TOKEN_BYTES * len(node.edge)))
            else:
                (child,) = node.children.values()
                child.edge, child.parent = node.edge + child.edge, parent
                parent.children[node.edge[0]] = child
                self._grow(-NODE_BYTES)
            node = parent

    def _grow(self, delta: int) -> None:
        if delta:
            self.bytes += delta
            if self._metrics is not None:
                self._metrics.bytes_held.inc(delta)


def _common_length(edge: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    """How many leading tokens of `edge` equal tokens[start:]."""
    limit = min(len(edge), len(tokens) - start)
    for index in range(limit):
        if edge[index] != tokens[start + index]:
            return index
    return limit


def prefill_stops(length: int, start: int, stride: int, extra: Sequence[int] = ()) -> list[int]:
    """Depths in (start, length] where a prefill from depth `start` over a prompt of `length` tokens stops to
    keep the state: every multiple of `stride`, the `extra` depths, and the end; ascending, no repeats (none
    when `start` is already at the end)."""
    if start >= length:
        return []
    stops = set(range((start // stride + 1) * stride, length, stride))
    stops.update(d for d in extra if start < d < length)
    stops.add(length)
    return sorted(stops)
