"""The Gradio app: quantize, compare, plan and download, over the same pipeline as the CLI.

Nothing is re-implemented here. **Quantize** turns the form into a run config (validated by
`quantlab.workbench.config`, so the app refuses exactly what the CLI refuses) and starts
``quantlab run`` in a child process; progress comes from the run's progress file, and Cancel kills
the child - the results store only ever holds complete rows, so a cancelled run leaves nothing
marked complete. One run at a time per app process. **Compare** reads the results store;
**Fit** is `quantlab.workbench.plan`; **Artifacts** lists stored artifacts with their manifests
and serves their files - only files inside the artifact folder (resolved paths are checked, so
``..`` and symlinks out of it are refused).

    python app.py [--host 127.0.0.1] [--port 7860] [--auth user:password] [--workdir app-data]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from quantlab.errors import QuantlabError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # air-gapped by default: no phoning home
VRAM_PRESETS = [8, 12, 16, 24, 48, 80]
PRESETS = {
    "quick": {
        "calibration": {"corpus": "c4", "n_samples": 8, "seq_len": 256},
        "evaluation": {
            "perplexity": [{"corpus": "wikitext2", "context": 256, "max_tokens": 2048}],
            "kld": True,
            "speed": True,
        },
    },
    "standard": {
        "calibration": {"corpus": "c4", "n_samples": 32, "seq_len": 512, "dtype": "bfloat16"},
        "evaluation": {
            "perplexity": [{"corpus": "wikitext2", "context": 512, "max_tokens": 8192}],
            "kld": True,
            "tasks": ["piqa"],
            "limit": 100,
            "speed": True,
        },
    },
}


class Workspace:
    """Where the app keeps its run configs, artifacts and results store, and the one active job."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.artifacts = self.root / "artifacts"
        self.store = self.root / "results.db"
        self.configs = self.root / "configs"
        for folder in (self.artifacts, self.configs):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None

    def safe_path(self, requested: str) -> Path:
        """``requested`` resolved, if it lies inside the artifact folder; refused otherwise."""
        path = Path(requested)
        path = (path if path.is_absolute() else self.artifacts / path).resolve()
        if not path.is_relative_to(self.artifacts) or not path.is_file():
            raise QuantlabError(f"refused: {requested} is not a file in the artifact folder")
        return path


def self_quantizing() -> dict[str, tuple[str, list[str]]]:
    """Formats that quantize the unquantized model themselves (GGUF through llama.cpp): format
    name -> (its option that picks the type, the types to offer first)."""
    from quantlab.formats import formats, option_fields

    out = {}
    for fmt in formats():
        if fmt.writable and not fmt.needs_method:
            for f in option_fields(fmt):
                if f.metadata.get("common"):
                    out[fmt.name] = (f.name, list(f.metadata["common"]))
    return out


def method_formats() -> list[str]:
    """Formats that store a method's result (the checkpoint format dropdown)."""
    from quantlab.formats import formats

    return [f.name for f in formats() if f.writable and f.needs_method]


def device_choices() -> list[str]:
    """The app's device choices: auto, the CPU, and each GPU torch sees."""
    import torch

    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["auto", "cpu", *gpus]


def run_config(
    ws: Workspace,
    name,
    model,
    include_reference,
    methods,
    bits,
    group_size,
    fmt,
    types,
    imatrix,
    preset,
    device="auto",
    rotate=False,
) -> dict:
    """The run config the Quantize form describes (validated by the workbench's parser).
    ``types``: the chosen types of the self-quantizing formats, as ``format:type`` strings or
    plain types of the one such format; ``rotate``: the methods quantize the rotated model."""
    from quantlab.formats import get_format
    from quantlab.methods import get_method
    from quantlab.workbench.config import parse_run_config

    variants = [{}] if include_reference else []
    for method in methods or []:
        v = {"method": method, "bits": int(bits), "group_size": int(group_size), "sym": False}
        v["format"] = fmt
        config = get_method(method).config_cls(
            bits=int(bits), group_size=int(group_size), sym=False
        )
        v.update(get_format(fmt).options_for(config))
        if rotate:
            v["rotate"] = True
        variants.append(v)
    makers = self_quantizing()
    for choice in types or []:
        fmt_name, _, gtype = choice.rpartition(":")
        fmt_name = fmt_name or next(iter(makers), "")
        field_name = makers.get(fmt_name, ("", []))[0]
        variants.append({"format": fmt_name, field_name: gtype, "imatrix": bool(imatrix)})
    chosen = PRESETS[preset]
    data = {
        "name": name.strip() or time.strftime("app-%Y%m%d-%H%M%S"),
        "model": model.strip(),
        "variants": variants,
        "calibration": {**chosen["calibration"], "allow_fallback": True},
        "evaluation": {**chosen["evaluation"], "allow_fallback": True},
        "output": str(ws.artifacts),
        "store": str(ws.store),
        "device": device or "auto",
    }
    parse_run_config(data)  # raises ConfigError naming the problem
    return data


FIT_BUDGETS = ("GPU memory (above)", "bits per weight", "file size (GiB)")


def fit_formats() -> list[str]:
    """Formats that can hold a fit (from the registry)."""
    from quantlab.formats import formats

    return [f.name for f in formats() if f.fit_family]


def fit_run_config(
    ws: Workspace, name, model, fmt, budget, value, vram_gib, context, batch, preset, device="auto"
) -> dict:
    """The run config of "build the best that fits": one fit variant of ``fmt`` for the budget
    (validated by the workbench's parser)."""
    from quantlab.workbench.config import parse_run_config

    if budget == FIT_BUDGETS[0]:
        target = {"vram": f"{float(vram_gib):g}GiB", "context": int(context), "batch": int(batch)}
    elif value is None or float(value) <= 0:
        raise QuantlabError(f"give a positive value for the {budget}")
    elif budget == FIT_BUDGETS[1]:
        target = {"bpw": float(value)}
    else:
        target = {"size": f"{float(value):g}GiB"}
    chosen = PRESETS[preset]
    data = {
        "name": (name or "").strip() or time.strftime("fit-%Y%m%d-%H%M%S"),
        "model": model.strip(),
        "variants": [{"fit": target, "format": fmt}],
        "calibration": {**chosen["calibration"], "allow_fallback": True},
        "evaluation": {**chosen["evaluation"], "allow_fallback": True},
        "output": str(ws.artifacts),
        "store": str(ws.store),
        "device": device or "auto",
    }
    parse_run_config(data)  # raises ConfigError naming the problem
    return data


def fit_figures(ws: Workspace, run: str = "all"):
    """For the stored fits of ``run``: bits per weight per layer (one line per fit) and the
    KLD each fit predicted against the KLD the harness measured; and a summary."""
    import plotly.graph_objects as go

    from quantlab.fit import Setting
    from quantlab.fit.build import fit_record

    bits = go.Figure()
    kld = go.Figure()
    lines = []
    points = []
    for row in results(ws, run):
        if not isinstance(row.variant_config, dict) or "fit" not in row.variant_config:
            continue
        record = fit_record(row.artifact)
        if record is None:
            continue
        layer_bits = record.get("layer_bits")
        if not layer_bits:  # older records: each setting's own bits per weight
            per: dict[int, list[float]] = {}
            for tensor, key in record.get("settings", {}).items():
                layer = next((int(p) for p in tensor.split(".") if p.isdigit()), -1)
                per.setdefault(layer, []).append(Setting.from_key(key).bits_per_weight())
            layer_bits = {str(k): sum(v) / len(v) for k, v in sorted(per.items())}
        xs = ["embedding/head" if int(k) < 0 else int(k) for k in layer_bits]
        bits.add_trace(go.Scatter(x=xs, y=list(layer_bits.values()), mode="lines+markers",
                                  name=row.variant))  # fmt: skip
        measured = row.metrics.kld.mean if row.metrics.kld else None
        predicted = record.get("predicted_kld")
        if measured and predicted:  # (log axes: a prediction of 0 is listed, not plotted)
            points.append((predicted, measured, row.variant))
        counts = ", ".join(f"{n} {k}" for k, n in record.get("counts", {}).items())
        lines.append(
            f"- **{row.variant}**: {record.get('bits_per_weight', 0):.2f} bits/weight ({counts}); "
            f"predicted KLD {predicted:.4f}, measured "
            + (f"{measured:.4f}" if measured is not None else "-")
        )
    bits.update_layout(title="bits per weight per layer", xaxis_title="layer",
                       yaxis_title="bits/weight", height=360)  # fmt: skip
    if points:
        kld.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points],
                                 mode="markers+text", text=[p[2] for p in points],
                                 textposition="top center", name="fits"))  # fmt: skip
        low = min(min(p[0], p[1]) for p in points)
        top = max(max(p[0], p[1]) for p in points)
        kld.add_trace(
            go.Scatter(
                x=[low, top],
                y=[low, top],
                mode="lines",
                name="predicted = measured",
                line={"dash": "dash"},
            )
        )
    kld.update_layout(
        title="predicted vs measured KLD (log)",
        xaxis_title="predicted",
        yaxis_title="measured (harness)",
        xaxis_type="log",
        yaxis_type="log",
        height=360,
    )
    text = "\n".join(lines) if lines else "no fitted artifacts stored yet"
    return bits, kld, text


def _status(state: dict | None, started: float) -> str:
    if not state:
        return f"starting ... ({time.time() - started:.0f} s)"
    if state["stage"] == "done":
        return f"run {state['run']}: done in {state['elapsed_s']:.0f} s"
    eta = state.get("eta_s")
    eta_text = f", about {eta:.0f} s left" if eta is not None else ""
    return (
        f"run {state['run']}: variant {state['index']}/{state['total']} "
        f"**{state['variant']}** - {state['stage']} ({state['elapsed_s']:.0f} s elapsed{eta_text})"
    )


def _read_state(progress: Path) -> dict | None:
    try:
        return json.loads(progress.read_text())
    except (OSError, ValueError):  # not written yet (it is replaced atomically)
        return None


def start_run(ws: Workspace, data: dict):
    """Start ``quantlab run`` for ``data`` in a child process (its own process group, so Cancel
    stops it and anything it started); yields status lines until it ends. One run at a time."""
    name = data["name"]  # validated: letters, digits, ".", "_", "-"
    with ws.lock:
        if ws.proc is not None and ws.proc.poll() is None:
            raise QuantlabError("a run is already in progress; wait for it or cancel it")
        cfg, progress = ws.configs / f"{name}.yaml", ws.configs / f"{name}.progress.json"
        log_path = ws.configs / f"{name}.log"
        cmd = [sys.executable, "-m", "quantlab", "run", str(cfg), "--progress-file", str(progress)]
        try:
            cfg.write_text(yaml.safe_dump(data, sort_keys=False))
            progress.unlink(missing_ok=True)
            with open(log_path, "w") as log:  # the child keeps its own descriptor
                ws.proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        except OSError as exc:
            raise QuantlabError(f"cannot start the run in {ws.configs}: {exc}") from None
        proc = ws.proc
    started = time.time()
    while proc.poll() is None:
        yield _status(_read_state(progress), started)
        time.sleep(1.0)
    if proc.returncode < 0:
        yield f"run {name}: cancelled; completed variants stay in the results"
        return
    if proc.returncode != 0:
        lines = log_path.read_text(errors="replace").strip().splitlines()
        error = next(
            (x for x in reversed(lines) if "error" in x.lower()), lines[-1] if lines else ""
        )
        raise QuantlabError(f"run {name} failed: {error.strip()}")
    yield _status(_read_state(progress), started)


def cancel_run(ws: Workspace) -> str:
    with ws.lock:
        if ws.proc is None or ws.proc.poll() is not None:
            return "no run in progress"
        os.killpg(ws.proc.pid, signal.SIGKILL)  # the run and anything it started
        ws.proc.wait()
    return "cancelled: the run was stopped; nothing partial is recorded"


def results(ws: Workspace, run: str = "all", model: str = "all") -> list:
    from quantlab.workbench.store import ResultStore

    if not ws.store.is_file():
        return []
    with ResultStore(ws.store) as store:
        rows = store.results()
    return [r for r in rows if run in ("all", r.run_name) and model in ("all", r.model)]


def results_frame(rows):
    import pandas as pd

    from quantlab.workbench.report import results_table

    if not rows:
        return pd.DataFrame({"message": ["no results yet: run a quantization first"]})
    header, body = results_table(rows)
    frame = pd.DataFrame(body, columns=header)
    frame.insert(0, "run", [r.run_name for r in rows])
    return frame


def figures(rows) -> list:
    """Plotly figures: size vs perplexity (Pareto front), KLD, speed vs perplexity, accuracy."""
    import plotly.graph_objects as go

    from quantlab.workbench.report import pareto_front, row_values

    values = [(row_values(r), r) for r in rows]
    label = [f"{r.run_name} / {v['variant']}" for v, r in values]
    size = go.Figure()
    pts = [
        (v["size_mib"], v["ppl"], lab)
        for (v, _), lab in zip(values, label, strict=True)
        if v["size_mib"] and v["ppl"]
    ]
    front = {p[2] for p in pareto_front(pts)}
    for on_front, color in ((False, "#1f77b4"), (True, "#d62728")):
        sel = [p for p in pts if (p[2] in front) == on_front]
        size.add_trace(
            go.Scatter(
                x=[p[0] for p in sel],
                y=[p[1] for p in sel],
                text=[p[2] for p in sel],
                mode="markers",
                marker={"size": 11, "color": color},
                name="Pareto front" if on_front else "other variants",
                hovertemplate="%{text}<br>%{x:.1f} MiB<br>ppl %{y:.3f}<extra></extra>",
            )
        )
    size.update_layout(title="size vs perplexity", xaxis_title="MiB", yaxis_title="perplexity")
    kld = go.Figure(
        go.Bar(
            x=[v["kld"] for v, _ in values if v["kld"]],
            y=[lab for (v, _), lab in zip(values, label, strict=True) if v["kld"]],
            orientation="h",
            hovertemplate="%{y}<br>KLD %{x:.4f}<extra></extra>",
        )
    )
    kld.update_layout(title="KL divergence vs the unquantized model", xaxis_type="log")
    speed = go.Figure()
    timed = [
        (v["decode"], v["ppl"], lab, v["speed_runtime"] or v["runtime"] or "?")
        for (v, _), lab in zip(values, label, strict=True)
        if v["decode"] and v["ppl"]
    ]
    for runtime in sorted({p[3] for p in timed}):  # one colour per runtime, named in the legend
        sel = [p for p in timed if p[3] == runtime]
        speed.add_trace(
            go.Scatter(
                x=[p[0] for p in sel],
                y=[p[1] for p in sel],
                text=[p[2] for p in sel],
                mode="markers",
                marker={"size": 11},
                name=runtime,
                hovertemplate=f"%{{text}}<br>%{{x:.1f}} tok/s ({runtime})<br>ppl %{{y:.3f}}"
                "<extra></extra>",
            )
        )
    speed.update_layout(title="decode speed vs perplexity", xaxis_title="tokens/s")
    acc = go.Figure()
    tasks = sorted({k for v, _ in values for k in v if k.startswith("task:")})
    for task in tasks:
        acc.add_trace(go.Bar(name=task[5:], x=label, y=[v.get(task) for v, _ in values]))
    acc.update_layout(title="accuracy by task", barmode="group")
    if not tasks:
        acc.add_annotation(
            text="no lm-eval task in these results (the standard preset runs piqa)",
            showarrow=False,
            xref="paper",
            yref="paper",
            x=0.5,
            y=0.5,
        )
    return [size, kld, speed, acc]


def plan_table(model: str, vram_gib: float, context: int, batch: int, ws: Workspace):
    import pandas as pd

    from quantlab.workbench.plan import GIB, plan, read_config

    config, label, sha = read_config(model)
    measured = [r for r in results(ws) if r.model_sha256 == sha and r.metrics.kld] if sha else []
    measured.sort(key=lambda r: r.metrics.kld.mean)
    rows = plan(config, int(context), int(batch), measured)
    vram = vram_gib * GIB
    frame = pd.DataFrame(
        [
            {
                "variant": r.name,
                "runtime": r.runtime,
                "fits": "yes" if r.total <= vram else "no",
                "total GiB": round(r.total / GIB, 2),
                "weights GiB": round(r.weights / GIB, 2),
                "KV cache GiB": round(r.kv / GIB, 2),
                "buffers + runtime GiB": round((r.compute + r.runtime_bytes) / GIB, 2),
                "measured KLD": round(r.measured.metrics.kld.mean, 4) if r.measured else None,
            }
            for r in rows
        ]
    )
    fitting = [r for r in rows if r.total <= vram]
    if not fitting:
        why = "Nothing fits: lower the context or the batch, or pick a smaller model."
    else:
        best = fitting[0] if fitting[0].measured else max(fitting, key=lambda r: r.weights)
        basis = (
            "best measured quality" if best.measured else "most bits per weight (no measurements)"
        )
        why = (
            f"**Best choice for {vram_gib:g} GiB: {best.name}** ({basis}): weights "
            f"{best.weights / GIB:.2f} GiB + KV cache {best.kv / GIB:.2f} GiB "
            f"({context} tokens x batch {batch}, fp16) + buffers and runtime "
            f"{(best.compute + best.runtime_bytes) / GIB:.2f} GiB = {best.total / GIB:.2f} GiB."
        )
    return frame, f"{label}: {why}"


def artifact_choices(ws: Workspace) -> list[str]:
    return [
        r.artifact for r in results(ws) if Path(r.artifact).resolve().is_relative_to(ws.artifacts)
    ]


def artifact_details(ws: Workspace, artifact: str):
    """The manifest, the files, and a how-to-run snippet of one stored artifact."""
    if not artifact:
        return {}, [], ""
    path = Path(artifact).resolve()
    if not path.is_relative_to(ws.artifacts):
        raise QuantlabError("refused: not an artifact of this app")
    manifest_path = (
        path / "quantlab_manifest.json" if path.is_dir() else Path(f"{path}.manifest.json")
    )
    if path.is_dir() and not manifest_path.is_file():
        manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    files = sorted(
        str(p.relative_to(ws.artifacts))
        for p in (path.rglob("*") if path.is_dir() else [path, manifest_path])
        if p.is_file()
    )
    row = next((r for r in results(ws) if r.artifact == artifact), None)
    return manifest, files, f"```python\n{run_snippet(row.format if row else '', artifact)}\n```"


def run_snippet(label: str, path: str) -> str:
    """How to run an artifact, from its format (a toolkit's rows: "gptqmodel: gptq")."""
    from quantlab.formats import Format, format_of_label

    fmt = format_of_label(label.split(": ")[-1]) or Format()
    return fmt.run_snippet.format(path=path)


def build_app(workdir: str | Path = "app-data"):
    import gradio as gr

    from quantlab.methods import method_names
    from quantlab.models.resolve import named_models

    ws = Workspace(workdir)
    models = list(named_models())
    makers = self_quantizing()
    type_choices = [
        t if len(makers) == 1 else f"{name}:{t}"
        for name, (_, common) in makers.items()
        for t in common
    ]

    def guarded(fn):
        def call(*args):
            try:
                return fn(*args)
            except QuantlabError as exc:
                raise gr.Error(str(exc)) from None

        return call

    def run(
        name, model, ref, methods, bits, group, fmt, gguf, imatrix, preset, device="auto",
        rotate=False,
    ):  # fmt: skip
        try:
            data = run_config(
                ws, name, model, ref, methods, bits, group, fmt, gguf, imatrix, preset, device,
                rotate,
            )  # fmt: skip
            yield from start_run(ws, data)
        except QuantlabError as exc:
            raise gr.Error(str(exc)) from None

    with gr.Blocks(title="quantlab") as app:
        gr.Markdown(
            "# quantlab\nQuantize a model (GPTQ, AWQ, GGUF), compare every output the same "
            "way, and pick what fits your GPU."
        )
        with gr.Tab("Quantize"):
            with gr.Row():
                model = gr.Dropdown(
                    models,
                    value=models[0],
                    allow_custom_value=True,
                    label="model (named, local folder, or Hub id)",
                )
                name = gr.Textbox(label="run name", placeholder="app-<time>")
                preset = gr.Radio(
                    list(PRESETS), value="quick", label="calibration + evaluation preset"
                )
                device = gr.Dropdown(
                    device_choices(),
                    value="auto",
                    label="device (auto: the GPU when one is visible)",
                    elem_id="device",
                )
            with gr.Row():
                ref = gr.Checkbox(value=True, label="include the unquantized model")
                methods = gr.CheckboxGroup(method_names(), value=["gptq"], label="methods")
                bits = gr.Dropdown([2, 3, 4, 8], value=4, label="bits")
                group = gr.Dropdown([-1, 32, 64, 128], value=64, label="group size")
                fmt = gr.Dropdown(method_formats(), value="gptq", label="checkpoint format")
                rotate = gr.Checkbox(
                    label="methods: rotate first (Hadamard, same function, outliers spread)",
                    elem_id="rotate",
                )
            with gr.Row():
                gguf = gr.CheckboxGroup(type_choices, label="GGUF types (llama.cpp)")
                imatrix = gr.Checkbox(
                    label="GGUF: use the importance matrix of the calibration set"
                )
            with gr.Row():
                run_btn = gr.Button("Run", variant="primary", elem_id="run")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            status = gr.Markdown("idle", elem_id="status")
        with gr.Tab("Compare", id="compare"):
            with gr.Row():
                run_filter = gr.Dropdown(["all"], value="all", label="run")
                model_filter = gr.Dropdown(["all"], value="all", label="model")
                refresh = gr.Button("Refresh", elem_id="refresh")
            table = gr.Dataframe(
                label="results (click a column to sort)", elem_id="results", interactive=False
            )
            with gr.Row():
                size_plot, kld_plot = gr.Plot(elem_id="size-plot"), gr.Plot(elem_id="kld-plot")
            with gr.Row():
                speed_plot, acc_plot = gr.Plot(elem_id="speed-plot"), gr.Plot(elem_id="acc-plot")
        with gr.Tab("Fit"):
            with gr.Row():
                fit_model = gr.Dropdown(
                    models, value=models[0], allow_custom_value=True, label="model or config.json"
                )
                vram = gr.Dropdown(
                    VRAM_PRESETS, value=24, allow_custom_value=True, label="GPU memory (GiB)"
                )
                context = gr.Slider(512, 131072, value=8192, step=512, label="context (tokens)")
                batch = gr.Number(1, precision=0, minimum=1, label="batch")
            fit_btn = gr.Button("Plan")
            fit_text = gr.Markdown()
            fit_table = gr.Dataframe(interactive=False)
            gr.Markdown(
                "### Build the best that fits\nMeasures each tensor's sensitivity once (cached), "
                "chooses a setting per tensor that minimises the predicted KLD within the budget, "
                "writes the artifact, and measures it like every other (Compare tab)."
            )
            with gr.Row():
                fit_format = gr.Dropdown(fit_formats(), value="gguf", label="format")
                fit_budget = gr.Radio(list(FIT_BUDGETS), value=FIT_BUDGETS[0], label="budget")
                fit_value = gr.Number(None, label="bits per weight or GiB (other budgets)")
                fit_preset = gr.Radio(list(PRESETS), value="quick", label="preset")
            build_btn = gr.Button("Build the best that fits", variant="primary", elem_id="build")
            build_status = gr.Markdown("", elem_id="build-status")
            fit_summary = gr.Markdown(elem_id="fit-summary")
            with gr.Row():
                bits_plot = gr.Plot(elem_id="bits-plot")
                predicted_plot = gr.Plot(elem_id="predicted-plot")
        with gr.Tab("Artifacts"):
            with gr.Row():
                artifact = gr.Dropdown([], label="artifact", allow_custom_value=False)
                list_btn = gr.Button("Refresh list")
            how = gr.Markdown()
            manifest = gr.JSON(label="manifest")
            files = gr.Dropdown(
                [], label="file (inside the artifact folder)", allow_custom_value=True
            )
            download = gr.File(label="download")

        def compare(run_name, model_name):
            every = results(ws)
            rows = [
                r
                for r in every
                if run_name in ("all", r.run_name) and model_name in ("all", r.model)
            ]
            runs = ["all", *sorted({r.run_name for r in every})]
            mods = ["all", *sorted({r.model for r in every})]
            return (
                results_frame(rows),
                *figures(rows),
                gr.update(choices=runs),
                gr.update(choices=mods),
            )

        outputs = [table, size_plot, kld_plot, speed_plot, acc_plot, run_filter, model_filter]
        run_event = run_btn.click(
            run,
            [name, model, ref, methods, bits, group, fmt, gguf, imatrix, preset, device, rotate],
            status,
            concurrency_limit=1,
            api_name="run",
        )
        run_event.then(compare, [run_filter, model_filter], outputs)
        cancel_btn.click(lambda: cancel_run(ws), None, status, api_name="cancel")
        for trigger in (refresh.click, run_filter.change, model_filter.change):
            trigger(compare, [run_filter, model_filter], outputs)
        app.load(compare, [run_filter, model_filter], outputs)

        def stored(run_name: str = "all") -> list[dict]:
            """Every stored result of ``run_name`` ("all": every run), metrics as JSON."""
            return [
                {
                    "run": r.run_name,
                    "variant": r.variant,
                    "format": r.format,
                    "artifact": r.artifact,
                    "metrics": json.loads(r.metrics.to_json()),
                }
                for r in results(ws, run_name)
            ]

        gr.api(stored, api_name="results")
        fit_btn.click(
            guarded(lambda m, v, c, b: plan_table(m, float(v), c, b, ws)),
            [fit_model, vram, context, batch],
            [fit_table, fit_text],
            api_name="plan",
        )

        def build(model_name, fmt_name, budget, value, v, c, b, preset_name, dev="auto"):
            try:
                data = fit_run_config(
                    ws, "", model_name, fmt_name, budget, value, v, c, b, preset_name, dev
                )
                yield from start_run(ws, data)
            except QuantlabError as exc:
                raise gr.Error(str(exc)) from None

        def show_fits():
            bits_fig, kld_fig, text = fit_figures(ws)
            return bits_fig, kld_fig, text

        build_event = build_btn.click(
            build,
            [
                fit_model,
                fit_format,
                fit_budget,
                fit_value,
                vram,
                context,
                batch,
                fit_preset,
                device,
            ],  # fmt: skip
            build_status,
            concurrency_limit=1,
            api_name="fit",
        )
        build_event.then(show_fits, None, [bits_plot, predicted_plot, fit_summary])
        app.load(show_fits, None, [bits_plot, predicted_plot, fit_summary])
        list_btn.click(lambda: gr.update(choices=artifact_choices(ws)), None, artifact)
        app.load(lambda: gr.update(choices=artifact_choices(ws)), None, artifact)

        def details(a):
            man, names, snippet = guarded(lambda x: artifact_details(ws, x))(a)
            return man, gr.update(choices=names, value=None), snippet

        artifact.change(details, artifact, [manifest, files, how])
        files.change(
            guarded(lambda f: str(ws.safe_path(f)) if f else None),
            files,
            download,
            api_name="download",
        )
    app.workspace = ws
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantlab app", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", help="user:password required to open the app")
    p.add_argument("--workdir", default="app-data", help="run configs, artifacts and results")
    args = p.parse_args(argv)
    app = build_app(args.workdir)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    app.queue(default_concurrency_limit=1).launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        allowed_paths=[str(app.workspace.artifacts)],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
