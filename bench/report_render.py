"""Rendering of bench/report.py's results: OUT/bench.json, OUT/bench.md (tables) and OUT/bench/*.png (plots)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {1: "tab:blue", 2: "tab:orange", 4: "tab:green"}


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _table(head: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "-" + "r" * (len(head) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(head) + " |", "| " + " | ".join(marks) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _layout(result: dict, shards: int, slices: int) -> dict:
    return next(x for x in result["layouts"] if x["shards"] == shards and x["slices"] == slices)


def steps_per_constituent(layout: dict, train: dict) -> float:
    """Mean optimizer steps of one constituent in the full training (batches per slice, times epochs)."""
    b, e = train["batch_size"], train["epochs_per_slice"]
    per_shard = [sum(-(-n // b) for n in row) * e for row in layout["full"]["slice_records"]]
    return sum(per_shard) / len(per_shard)


def reference(result: dict) -> dict:
    """One shard's training (mean over the shards of the default layout) and one measured forget there."""
    lay = _layout(result, *result["dvc_layout"])
    return {
        "layout": list(result["dvc_layout"]),
        "shard_training_seconds": lay["full"]["seconds"] / lay["shards"],
        "shard_training_wall_seconds": lay["full"]["wall_seconds"] / lay["shards"],
        # an average deletion: the exact expectation over owners, in seconds of this layout's training
        "forget_seconds": lay["expected"]["single"]["seconds"] * lay["full"]["seconds"],
    }


def overhead_rows(result: dict) -> list[tuple[str, float]]:
    """(what, seconds) for every fixed cost measured."""
    ray, pf = result["overhead"]["ray"], result["overhead"]["prefect"]
    dvc = _layout(result, *result["dvc_layout"])
    return [
        ("Ray: start a local Ray (`sisaflow.training.ray_launcher.connect`)", ray["start"]),
        ("Ray: no-op task round trip, fresh worker", ray["first_task"]),
        ("Ray: no-op task round trip, warm worker (median of 5)", ray["warm_task"]),
        ("Ray: `ray.shutdown()`", ray["shutdown"]),
        ("Prefect: `import prefect`", pf["import"]),
        ("Prefect: first trivial flow call (starts the temporary server)", pf["first_flow"]),
        ("Prefect: second trivial flow call", pf["second_flow"]),
        ("Prefect: the whole process (Python start, import, two calls, server stop)", pf["process"]),
        ("`sisaflow init` (git + DVC init, corpus import, git commit)", dvc["workspace_seconds"]),
        ("`dvc commit` after the full training", dvc["dvc"]["after_full"]["commit"]),
        ("`dvc status` after it", dvc["dvc"]["after_full"]["status"]),
        ("`dvc commit` after a single deletion's retraining", dvc["dvc"]["after_forget"]["commit"]),
        ("`dvc status` after it", dvc["dvc"]["after_forget"]["status"]),
    ]


def markdown(result: dict) -> str:
    st, m, k = result["setup"], result["machine"], result["setup"]["k"]
    preset = result["preset"]
    p = st["params"]
    mp, tp = p["model"], p["train"]
    ref = reference(result)
    mode = "`python bench/report.py --quick`" if result["mode"] == "quick" else "`python bench/report.py`"
    phases = ", ".join(f"{name} {sec:.0f} s" for name, sec in result["phases"].items())
    out = [
        "# sisaflow benchmark",
        "",
        f"{mode}, {m['date']}; {m['cpus']} CPUs, torch {m['torch']} on {m['torch_threads']} thread(s) "
        f"(training: train.threads = {tp['threads']}); load average {m['load_avg_1m_start']} at the start, "
        f"{m['load_avg_1m_end']} at the end (the machine is shared). Whole run: {result['run_seconds']:.0f} s "
        f"({phases}).",
        "",
        "## Set-up",
        "",
        f"- Corpus: {st['subset']} of `{st['corpus']}` (template `{p['corpus']['text_template']!r}`, owner = "
        f"`{p['corpus']['owner_field']}`). Never-seen records: {st['eval_records']['holdout']} of "
        f"`{st['holdout']}`; training records: {st['eval_records']['train']} of the subset (spread over the "
        "content-hash order).",
        f"- Settings: the repository's params.yaml, except for the time budget: model {preset['model']}, train "
        f"{preset['train']} (and CPU, one thread).",
        f"- Model: Llama from scratch, {mp['tokenizer']} tokenizer, hidden {mp['hidden_size']} x "
        f"{mp['layers']} layers, {mp['heads']} heads, MLP {mp['intermediate_size']}, context "
        f"{mp['context_length']}.",
        f"- Training: schedule {tp['schedule']}, {tp['epochs_per_slice']} epoch(s) per slice, batch "
        f"{tp['batch_size']}, learning rate {tp['learning_rate']}, warm-up {tp['warmup_steps']} steps, seed "
        f"{tp['seed']}, CPU, one thread; every shard in this process, one after another (no Ray, Prefect or DVC "
        "in the measured training: those are section 4).",
        f"- Deletions (seed {st['seed']}): two owners drawn at random, each deleted alone, and a batch of K = {k} "
        "owners drawn at random deleted together, the same owners in every layout; each applied to the fully trained layout: re-import without "
        "them, re-shard (only changed slice files are rewritten), retrain the stale shards from their first "
        "stale slice, register the ensemble.",
        "- Cost = retraining / full training of the same layout in this run, in tokens processed (what "
        "`train_shard` counts) and in seconds of training (the slice loops, as `train_shard` reports them).",
        "",
        "## 1. Forget cost vs full retraining",
        "",
        "*Expected* is exact over owners drawn uniformly at random (for K: K distinct owners), from this run's "
        "per-slice tokens and the layout's placement; a deleted owner's own records are not retrained. *Model* "
        "is the idealised cost model (equal shards and slices, uniform independent placement): "
        "(1/S)(R+1)/(2R) for one deletion, (1/R) sum_j [1 - (1 - j/(SR))^K] for K. *Measured* is what the "
        "deletions actually run retrained (two single owners; the batch); its tokens must equal the prediction "
        "from the owners' placement.",
        "",
    ]
    rows = []
    deletions = [x for lay in result["layouts"] for x in (*lay["singles"], lay["batch"])]
    exact = all(round(x["tokens"]) == round(x["predicted_tokens"]) for x in deletions)
    for lay in result["layouts"]:
        e, singles, b = lay["expected"], lay["singles"], lay["batch"]
        where = [
            f"{x['owners'][0]} ({x['placement'][x['owners'][0]][0]}, {x['placement'][x['owners'][0]][1]})"
            for x in singles
        ]
        rows.append(
            [
                str(lay["shards"]),
                str(lay["slices"]),
                f"{lay['full']['tokens']:,.0f}",
                _f(lay["full"]["seconds"], 1),
                "; ".join(where),
                "; ".join(_f(x["tokens_ratio"]) for x in singles),
                "; ".join(_f(x["seconds_ratio"]) for x in singles),
                _f(e["single"]["tokens"]),
                _f(e["single"]["model"]),
                f"{len(b['stale'])}/{lay['shards']}",
                _f(b["tokens_ratio"]),
                _f(b["seconds_ratio"]),
                _f(e["batch"]["tokens"]),
                _f(e["batch"]["model"]),
            ]
        )
    head = ["S", "R", "full tokens", "full s", "owners (shard, slice)", "1: measured tokens", "1: measured s",
            "1: expected", "1: model", f"{k}: shards retrained", f"{k}: measured tokens", f"{k}: measured s",
            f"{k}: expected", f"{k}: model"]  # fmt: skip
    out += _table(head, rows, "rrrrlrrrrrrrrr")
    ratios = sorted(x["seconds_ratio"] / x["tokens_ratio"] for x in deletions if x["tokens_ratio"] > 0)
    owners = result["layouts"][0]["owners"]
    out += [
        "",
        f"- Measured retrained tokens equal the prediction from the placement for every deletion: "
        f"{'yes' if exact else '**NO**'}; measured seconds / measured tokens (as ratios of the full training): "
        f"median {ratios[len(ratios) // 2]:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f} (time follows tokens; "
        "the spread is the shared machine). Expected seconds (the same computation on per-slice seconds) are in "
        "bench.json.",
        "- *Expected* sits below *model* for what the model leaves out: the deleted owners' own records are not "
        f"retrained (here {k} of {owners} owners, about {k / owners:.0%} of the tokens, for the batch), the "
        "batch's owners are distinct, and shards and slices are unequal on a subset this small.",
        "- A measured single deletion depends on where its owner sits: an owner in the last slice retrains that "
        "slice of its shard only, one in slice 0 the whole shard. The expectation averages over every owner.",
        "- Plot: [bench/forget_cost.png](bench/forget_cost.png).",
        "",
        "## 2. Utility vs S",
        "",
        "Perplexity (per byte token, end-of-text included) of the served ensemble (mixture of the constituents' "
        "next-token distributions, uniform weights, batched path) before any deletion. S = 1 is the monolithic "
        "model with the same total compute; *monolithic* below is S = 1, R = 1. Each constituent trains on 1/S "
        "of the records for the same epochs, so on this small subset it takes few optimizer steps (last column): "
        "the gap to the monolithic model is larger here than on the whole corpus.",
        "",
    ]
    mono = _layout(result, 1, 1)["utility"]
    slices = sorted({x["slices"] for x in result["layouts"]})
    shards = sorted({x["shards"] for x in result["layouts"]})
    rows = []
    for s in shards:
        row = [str(s)]
        for which in ("holdout", "train"):
            for r in slices:
                row.append(_f(_layout(result, s, r)["utility"][which]["perplexity"], 2))
        lay = _layout(result, s, max(slices))
        for which in ("holdout", "train"):
            row.append(_f(lay["utility"][which]["perplexity"] / mono[which]["perplexity"], 2))
        row.append(f"{steps_per_constituent(lay, tp):.0f}")
        rows.append(row)
    head = ["S"] + [f"never-seen R={r}" for r in slices] + [f"training R={r}" for r in slices]
    head += [f"never-seen / mono (R={max(slices)})", f"training / mono (R={max(slices)})"]
    head += ["steps per constituent"]
    out += _table(head, rows)
    im = result["inference"]["model"]
    out += [
        "",
        f"Monolithic: never-seen {mono['holdout']['perplexity']:.2f}, training {mono['train']['perplexity']:.2f}."
        " Plot: [bench/utility.png](bench/utility.png).",
        "",
        "## 3. Inference cost vs one model",
        "",
        f"Greedy generation, batch 1, a {32}-token prompt then {result['inference']['new_tokens']} new tokens "
        "(prefill included), never stopping early; median of "
        f"{result['inference']['repeats']} run(s) after a warm-up; the three take turns. *Batched*: "
        "`Ensemble` with `StackedLlama` (ensemble.batched: true); *loop*: `Ensemble` with one forward per "
        "constituent; *one model*: a plain transformers model with its cache. The model of the repository's "
        f"params.yaml (hidden {im['hidden_size']} x {im['layers']} layers, MLP {im['intermediate_size']}, "
        f"{im['tokenizer']} tokenizer), not the grid's smaller one; freshly initialised (speed does not depend on "
        "the weights).",
        "",
    ]
    rows = [
        [
            str(r["S"]),
            f"{r['one']:,.0f}",
            f"{r['batched']:,.0f}",
            f"{r['loop']:,.0f}",
            _f(r["batched"] / r["one"], 2),
            _f(r["loop"] / r["one"], 2),
            _f(r["batched"] / r["loop"], 2),
            "yes" if r["same_tokens"] else "**NO**",
        ]
        for r in result["inference"]["rows"]
    ]
    head = ["S", "one model tok/s", "batched tok/s", "loop tok/s", "batched / one", "loop / one",
            "batched / loop", "same tokens"]  # fmt: skip
    out += _table(head, rows, "rrrrrrrl")
    out += ["", "Plot: [bench/inference.png](bench/inference.png).", "", "## 4. Orchestration overhead"]
    out += [
        "",
        f"Fixed costs apart from training, against one shard's training in the S = {ref['layout'][0]}, R = "
        f"{ref['layout'][1]} layout ({ref['shard_training_seconds']:.1f} s of training, mean over its shards) "
        f"and against an average deletion's retraining there ({ref['forget_seconds']:.1f} s: the exact "
        "expectation over owners, section 1). The DVC rows run on that "
        "layout's workspace, made by `sisaflow init` (a real git + DVC repository).",
        "",
    ]
    rows = [
        [what, _f(sec, 2), _f(sec / ref["shard_training_seconds"], 3), _f(sec / ref["forget_seconds"], 3)]
        for what, sec in overhead_rows(result)
    ]
    out += _table(
        ["what", "seconds", "/ one shard's training", "/ an average forget's retraining"], rows, "lrrr"
    )
    dvc = _layout(result, *ref["layout"])["dvc"]
    clean = dvc["after_full"]["clean"] and dvc["after_forget"]["clean"]
    out += ["", f"`dvc status` clean after each commit: {'yes' if clean else '**NO**'}.", ""]
    return "\n".join(out)


def _deletions(layout: dict, which: str) -> list[dict]:
    return layout["singles"] if which == "single" else [layout["batch"]]


def plots(result: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    shards = sorted({x["shards"] for x in result["layouts"]})
    slices = sorted({x["slices"] for x in result["layouts"]})
    k = result["setup"]["k"]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, which, title in ((axes[0], "single", "one deletion"), (axes[1], "batch", f"a batch of K = {k}")):
        for r in slices:
            lays = [_layout(result, s, r) for s in shards]
            c = COLORS.get(r)
            ax.plot(shards, [x["expected"][which]["model"] for x in lays], "-", color=c, label=f"R={r} model")
            ax.plot(
                shards,
                [x["expected"][which]["tokens"] for x in lays],
                "o--",
                color=c,
                label=f"R={r} expected",
            )
            measured = [
                (s, x["tokens_ratio"]) for s, lay in zip(shards, lays) for x in _deletions(lay, which)
            ]
            ax.plot(*zip(*measured), "x", ms=9, color=c, label=f"R={r} measured")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(shards, [str(s) for s in shards])
        ax.set_xlabel("S (shards)")
        ax.set_title(f"forget cost, {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("retraining / full training (tokens, ratio)")
    axes[1].legend(fontsize=7, ncol=3, loc="lower left")
    fig.tight_layout()
    fig.savefig(directory / "forget_cost.png", dpi=120)
    plt.close(fig)

    mono = _layout(result, 1, 1)["utility"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, which, title in (
        (axes[0], "holdout", "never-seen records"),
        (axes[1], "train", "training records"),
    ):
        for r in slices:
            ys = [_layout(result, s, r)["utility"][which]["perplexity"] for s in shards]
            ax.plot(shards, ys, "o-", color=COLORS.get(r), label=f"ensemble, R={r}")
        ax.axhline(mono[which]["perplexity"], color="black", ls=":", label="monolithic (S=1, R=1)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(shards, [str(s) for s in shards])
        ax.set_xlabel("S (shards = constituents)")
        ax.set_ylabel("perplexity (per byte token)")
        ax.set_title(f"utility: {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(directory / "utility.png", dpi=120)
    plt.close(fig)

    rows = result["inference"]["rows"]
    xs = [r["S"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(xs, [r["one"] for r in rows], "k:", marker=".", label="one model")
    ax.plot(xs, [r["batched"] for r in rows], "o-", label="ensemble, batched (StackedLlama)")
    ax.plot(xs, [r["loop"] for r in rows], "s-", label="ensemble, loop over constituents")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xlabel("S (constituents)")
    ax.set_ylabel("generated tokens/s (batch 1, CPU)")
    ax.set_title("inference cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(directory / "inference.png", dpi=120)
    plt.close(fig)


def render(result: dict, out: Path) -> None:
    """Write bench.json, bench.md and the plots under `out`."""
    result = {**result, "reference": reference(result)}
    result["overhead"]["rows"] = [{"what": w, "seconds": s} for w, s in overhead_rows(result)]
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    plots(result, out / "bench")
    (out / "bench.md").write_text(markdown(result))
