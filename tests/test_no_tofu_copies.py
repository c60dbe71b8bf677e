"""Nothing committed outside data/ quotes a TOFU record that `make demo-tiny` may forget.

This repository is `make demo-tiny`'s workspace, and each `make demo-tiny` forgets the highest TOFU author left
(199, then 198, ...); its deletion scan searches the workspace and its git history for the forgotten records'
ids and fields, so a benchmark result, a doc or a script quoting one of them would make the demo refuse to certify (it
happened once: a quoted question of author 199). Authors 100-199 are the demo's for a hundred runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIN_FIELD = 24  # the scan's pieces are whole fields; short ones ("Yes.") would match by chance


def test_no_tracked_file_outside_data_quotes_a_record_the_demo_may_forget():
    rows = [json.loads(x) for x in (REPO / "data/tofu/records.jsonl").read_text().splitlines() if x.strip()]
    demo_owned = [r for r in rows if r["author_id"] >= 100]
    patterns = {r["id"] for r in demo_owned} | {
        v for r in demo_owned for v in (r["question"], r["answer"]) if len(v) >= MIN_FIELD
    }
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for name in files:
        if name.startswith("data/") or not (REPO / name).is_file():
            continue
        text = (REPO / name).read_text(errors="replace")
        found += [(name, p[:40]) for p in patterns if p in text]
    assert not found, found[:10]
