"""The import graph reads top-down: no module imports one from a layer above its own.

The layers are those of docs/architecture.md; a module missing here fails the test, so a new
module gets a place in the map (and in the document) when it is added.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top; a module may import from its own layer and the ones listed before it.
LAYERS: list[tuple[str, set[str]]] = [
    ("vocabulary", {"__init__", "endpoint", "outcome", "message", "callbacks", "stats"}),
    ("ordering", {"priorities"}),
    (
        "codecs",
        {"fcgi_base", "fcgi_py", "_fcgi_codec", "amqp_base", "amqp_py", "_amqp_codec", "codec"},
    ),
    (
        "message -> job",
        {"job", "trace_context", "job_context", "formats", "targets", "sidekiq_jobs"},
    ),
    ("job -> request -> outcome", {"cgi", "fpm", "balance", "executor", "console_executor"}),
    ("broker address", {"amqp_url", "amqp_tls", "amqp_nodes"}),
    ("settle", {"queue_types", "broker", "failures", "sidekiq_store", "sidekiq_failures"}),
    ("handler", {"handler"}),
    (
        "consumers",
        {"acks", "consuming", "amqp_wire", "consumer", "fast_consumer", "sidekiq_consumer"},
    ),
    (
        "process",
        {
            "worker",
            "supervisor",
            "control",
            "config",
            "metrics",
            "logs",
            "cli",
            "dlq",
            "sidekiq_dlq",
            "check",
            "__main__",
            # `fastworker web`, the dashboard: cli dispatches to it, and it reads dlq's letters
            "web",
            "web_app",
            "web_pages",
            "web_chart",
            "web_html",
            "web_letters",
            "web_sampler",
            "web_amqp",
            "web_sidekiq",
            "web_security",
        },
    ),
]
LAYER = {module: index for index, (_, modules) in enumerate(LAYERS) for module in modules}


def sources() -> dict[str, str]:
    found = {p.stem: p.read_text() for p in (SRC / "fastworker").glob("*.py")}
    found.update({p.stem: p.read_text() for p in SRC.rglob("*.pyx")})
    return found


def imported(source: str, is_pyx: bool) -> set[str]:
    """fastworker modules (the compiled codecs among them) a module imports, at any depth."""
    names: set[str] = set()
    if is_pyx:  # Cython: plain import lines are enough
        for line in source.splitlines():
            if match := re.match(r"\s*from\s+fastworker\s+import\s+([\w, ]+)", line):
                names.update(name.strip() for name in match.group(1).split(","))
            elif match := re.match(r"\s*(?:from|import)\s+fastworker\.(\w+)", line):
                names.add(match.group(1))
        return names
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "fastworker":
                names.update(alias.name for alias in node.names)
            elif node.module.startswith("fastworker."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fastworker."):
                    names.add(alias.name.split(".")[1])
    return names


def test_every_module_has_a_layer() -> None:
    assert sorted(set(sources()) - set(LAYER)) == []


def test_no_module_imports_one_above_it() -> None:
    upward = []
    for module, source in sorted(sources().items()):
        is_pyx = source.lstrip().startswith("# cython")
        for name in sorted(imported(source, is_pyx)):
            if name in LAYER and LAYER[name] > LAYER[module]:
                upward.append(
                    f"{module} ({LAYERS[LAYER[module]][0]}) imports {name} "
                    f"({LAYERS[LAYER[name]][0]})"
                )
    assert upward == []
