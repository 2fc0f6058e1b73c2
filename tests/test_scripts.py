"""What the four scripts share instead of repeating it: one weights resolver, one --half policy, and scripts
that only parse and wire (no function of theirs over 60 lines)."""
from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest
import torch

from utils.runtime.device import use_half
from utils.runtime.runs import NEWEST_BEST, resolve_weights

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "test.py", "detect.py", "export.py")


def test_resolve_weights_takes_the_given_path_or_the_newest_best(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no --weights given"):
        resolve_weights("")
    assert resolve_weights("some/where.pt") == Path("some/where.pt")  # given: as it is, even if absent
    now = time.time()
    for name, age in (("exp", 300), ("exp2", 10), ("exp3", 100)):  # exp2 written last, exp3 has the top number
        f = tmp_path / "runs/train" / name / "weights/best.pt"
        f.parent.mkdir(parents=True)
        f.write_bytes(b"")
        os.utime(f, (now - age, now - age))
    assert Path(NEWEST_BEST).parts[:2] == ("runs", "train")
    assert resolve_weights(None) == Path("runs/train/exp2/weights/best.pt")


def test_half_policy_is_fp16_on_cuda_pytorch_only_else_a_warning(capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_half(False, cuda) is False and capsys.readouterr().err == ""
    assert use_half(True, cuda) is True and capsys.readouterr().err == ""
    assert use_half(True, cpu) is False
    assert "--half ignored (FP16 needs a CUDA device)" in capsys.readouterr().err
    assert use_half(True, cuda, exported=True) is False
    assert "exported model keeps its precision" in capsys.readouterr().err


def test_scripts_only_parse_and_wire():
    long = []
    for script in SCRIPTS:
        tree = ast.parse((ROOT / script).read_text())
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        assert funcs, script
        long += [f"{script}:{n.name} {n.end_lineno - n.lineno + 1} lines" for n in funcs
                 if n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


@pytest.mark.parametrize("script", ["test.py", "detect.py", "export.py"])
def test_scripts_share_the_resolver_and_the_half_policy(script):
    source = (ROOT / script).read_text()
    assert "resolve_weights(opt.weights)" in source and "use_half(" in source
    assert "latest_run(" not in source
