"""Who may be targeted: only listed FPM endpoints, only scripts matching an allowed glob.

Anyone who can publish to the queue could otherwise make the worker run any PHP file on any host.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Mapping, Sequence

from fastworker.endpoint import Endpoint
from fastworker.job import BadMessage, Job, NotAllowed

# Longest file path the kernel resolves, terminating NUL included (Linux's PATH_MAX).
PATH_MAX = 4096


def parse_fpm(text: str) -> tuple[Endpoint, int | None]:
    """`ADDR` or `ADDR=max:N` (--fpm): the endpoint, and its own cap on connections (None:
    --concurrency). A pool's children bound what it can serve at once, so each may differ."""
    address, sep, cap = text.rpartition("=max:")
    if not sep:
        return Endpoint.parse(text), None
    try:
        connections = int(cap)
    except ValueError:
        connections = 0
    if connections < 1:
        raise ValueError(f"--fpm {text!r}: expected ADDR=max:N with N >= 1 connections")
    return Endpoint.parse(address), connections


def parse_alias(text: str) -> tuple[Endpoint, Endpoint]:
    """`NAMED=ACTUAL` (--fpm-alias): both FPM addresses, as `Endpoint.parse` reads them."""
    named, sep, actual = text.partition("=")
    if not sep or not named.strip() or not actual.strip():
        raise ValueError(
            f"--fpm-alias {text!r}: expected NAMED=ACTUAL, "
            "e.g. localhost:9000=unix:/run/php/php8.2-fpm.sock"
        )
    return Endpoint.parse(named), Endpoint.parse(actual)


class TargetPolicy:
    """Vets where a job may run. `aliases` maps an endpoint a message names to the one it runs
    on (a bundle's default `localhost:9000` to the pool's real socket); the target must be
    listed itself, so an alias never opens an endpoint the worker was not given."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        script_globs: Sequence[str],
        aliases: Mapping[Endpoint, Endpoint] | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one FPM endpoint is needed")
        if not script_globs:
            raise ValueError("at least one allowed script glob is needed")
        self.endpoints = tuple(endpoints)
        self.default_endpoint = self.endpoints[0]
        self._allowed = frozenset(self.endpoints)
        self.script_globs = tuple(script_globs)
        self.aliases = dict(aliases or {})
        for named, actual in self.aliases.items():
            if actual not in self._allowed:
                raise ValueError(
                    f"--fpm-alias {named}={actual}: {actual} is not listed with --fpm"
                )

    def resolve(self, job: Job) -> tuple[Endpoint, str]:
        """The endpoint and normalized script for `job`, or NotAllowed."""
        endpoint = job.endpoint or self.default_endpoint
        endpoint = self.aliases.get(endpoint, endpoint)
        if endpoint not in self._allowed:
            allowed = ", ".join(map(str, self.endpoints))
            raise NotAllowed(
                f"FPM endpoint {endpoint} is not listed with --fpm ({allowed}); if the job "
                f"should run on one of those, map it: --fpm-alias {endpoint}=ADDR"
            )
        return endpoint, self._check_script(job.script)

    def _check_script(self, script: str) -> str:
        if not script.startswith("/") or "\0" in script:
            raise NotAllowed(f"script {script[:200]!r} is not an absolute path")
        normalized = posixpath.normpath(script)
        size = len(normalized.encode("utf-8", "surrogatepass"))
        if size >= PATH_MAX:
            # No file has such a path: refused before it could make a request too large to send.
            raise BadMessage(
                f"script path of {size} bytes is longer than any file path ({PATH_MAX - 1}, "
                f"PATH_MAX): {normalized[:100]!r}..."
            )
        if not any(fnmatch.fnmatchcase(normalized, glob) for glob in self.script_globs):
            globs = " ".join(self.script_globs)
            raise NotAllowed(
                f"script {normalized[:200]!r} matches no --allow-script glob ({globs})"
            )
        return normalized
