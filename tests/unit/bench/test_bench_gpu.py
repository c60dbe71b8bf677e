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
import train_profile  # noqa: E402


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


def test_the_training_profile_measures_three_variants_and_sweeps_settings(smoke):
    """train-profile (issue 18 point 3), here eager on CPU: the same code and JSON keys as on a GPU."""
    figures, text = smoke
    profile = figures["train_profile"]
    assert profile["tokens_per_step"] == gpu.SMOKE.batch * gpu.SMOKE.context and profile["compiled"] is False
    assert list(profile["variants"]) == ["bare", "bare_deterministic", "library"]
    for v in profile["variants"].values():
        assert v["profiled_steps"] == 5 and v["kernel_ms_per_step"] > 0 and v["timeline_ms_per_step"] > 0
        assert 0 < v["busy_fraction"] <= 1 and v["timed_tokens_per_s"] > 0
        top = v["top_kernels"]
        assert len(top) == train_profile.TOP and [k["total_ms"] for k in top] == sorted(
            (k["total_ms"] for k in top), reverse=True
        )
        assert all(
            k["name"] and k["count"] > 0 and k["total_ms"] > 0 and 0 < k["pct_of_step"] < 1 for k in top
        )
        groups = v["groups"]
        assert list(groups) == list(train_profile.GROUPS)
        assert sum(g["pct_of_step"] for g in groups.values()) == pytest.approx(1.0)
        assert sum(g["ms_per_step"] for g in groups.values()) == pytest.approx(v["kernel_ms_per_step"])
        assert all(groups[g]["ms_per_step"] > 0 for g in ("matmul", "attention", "optimizer"))
    sweep = profile["sweep"]
    assert (
        [r["setting"] for r in sweep]
        == list(train_profile.DEFAULT_SWEEP)
        == ["strict-padded", "strict-unpadded"]
    )
    first = profile["variants"]["library"]["run"]  # strict-padded's first training is the profiled one
    assert sweep[0]["runs"][0] == first and first["steps"] == max(gpu.SMOKE.steps, gpu.SMOKE.warmup + 1 + 5)
    for r in sweep:
        assert (
            r["tokens_per_s"] > 0
            and r["vs_bare"] > 0
            and [x["steps"] for x in r["runs"]] == [first["steps"]] * 2
        )
        assert r["repeatable"] is True and r["inductor_missing"] == []  # CPU, eager: every setting repeats
    assert profile["variants"]["library"]["timed_tokens_per_s"] == sweep[0]["tokens_per_s"]
    assert "Where compiled training's time goes" in text and "| strict-unpadded |" in text
    assert (
        "Top 15 kernels, library (train_shard):" in text and "Largest differences from the bare loop" in text
    )


def test_the_sweep_compiles_only_what_the_profile_has_not(tmp_path, monkeypatch):
    """The compiled path, on CPU with a counting backend: the two bare variants compile (deterministic false,
    then the library's settings); the library's train_shard, strict-padded and nondeterministic reuse those
    graphs; each setting that changes inductor's config resets dynamo and compiles once more. So the default
    sweep costs three compilations in all, every setting four (bench/train_profile.py's time estimate)."""
    from torch._dynamo.testing import CompileCounter

    import sisaflow.training.loop as training

    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(training, "COMPILE_BACKEND", counter)
    monkeypatch.setattr(training, "_compiles", lambda compile_, device: compile_)
    monkeypatch.setattr(train_profile, "_compiles", lambda device: True)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter))
    section: dict = {}
    seen: list[tuple[str, int]] = []

    def save() -> None:
        done = [*section.get("variants", {}), *(r["setting"] for r in section.get("sweep", []))]
        if done and (not seen or seen[-1][0] != done[-1]):
            seen.append((done[-1], counter.frame_count))

    asked = ("strict-inductor-free", "nondeterministic", "strict-unpadded", "strict-padded")
    torch._dynamo.reset()
    try:
        train_profile.profile_section(gpu.SMOKE, torch.device("cpu"), tmp_path, save, section, 1, sweep=asked)
    finally:
        torch._dynamo.reset()
    assert seen == [
        ("bare", 1),
        ("bare_deterministic", 2),
        ("library", 2),
        ("strict-padded", 2),
        ("nondeterministic", 2),
        ("strict-unpadded", 3),
        ("strict-inductor-free", 4),
    ]
    assert all(r["repeatable"] and r["dynamo_reset"] is bool(r["inductor"]) for r in section["sweep"])


def test_the_profile_runs_alone_and_its_budget_skips_the_sweep(tmp_path):
    args = ["--smoke", "--out", str(tmp_path), "--profile-steps", "1", "--profile-budget-s", "0"]
    assert train_profile.main(args) == 0
    figures = json.loads((tmp_path / "train_profile.json").read_text())["train_profile"]
    assert all(v["profiled_steps"] == 1 for v in figures["variants"].values())
    assert [(r["setting"], "skipped" in r) for r in figures["sweep"]] == [
        ("strict-padded", True),
        ("strict-unpadded", True),
    ]
    assert "| strict-unpadded | skipped: " in (tmp_path / "train_profile.md").read_text()


@pytest.mark.parametrize(
    ("name", "group"),
    [  # kernel names as an H100/H200 profile shows them
        (
            "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>",
            "attention",
        ),
        (
            "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)",
            "attention",
        ),
        (
            "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0",
            "attention",
        ),
        (
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel",
            "matmul",
        ),
        ("nvjet_hsh_192x192_64x4_2x1_v_bz_coopB_TNN", "matmul"),
        ("triton_tem_fused_mm_0", "matmul"),
        (
            "void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>",
            "optimizer",
        ),
        (
            "void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float, float>(float const*)",
            "optimizer",
        ),
        ("triton_poi_fused__to_copy_add_mul_0", "elementwise / fused"),
        ("triton_red_fused__log_softmax_backward_data_nll_loss_backward_3", "elementwise / fused"),
        ("triton_poi_fused_constant_pad_nd_4", "copies / memset / padding"),
        ("Memcpy HtoD (Pinned -> Device)", "copies / memset / padding"),
        ("Memset (Device)", "copies / memset / padding"),
        (
            "void at::native::elementwise_kernel<128, 2, at::native::direct_copy_kernel_cuda>",
            "copies / memset / padding",
        ),
        (
            "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 1, 128, 1>",
            "copies / memset / padding",
        ),
        (
            "void at::native::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>",
            "elementwise / fused",
        ),
        ("void at::native::embedding_backward_feature_kernel<float, float, long>", "elementwise / fused"),
        ("aten::scatter_add_", "elementwise / fused"),
        ("aten::empty_strided", "other"),
    ],
)
def test_kernels_fall_in_their_groups(name, group):
    assert train_profile.group_of(name) == group


def test_a_spent_budget_skips_sections_and_says_so(tmp_path):
    assert gpu.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0", "--only", "ensemble"]) == 0
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert figures["ensemble"].startswith("skipped") and "train" not in figures
    assert "Skipped: ensemble" in (tmp_path / "gpu.md").read_text()


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--smoke", "--out", str(tmp_path), "--only", "train,speed"])
    assert exc.value.code == 2 and "speed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--smoke", "--out", str(tmp_path), "--profile-sweep", "strict-padded,fastest"])
    assert exc.value.code == 2 and "fastest" in capsys.readouterr().err
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
