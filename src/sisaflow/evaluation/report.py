"""Write what `sisaflow evaluate` measured: reports/metrics.json (for `dvc metrics show`), reports/report.md and
PNG plots in reports/plots/ (for `dvc plots show`). Numbers, counts and request ids only: never a record's text."""

from __future__ import annotations

from pathlib import Path

from sisaflow.core.fsio import write_json, write_text
from sisaflow.core.paths import Workspace
from sisaflow.evaluation.evaluate import ATTACKS

ATTACK_NAMES = {"loss": "LOSS", "zlib": "zlib", "min_k": "Min-K%", "min_k_plus_plus": "Min-K%++"}


def reports_dir(ws: Workspace) -> Path:
    return ws.root / "reports"


def write_reports(ws: Workspace, result: dict) -> list[Path]:
    """metrics.json, report.md and the plots; returns the paths written."""
    out = reports_dir(ws)
    paths = [out / "metrics.json", out / "report.md"]
    write_json(paths[0], result)
    plots = _plots(result, out / "plots")
    write_text(paths[1], markdown(result, [p.relative_to(out).as_posix() for p in plots]))
    return paths + plots


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(a: dict | None) -> str:
    return "n/a" if not a else f"{a['auc']:.3f} [{a['low']:.3f}, {a['high']:.3f}]"


def _rouge(v: dict | None) -> str:
    """ROUGE-L F1 / recall of a `verbatim` result (recall n/a in results written before it was recorded)."""
    v = v or {}
    return f"{_f(v.get('rouge_l'))} / {_f(v.get('rouge_l_recall'))}"


def markdown(r: dict, plots: list[str]) -> str:
    """The human-readable report."""
    g = r["groups"]
    u = r["utility"]
    lines = [
        "# sisaflow evaluation",
        "",
        f"Ensemble version `{r['ensemble_version']}`, {r['constituents_served']} constituent(s) served. Records "
        f"scored: {g['retained']} retained, {g['never_seen']} never-seen, {g['forgotten']} forgotten "
        "(a deterministic sample by content hash). Perplexity is per token of the model's tokenizer.",
        "",
        "## Utility",
        "",
        "| model | retained records | never-seen records |",
        "| --- | --- | --- |",
        f"| ensemble | {_f(u['ensemble']['retained'])} | {_f(u['ensemble']['never_seen'])} |",
    ]
    if "baseline" in u:
        b = u["baseline"]
        lines.append(
            f"| monolithic baseline (one model, all data, same compute; trained in {b['train_seconds']:.0f} s) "
            f"| {_f(b['retained'])} | {_f(b['never_seen'])} |"
        )
    lines += [
        "",
        "| constituent | own shard's records | other shards' records | never-seen |",
        "| --- | --- | --- | --- |",
    ]
    for c in u["constituents"]:
        p = c["perplexity"]
        lines.append(
            f"| shard {c['shard']} | {_f(p['own_shard'])} | {_f(p['other_shards'])} | {_f(p['never_seen'])} |"
        )
    f = r["forgetting"]
    lines += [
        "",
        "## Forgetting",
        "",
        "Membership-inference AUC with 95% bootstrap interval. Forgotten vs never-seen should sit near 0.5; the "
        "controls (records the models did train on vs never-seen) show how much power each attack has here.",
        "",
        "| attack | forgotten vs never-seen | retained vs never-seen (ensemble) | "
        + " | ".join(f"shard {c['shard']} own vs never-seen" for c in u["constituents"])
        + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in u["constituents"]) + " |",
    ]
    for a in ATTACKS:
        own = [(c["attacks_own_vs_never_seen"] or {}).get(a) for c in u["constituents"]]
        gone = (f["attacks_forgotten_vs_never_seen"] or {}).get(a)
        kept = (f["attacks_retained_vs_never_seen"] or {}).get(a)
        lines.append(
            f"| {ATTACK_NAMES[a]} | {_ci(gone)} | {_ci(kept)} | " + " | ".join(_ci(x) for x in own) + " |"
        )
    v = f["verbatim"]
    lines += [
        "",
        "Verbatim memorisation: ROUGE-L F1 / recall (rouge-score with stemming, as TOFU computes it) of the greedy "
        "continuation of a record's first half against its true continuation.",
        "",
        "| forgotten | retained | never-seen |",
        "| --- | --- | --- |",
        "| " + " | ".join(_rouge(v[k]) for k in ("forgotten", "retained", "never_seen")) + " |",
    ]
    if "tofu" in r:
        t = r["tofu"]
        lines += [
            "",
            "## TOFU",
            "",
            "| truth ratio (geometric mean form; < 1: the model prefers the true answer) | n | mean | median |",
            "| --- | --- | --- | --- |",
        ]
        for k in ("forgotten", "retained"):
            s = t[f"truth_ratio_{k}"]
            lines.append(f"| {k} | {s['n'] if s else 0} | {_f(s and s['mean'])} | {_f(s and s['median'])} |")
        lines += [
            "",
            f"Forget quality (KS-test p-value against the model retrained without the forget set): "
            f"{_f(t['forget_quality'])}. In SISA that reference is the served ensemble itself, bitwise "
            "(`sisaflow verify --exact`), so the value is 1 by construction.",
        ]
    if "classification" in r:
        c = r["classification"]
        lines += [
            "",
            f"## Classification ({c['rule']} of the constituents' class probabilities)",
            "",
            "| group | records | accuracy |",
            "| --- | --- | --- |",
        ]
        for k in ("retained", "never_seen", "forgotten"):
            acc = c[k] or {}
            lines.append(f"| {k.replace('_', '-')} | {acc.get('records', 0)} | {_f(acc.get('accuracy'))} |")
    for e in r["before_after"]:
        b, a = e["before"], e["after"]
        lines += [
            "",
            f"## Before and after deletion run {e['run_id']} ({len(e['requests'])} request(s), {a['records']} records)",
            "",
            "| | before | after |",
            "| --- | --- | --- |",
            f"| perplexity of the forgotten records | {_f(b['perplexity'])} | {_f(a['perplexity'])} |",
        ]
        for k in ATTACKS:
            lines.append(
                f"| {ATTACK_NAMES[k]} AUC vs never-seen | {_ci((b['attacks_vs_never_seen'] or {}).get(k))} "
                f"| {_ci((a['attacks_vs_never_seen'] or {}).get(k))} |"
            )
        lines.append(
            f"| ROUGE-L F1 / recall of continuations | {_rouge(b['verbatim'])} | {_rouge(a['verbatim'])} |"
        )
        if "routing_vs_never_seen" in b or "routing_vs_never_seen" in a:
            lines.append(
                "| routing: former shard's weight, AUC vs never-seen | "
                f"{_ci(b.get('routing_vs_never_seen'))} | {_ci(a.get('routing_vs_never_seen'))} |"
            )
        if "priv_leak_before" in e:
            lines.append(
                f"| PrivLeak (Min-K%, vs the retrained model) | {_f(e['priv_leak_before'])} | {_f(e['priv_leak_after'])} |"
            )
        if "forget_quality_before" in e:
            lines.append(
                f"| TOFU forget quality | {_f(e['forget_quality_before'], 4)} | {_f(e['forget_quality_after'], 4)} |"
            )
    for note in r.get("notes", []):
        lines += ["", f"Note: {note}."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plots(r: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    u = r["utility"]

    # utility: perplexity per model on retained and never-seen records
    names = (
        ["ensemble"]
        + [f"shard {c['shard']}" for c in u["constituents"]]
        + (["monolithic"] if "baseline" in u else [])
    )
    kept = [u["ensemble"]["retained"]] + [c["perplexity"]["own_shard"] for c in u["constituents"]]
    never = [u["ensemble"]["never_seen"]] + [c["perplexity"]["never_seen"] for c in u["constituents"]]
    if "baseline" in u:
        kept.append(u["baseline"]["retained"])
        never.append(u["baseline"]["never_seen"])
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [k or 0 for k in kept], 0.4, label="retained (constituents: own shard)")
    ax.bar([x + 0.2 for x in xs], [n or 0 for n in never], 0.4, label="never-seen")
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel("perplexity (per token)")
    ax.set_title("Utility")
    ax.legend()
    written.append(_save(fig, out / "utility.png"))

    # membership attacks: AUC with intervals, forgotten vs never-seen next to the control
    f = r["forgetting"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, (key, label) in enumerate(
        [
            ("attacks_forgotten_vs_never_seen", "forgotten vs never-seen"),
            ("attacks_retained_vs_never_seen", "retained vs never-seen"),
        ]
    ):
        res = f[key] or {}
        xs2 = [i + (j - 0.5) * 0.3 for i in range(len(ATTACKS))]
        ys = [res[a]["auc"] if a in res else float("nan") for a in ATTACKS]
        lo = [res[a]["auc"] - res[a]["low"] if a in res else 0 for a in ATTACKS]
        hi = [res[a]["high"] - res[a]["auc"] if a in res else 0 for a in ATTACKS]
        ax.errorbar(xs2, ys, yerr=[lo, hi], fmt="o", capsize=4, label=label)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(ATTACKS)), [ATTACK_NAMES[a] for a in ATTACKS])
    ax.set_ylabel("AUC (95% bootstrap interval)")
    ax.set_ylim(0, 1)
    ax.set_title("Membership inference on the served ensemble")
    ax.legend()
    written.append(_save(fig, out / "membership_auc.png"))

    if r["before_after"]:
        e = r["before_after"][0]
        fig, ax = plt.subplots(figsize=(7, 4))
        for j, when in enumerate(("before", "after")):
            res = e[when]["attacks_vs_never_seen"] or {}
            ys = [res[a]["auc"] if a in res else float("nan") for a in ATTACKS]
            ax.plot([i + (j - 0.5) * 0.2 for i in range(len(ATTACKS))], ys, "o", label=f"{when} the deletion")
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(ATTACKS)), [ATTACK_NAMES[a] for a in ATTACKS])
        ax.set_ylabel("AUC, forgotten vs never-seen")
        ax.set_ylim(0, 1)
        ax.set_title(f"Forgotten records before and after run {e['run_id']}")
        ax.legend()
        written.append(_save(fig, out / "before_after.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
