"""Reports from the results store: one table and four PNG plots, as Markdown and HTML.

`results_table` is what `quantlab run` prints at the end; `write_report` writes
``report.md``, ``report.html`` and ``size_vs_ppl.png`` (Pareto front marked), ``kld.png``,
``speed_vs_ppl.png`` and ``accuracy.png`` into one folder (atomically). Every column says how it
was measured: the perplexity's corpus, protocol and context, the KLD's reference and token count,
the lm-eval task, metric and document count, the speed's runtime and thread count.
"""

from __future__ import annotations

import html
import shutil
import time
from pathlib import Path

from quantlab.atomic import atomic_directory
from quantlab.errors import QuantlabError

MIB = 2**20


def row_values(row) -> dict:
    """A stored row's numbers by name (what the table, the plots and the app show)."""
    m = row.metrics
    ppl = m.perplexity[0] if m.perplexity else None
    values = {
        "variant": row.variant,
        "format": row.format,
        "size_mib": m.size.bytes_on_disk / MIB if m.size else None,
        "bpw": m.size.bits_per_weight if m.size else None,
        "linear_bpw": m.size.linear_bits_per_weight if m.size else None,
        "ppl": ppl.ppl if ppl else None,
        "kld": m.kld.mean if m.kld else None,
        "top1": m.kld.top1_agreement if m.kld else None,
        "decode": m.speed.decode_tokens_per_s if m.speed else None,
        "prefill": m.speed.prefill_tokens_per_s if m.speed else None,
        "rss_mib": m.memory.peak_rss_bytes / MIB if m.memory and m.memory.peak_rss_bytes else None,
        "vram_mib": m.memory.vram_bytes / MIB if m.memory and m.memory.vram_bytes else None,
        "planned_mib": (
            m.memory.planned_bytes / MIB if m.memory and m.memory.planned_bytes else None
        ),
        "device": m.memory.device if m.memory else None,
        "quantize_s": row.timings.get("quantize_s"),
        "evaluate_s": row.timings.get("evaluate_s"),
        "runtime": m.runtime,
        "speed_runtime": m.speed.runtime if m.speed else None,
    }
    fit = row.variant_config.get("fit") if isinstance(row.variant_config, dict) else None
    values["fit"] = fit is not None
    values["predicted_kld"] = None
    if fit is not None:
        from quantlab.fit.build import fit_record

        record = fit_record(row.artifact)
        values["predicted_kld"] = record.get("predicted_kld") if record else None
    values["stderr"] = {}
    for t in m.tasks:
        values[f"task:{t.task} {t.metric}"] = t.value
        values["stderr"][f"task:{t.task} {t.metric}"] = t.stderr
    return values


def _labels(rows) -> dict:
    """How each metric was measured, from the first row that has it."""
    labels = {}
    for row in rows:
        m = row.metrics
        if m.perplexity and "ppl" not in labels:
            p = m.perplexity[0]
            labels["ppl"] = (
                f"{p.corpus}, {p.protocol} protocol, ctx {p.context}, {p.scored_tokens:,} tokens"
            )
        if m.kld and "kld" not in labels:
            labels["kld"] = f"vs {m.kld.reference}, {m.kld.scored_tokens:,} tokens, full vocabulary"
        if m.speed and "speed" not in labels:
            s = m.speed
            labels["speed"] = (
                f"{s.prompt_tokens}-token prompt, {s.decode_tokens} decoded, median of "
                f"{s.runs}, {s.threads} threads, each in its own runtime"
            )
        for t in m.tasks:
            labels.setdefault(
                f"task:{t.task} {t.metric}", f"{t.task} {t.metric}, {t.samples} docs ({t.source})"
            )
    return labels


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _vram_cell(v: dict) -> str:
    """Measured VRAM, with the planner's estimate and its error when there is one."""
    if not v["vram_mib"]:
        return "-"
    cell = f"{v['vram_mib']:,.0f}"
    if v["planned_mib"]:
        error = v["planned_mib"] / v["vram_mib"] - 1
        cell += f" ({v['planned_mib']:,.0f}, {100 * error:+.0f}%)"
    return cell


def results_table(rows) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table (strings)."""
    values = [row_values(r) for r in rows]
    tasks = sorted({k for v in values for k in v if k.startswith("task:")})
    header = [
        "variant",
        "format",
        "MiB",
        "bits/w linears",
        "bits/w file",
        "ppl",
        "KLD",
        "top-1",
        "decode tok/s",
        "prefill tok/s",
        "speed runtime",
        "peak RSS MiB",
        *(["VRAM MiB (planned, error)"] if any(v["vram_mib"] for v in values) else []),
        *[t[5:] for t in tasks],
        "quantize s",
        "eval s",
    ]
    body = []
    for v in values:
        body.append(
            [
                v["variant"],
                v["format"],
                _fmt(v["size_mib"], 1),
                _fmt(v["linear_bpw"]),
                _fmt(v["bpw"]),
                _fmt(v["ppl"], 3),
                _fmt(v["kld"], 4),
                _fmt(None if v["top1"] is None else 100 * v["top1"], 1),
                _fmt(v["decode"], 1),
                _fmt(v["prefill"], 1),
                v["speed_runtime"] or "-",
                _fmt(v["rss_mib"], 0),
                *([_vram_cell(v)] if any(x["vram_mib"] for x in values) else []),
                *[_fmt(v.get(t), 3) for t in tasks],
                _fmt(v["quantize_s"], 1),
                _fmt(v["evaluate_s"], 1),
            ]
        )
    return header, body


def format_table(header, body) -> str:
    """A plain-text table for the terminal."""
    if not body:
        return "(no results)"
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            h.ljust(w) if i < 2 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both size and perplexity (smaller is better)."""
    front, best = [], float("inf")
    for x, y, name in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append((x, y, name))
            best = y
    return front


def _plots(values: list[dict], labels: dict, folder: Path, title: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        made.append((name, caption))

    pts = [(v["size_mib"], v["ppl"], v["variant"]) for v in values if v["ppl"] and v["size_mib"]]
    if pts:
        fig, ax = plt.subplots(figsize=(8, 5))
        front = pareto_front(pts)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
        ax.plot(
            [p[0] for p in front],
            [p[1] for p in front],
            "--",
            color="tab:red",
            label="Pareto front (smaller and better)",
            zorder=2,
        )
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("size on disk (MiB)")
        ax.set_ylabel(f"perplexity ({labels.get('ppl', '')})", fontsize=8)
        ax.set_title(f"{title}: size vs perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "size_vs_ppl.png", "Size vs perplexity; the dashed line joins the Pareto front.")
    sized = [v for v in values if v["kld"] and v["kld"] > 1e-9 and v["size_mib"]]
    if any(v["fit"] for v in sized):
        fig, ax = plt.subplots(figsize=(8, 5))
        for fitted, style in ((False, dict(color="tab:blue", marker="o", label="uniform")),
                              (True, dict(color="tab:orange", marker="*", s=120,
                                          label="fitted (measured)"))):  # fmt: skip
            group = [v for v in sized if v["fit"] == fitted]
            if group:
                xs, ys = [v["size_mib"] for v in group], [v["kld"] for v in group]
                ax.scatter(xs, ys, zorder=3, **style)
        predicted = [v for v in sized if v["fit"] and v["predicted_kld"]]
        if predicted:
            ax.scatter(
                [v["size_mib"] for v in predicted],
                [v["predicted_kld"] for v in predicted],
                facecolors="none", edgecolors="tab:orange", marker="*", s=120, zorder=3,
                label="fitted (predicted)",
            )  # fmt: skip
        for v in sized:
            ax.annotate(
                v["variant"], (v["size_mib"], v["kld"]), textcoords="offset points",
                xytext=(4, 4), fontsize=7,
            )  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("size on disk (MiB)")
        ax.set_ylabel("mean KL divergence from the unquantized model (log scale)", fontsize=8)
        ax.set_title(f"{title}: KLD vs size, uniform and fitted")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        save(
            fig,
            "kld_vs_size.png",
            "Mean KLD vs size: each point an artifact measured by the harness "
            f"({labels.get('kld', '')}); fitted mixes (stars) beside the uniform ones, with the "
            "KLD their fit predicted (hollow).",
        )
    kl = [(v["variant"], v["kld"]) for v in values if v["kld"] is not None and v["kld"] > 1e-9]
    if kl:
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(kl) + 1.5))
        ax.barh([k[0] for k in kl], [max(k[1], 1e-7) for k in kl], color="tab:orange")
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel(f"mean KL divergence, log scale\n({labels.get('kld', '')})", fontsize=8)
        ax.set_title(f"{title}: KL divergence from the unquantized model")
        ax.grid(alpha=0.3, axis="x")
        save(fig, "kld.png", "Mean KL divergence per variant from the unquantized model.")
    sp = [
        (v["decode"], v["ppl"], v["variant"], v["speed_runtime"] or v["runtime"] or "?")
        for v in values
        if v["decode"] and v["ppl"]
    ]
    if sp:
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, runtime in enumerate(sorted({p[3] for p in sp})):
            sel = [p for p in sp if p[3] == runtime]
            ax.scatter(
                [p[0] for p in sel], [p[1] for p in sel], color=f"C{i}", label=runtime, zorder=3
            )
        for x, y, name, _ in sp:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"decode tokens/s ({labels.get('speed', '')})", fontsize=7)
        ax.set_ylabel("perplexity")
        ax.set_title(f"{title}: speed vs perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "speed_vs_ppl.png", "Decode speed vs perplexity, coloured by runtime.")
    tasks = sorted({k for v in values for k in v if k.startswith("task:")})
    if tasks:
        import numpy as np

        fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(values)), 5))
        width = 0.8 / len(tasks)
        x = np.arange(len(values))
        for j, task in enumerate(tasks):
            ax.bar(
                x + j * width,
                [v.get(task) or 0 for v in values],
                width,
                yerr=[v["stderr"].get(task) or 0 for v in values],
                capsize=3,
                label=labels.get(task, task),
            )
        ax.set_xticks(x + width * (len(tasks) - 1) / 2)
        ax.set_xticklabels([v["variant"] for v in values], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}: accuracy by task")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        save(
            fig, "accuracy.png", "lm-eval accuracy by task (error bars: lm-eval's standard error)."
        )
    return made


def write_report(rows, folder: str | Path, *, title: str, notes: list[str] = ()) -> Path:
    """Write the report of ``rows`` (results-store rows) into ``folder``; returns report.md."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / "report.md").is_file():
        raise QuantlabError(f"{folder} exists and is not a report folder; choose another --out")
    if not rows:
        raise QuantlabError("no results to report")
    values = [row_values(r) for r in rows]
    labels = _labels(rows)
    header, body = results_table(rows)
    notes = list(notes)
    from quantlab.formats import format_of_label

    for label in sorted({r.format for r in rows}):  # what each format's rows need said
        fmt = format_of_label(label)
        if fmt is not None and fmt.note and fmt.note not in notes:
            notes.append(fmt.note)
    first = rows[0].metrics
    hw = first.hardware
    new = folder.with_name(f"{folder.name}.new")
    if new.exists():
        shutil.rmtree(new)
    with atomic_directory(new) as tmp:
        plots = _plots(values, labels, tmp, title)
        md = [
            f"# {title}",
            "",
            f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
            f" by quantlab {rows[-1].versions.get('quantlab', '')}; model `{rows[0].model}`"
            f" (sha256 {rows[0].model_sha256[:16]}).",
            "",
        ]
        if hw:
            md += [f"Hardware: {hw.cpu}, {hw.cores} cores, {hw.gpu or 'no GPU'}.", ""]
        devices = sorted({v["device"] for v in values if v["device"]})
        if devices:
            md += [f"Evaluated on: {', '.join(devices)}.", ""]
        md += ["## How each column was measured", ""]
        md += [f"- **{k}**: {v}" for k, v in labels.items()]
        md += [
            "- **MiB**: bytes on disk of the artifact",
            "- **bits/w linears**: bits per weight of the quantized linears (codes, scales, zero "
            "points, indices); **bits/w file**: of every tensor in the file (embeddings, head and "
            "norms included)",
            "- **speed runtime**: what ran the decode: llama.cpp, transformers, transformers "
            "with kernels for the quantized linears (`cpu`: PyTorch's int4/int8 CPU kernels, "
            "with bf16 activations; quality columns are always measured on the exact weights), "
            "or transformers with quantlab's reference dequantization (every weight "
            "dequantized at every forward: correct, but not a quantized runtime's speed)",
            "- **peak RSS**: the evaluating process's peak resident memory",
            "- **VRAM** (GPU evaluations): measured, not estimated - the peak of torch's "
            "reserved device memory during the evaluation (or the process's device memory as "
            "NVML counts it, CUDA context included, when larger), on the device named under "
            "Hardware; in brackets the planner's estimate for the artifact (`quantlab plan`: "
            "size + KV cache + compute buffer + 0.25 GiB at the evaluation's longest window, "
            "batch 1) and its error against the measurement",
            "- **quantize s / eval s**: wall time of producing the artifact / of its evaluation",
            "",
            "## Results",
            "",
        ]
        md.append("| " + " | ".join(header) + " |")
        md.append("|" + "|".join("---" for _ in header) + "|")
        md += ["| " + " | ".join(r) + " |" for r in body]
        md.append("")
        for name, caption in plots:
            md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        if notes:
            md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
        (tmp / "report.md").write_text("\n".join(md))
        (tmp / "report.html").write_text(_html(title, labels, header, body, plots, notes))
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():  # swap: the previous report stays whole until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder / "report.md"


def _html(title, labels, header, body, plots, notes) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;"
        "text-align:right}td:first-child,td:nth-child(2){text-align:left}</style></head><body>",
        f"<h1>{e(title)}</h1><h2>How each column was measured</h2><ul>",
    ]
    parts += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in labels.items()]
    parts.append("</ul><h2>Results</h2><table><tr>")
    parts += [f"<th>{e(h)}</th>" for h in header]
    parts.append("</tr>")
    for r in body:
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    parts.append("</table>")
    for name, caption in plots:
        parts.append(
            f"<figure><img src='{e(name)}' alt='{e(caption)}'>"
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
