"""The brokers a process may use (a RabbitMQ cluster's nodes), and which one to try next.

Why: RabbitMQ is the distributed part of the system. A worker given several `--amqp-url`s
connects to the first that answers and, when its node goes away, to another, instead of
waiting for that one node to come back. Each URL is read and checked on its own (its TLS
settings, its context), so the nodes of a cluster may differ in host, port and certificate
name. The order is the one given; after a node that worked is lost, the next attempt starts at
the node after it (the lost one is likely down), and a round that found no node answering
ends in the caller's capped backoff, not in a hot loop.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from fastworker import amqp_tls
from fastworker.amqp_url import AmqpUrl, split_urls


@dataclass(frozen=True, slots=True)
class Node:
    """One broker URL, parsed, with the TLS context its connections use (None for amqp://)."""

    url: AmqpUrl
    tls: ssl.SSLContext | None

    @property
    def masked(self) -> str:
        return self.url.masked


class Nodes:
    """The nodes in the order given, and a cursor: `current` is the one to try now.

    `connected()` says the current one worked (a round starts afresh from it); `failed()` moves
    on to the next one and says whether it belongs to the same round (try it at once) or the
    round is over (every node failed since the last success: back off first).
    """

    __slots__ = ("nodes", "_index", "_failures")

    def __init__(self, nodes: Sequence[Node]) -> None:
        if not nodes:
            raise ValueError("no broker URL")
        self.nodes = list(nodes)
        self._index = 0
        self._failures = 0  # since the last success

    @classmethod
    def parse(cls, urls: str | Sequence[str]) -> Nodes:
        """Each URL checked, its TLS context built; raises UrlError (a TlsSettingsError for
        an unusable CA, certificate or key file) naming what is wrong."""
        nodes = []
        for text in split_urls(urls):
            url = AmqpUrl.parse(text)
            nodes.append(Node(url, amqp_tls.client_context(url)))
        return cls(nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def current(self) -> Node:
        return self.nodes[self._index]

    def connected(self) -> None:
        """The current node works: a later loss starts a new round."""
        self._failures = 0

    def failed(self) -> bool:
        """The current node failed or was lost: moves to the next one. True when that one is
        still to be tried in this round, False when every node has failed since the last
        success (the caller backs off before the next round)."""
        self._index = (self._index + 1) % len(self.nodes)
        self._failures += 1
        if self._failures >= len(self.nodes):
            self._failures = 0
            return False
        return True

    def in_order(self) -> list[Node]:
        """Every node, the current one first: for tools that try each once (check, dlq)."""
        return self.nodes[self._index :] + self.nodes[: self._index]

    def describe(self) -> str:
        return ", ".join(node.masked for node in self.nodes)


__all__ = ["Node", "Nodes"]
