"""The real Sidekiq, from Ruby (Debian's ruby-sidekiq), on the tests' own Redis database.

Jobs are pushed with `Sidekiq::Client.push` and the failure sets are read with Sidekiq's API
(`Sidekiq::DeadSet`, `RetrySet`, `Stats`), so the formats are proven by Sidekiq itself, not by
fastworker's own reader. Sidekiq's keys (`retry`, `dead`, `stat:*`) are per database, so the
tests use database SIDEKIQ_DB, emptied before and after each test.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from services.process import which

RUBY_DIR = Path(__file__).resolve().parent.parent / "ruby"
SIDEKIQ_DB = 15


def _ruby() -> str:
    ruby = which("ruby")
    if ruby is None:
        pytest.fail("ruby is not installed: scripts/setup-deps.sh installs ruby-sidekiq")
    return ruby


def sidekiq_push(
    url: str, queue: str, datas: Sequence[str], retry: bool | int | None = None
) -> int:
    """Pushes one DeferEvent job per data text with Sidekiq::Client.push; returns the count."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as data_file:
        data_file.write("".join(f"{data}\n" for data in datas))
        data_file.flush()
        args = [_ruby(), str(RUBY_DIR / "sidekiq_push.rb"), url, queue, data_file.name]
        if retry is not None:
            args.append("false" if retry is False else str(int(retry)))
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        pytest.fail(f"Sidekiq::Client.push failed ({done.returncode}):\n{done.stderr}")
    return int(done.stdout.strip())


def sidekiq_api(url: str, queue: str) -> dict[str, Any]:
    """What Sidekiq's API reads: dead and retry jobs, scheduled count, queue size, stats."""
    done = subprocess.run(
        [_ruby(), str(RUBY_DIR / "sidekiq_sets.rb"), url, queue],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"Sidekiq's API could not read the sets ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


__all__ = ["SIDEKIQ_DB", "sidekiq_api", "sidekiq_push"]
