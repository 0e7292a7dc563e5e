"""The allocator setting `bigssl train` applies at start-up, and its opt-out."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from bigssl import runtime; print(runtime.keep_freed_memory())"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_keeps_freed_memory_unless_opted_out():
    def probe(value: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "BIGSSL_KEEP_FREED_MEMORY"}
        if value is not None:
            env["BIGSSL_KEEP_FREED_MEMORY"] = value
        return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert probe(None) == "True"
    assert probe("0") == "False"
