"""benchmarks/speed.py: its table and onnxruntime's per-row profile on a tiny random-weights model."""
from __future__ import annotations

import re

from benchmarks import speed


def test_speed_table_and_ort_profile_by_cfg_row(tiny_cfg_file, capsys):
    rc = speed.main(["--cfg", str(tiny_cfg_file), "--sizes", "64", "--batches", "1", "--iters", "1", "--warmup", "0",
                     "--nc", "3", "--sem-classes", "4", "--flops-img", "64", "--ort-profile"])
    out = capsys.readouterr().out
    assert rc == 0 and "nc 3, 4 semantic classes" in out
    total = float(re.search(r"onnxruntime profile, \(1, 3, 64, 64\), 1 thread\(s\): ([\d.]+) ms", out).group(1))
    rows = dict(re.findall(r"^  (layers\.\d+|other[^\d]*?)\s+([\d.]+) ms\s+[\d.]+%$", out, re.MULTILINE))
    # every head is a row of its own, and no row takes more than the whole
    assert {"layers.26", "layers.27", "layers.28"} <= set(rows), rows
    assert all(0 <= float(v) <= total for v in rows.values())
    # the 10 slowest nodes, whichever they are (a layout reorder outside the cfg rows may be among them)
    nodes = re.findall(r"^\s+[\d.]+ ms  (\S+)", out.split("slowest nodes:")[1], re.MULTILINE)
    assert len(nodes) == 10 and any(n.startswith("/model/layers.") for n in nodes), nodes
    assert re.search(r"^\s+64\s+1 \|", out, re.MULTILINE)  # the latency table still follows
