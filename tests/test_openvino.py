"""The OpenVINO checks (``tests/openvino_checks.py``) in a process of their own: OpenVINO's runtime, once
loaded, made the suite's process die with a segfault at a later fork or spawn, so it never loads here."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_openvino_checks_pass_in_their_own_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/openvino_checks.py", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "basetemp"), "-o", "addopts=", "-q"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    ran = re.search(r"(\d+) passed", proc.stdout)
    assert ran and int(ran.group(1)) >= 6 and "skipped" not in proc.stdout, proc.stdout[-2000:]
