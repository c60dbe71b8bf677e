"""bench/gpu.py, the script a session with a GPU runs for issue 5's figures: its --smoke mode on CPU (tiny shapes)
goes through every section, so the script cannot rot between sessions that have a device."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import gpu  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu")
    assert gpu.main(["--smoke", "--out", str(out)]) == 0
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


def test_training_compares_the_library_with_a_bare_loop_on_the_same_batches(smoke):
    figures, _ = smoke
    s = gpu.SMOKE
    train = figures["train"]["eager"]
    assert train["bare"]["tokens"] == s.steps * s.batch * s.context
    # every record fills the context, so the library's batches have the bare loop's shape
    for run in train["library"]:
        assert run["steps"] == s.steps and run["tokens"] == s.steps * s.batch * s.context
        assert run["tokens_per_s"] > 0 and run["final_loss"] > 0
    assert train["library_vs_bare"] == pytest.approx(  # the default settings, as a further shard runs
        train["library"][1]["tokens_per_s"] / train["bare"]["tokens_per_s"]
    )
    assert [(r["run"], r["deterministic"]) for r in train["library"]] == [
        ("first", True),
        ("second", True),
        ("fast", False),
    ]
    assert train["library_fast_vs_bare"] == pytest.approx(
        train["library"][-1]["tokens_per_s"] / train["bare"]["tokens_per_s"]
    )
    lora = figures["lora_train"]
    assert [r["steps"] for r in lora["library"]] == [s.steps, s.steps]


def test_repeatability_is_judged_on_the_checkpoints_weights(smoke):
    """Two library runs train the same data from the same seed: on CPU their weights are bitwise equal, and the
    figure says so (on a GPU it is what the run finds out)."""
    figures, text = smoke
    for runs in (figures["train"]["eager"]["library"], figures["lora_train"]["library"]):
        assert runs[0]["weights"] == runs[1]["weights"] and len(runs[0]["weights"]) == 64
    assert figures["train"]["eager"]["repeatable"] is True and figures["lora_train"]["repeatable"] is True
    assert "| eager | two library runs bitwise equal | yes |" in text


def test_ensembles_are_measured_for_every_size_and_pick_the_loops_tokens(smoke):
    figures, text = smoke
    for key, fast in (("ensemble", "stacked"), ("lora_ensemble", "batched"), ("lora_ensemble", "stacked")):
        rows = figures[key]
        assert [r["S"] for r in rows] == sorted(gpu.SMOKE.sizes, reverse=True)  # the goal's S first
        assert all(r["same_tokens"] and r[fast] > 0 and r["loop"] > 0 for r in rows)
    assert all(r["stacked_same_tokens"] for r in figures["lora_ensemble"])  # the random base is a Llama
    assert "Ensemble generation, LoRA constituents" in text and "| library / bare |" in text


def test_a_spent_budget_skips_sections_and_says_so(tmp_path):
    assert gpu.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0", "--only", "ensemble"]) == 0
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert figures["ensemble"].startswith("skipped") and "train" not in figures
    assert "Skipped: ensemble" in (tmp_path / "gpu.md").read_text()


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--smoke", "--out", str(tmp_path), "--only", "train,speed"])
    assert exc.value.code == 2 and "speed" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            gpu.main(["--out", str(tmp_path)])
        assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """On the device one run is all there is: an error in one section must not lose the others."""

    def broken(*args):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(gpu, "ensemble_section", broken)
    out = ["--smoke", "--keep-going", "--out", str(tmp_path), "--only", "ensemble,lora-ensemble"]
    assert gpu.main(out) == 0
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert figures["ensemble_error"] == "RuntimeError: no kernel image for this device"
    assert all(r["same_tokens"] for r in figures["lora_ensemble"])
    assert "Failed: ensemble (RuntimeError: no kernel image" in (tmp_path / "gpu.md").read_text()
    with pytest.raises(RuntimeError):  # --smoke alone stops at the error, so tests see it
        gpu.main(["--smoke", "--out", str(tmp_path), "--only", "ensemble"])
