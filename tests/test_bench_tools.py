"""The benchmark tools' own hooks still fit the code they measure."""

from __future__ import annotations

import subprocess
import sys

from support.processes import ROOT


def test_the_first_token_steps_hook_finds_every_step() -> None:
    # bench/firsttoken.py wraps the gateway's functions by name: a renamed one must
    # fail here, not in the middle of a benchmark run.
    script = (
        "from bench import firsttoken\n"
        "firsttoken.install_stamps()\n"
        "from gateway.provider.transport import HTTP1Transport\n"
        "assert HTTP1Transport._write.__qualname__.endswith('wrapper')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
