"""Make one variant's artifact: the one quantize path of `quantlab quantize` and `quantlab run`.

`produce(variant, shared, out)` turns a `Variant` into its artifact at ``out``:
- the unquantized model: nothing to write (its folder is evaluated as it is);
- a reference toolkit (``impl``): the toolkit quantizes on the same calibration ids and saves
  its own checkpoint (`quantlab.reference`);
- a format with no method (llama.cpp's GGUF types): the format quantizes the unquantized model,
  with the shared importance matrix when the variant asks for it;
- a method: the block walk (`quantlab.methods.runner.quantize_model`), then the format writes the
  result; with ``streaming`` the walk reads one block at a time from the shards and the format
  writes each block as it is done (`Format.stream`), the same tensors bit for bit.

`SharedInputs` is what every variant of a run shares, computed once, on first use: the
calibration set (every method and the importance matrix see the same token ids) and the
importance matrix of the unquantized model. Both executors (local and Ray) call `produce`.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import QuantlabError
from quantlab.models.info import linear_shapes
from quantlab.workbench.config import IMPL, Variant

__all__ = ["Produced", "SharedInputs", "linear_shapes", "preflight", "produce"]


@dataclass
class Produced:
    """What `produce` made."""

    target: str  # what to evaluate: the artifact (or the model folder, for the reference)
    format: str  # the format's label as results store it ("hf" for the unquantized model)
    seconds: float
    summary: str  # one line: what was made
    notes: list[str] = field(default_factory=list)  # what a user should know about it
    device: str = "cpu"  # where quantlab's block walk computed (llama.cpp's quantization: cpu)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # the block walk's stages
    stage_peak_bytes: dict[str, int] = field(default_factory=dict)  # GPU: peak per stage

    def stages_line(self) -> str:
        """``stages: capture 1.2 s, forward 3.4 s, ...`` (with peak device memory on a GPU)."""
        parts = []
        for name, seconds in self.stage_seconds.items():
            if name == "blocks":
                continue
            peak = self.stage_peak_bytes.get(name)
            parts.append(f"{name} {seconds:.1f} s" + (f" ({peak / 2**30:.2f} GiB)" if peak else ""))
        return f"stages on {self.device}: " + ", ".join(parts) if parts else ""


class SharedInputs:
    """The calibration set and importance matrix every variant of a run shares (on first use)."""

    def __init__(
        self,
        model_ref,
        calibration,
        *,
        data_root=None,
        cache=None,
        log=None,
        device: str = "cpu",
        offload: bool = False,
    ):
        from quantlab.devices import check_device_spec

        self.model_ref, self.calibration_config = model_ref, calibration
        self.data_root, self.cache = data_root, cache
        # where quantlab's block walks run (a resolved torch device, or "auto"), and whether the
        # activations between blocks stay on the CPU
        self.device, self.offload = check_device_spec(device), offload
        self.log = log or (lambda _msg: None)
        self._calibration = self._imatrix = None
        self._rotated: SharedInputs | None = None
        self._parent: SharedInputs | None = None  # a rotated copy's: whose calibration it uses

    def calibration(self):
        """``(corpus, CalibrationSet)``, drawn once."""
        if self._calibration is None and self._parent is not None:
            self._calibration = self._parent.calibration()  # the same token ids
        if self._calibration is None:
            from quantlab.data import calibration_for

            corpus, calib = calibration_for(
                self.model_ref, self.calibration_config, data_root=self.data_root
            )
            cfg = self.calibration_config
            self.log(
                f"calibration: {corpus.label}, {cfg.n_samples} x {cfg.seq_len} tokens, "
                f"sha256 {calib.sha256[:16]}"
            )
            self._calibration = (corpus, calib)
        return self._calibration

    def imatrix(self):
        """``(values, rows)``: the unquantized model's importance matrix, measured once."""
        if self._imatrix is None:
            from quantlab.methods.runner import collect_imatrix
            from quantlab.models import load_model

            _, calib = self.calibration()
            model = load_model(self.model_ref)
            self._imatrix = collect_imatrix(
                model,
                self.model_ref.folder.arch,
                calib,
                calib_dtype=self.calibration_config.dtype,
                device=self.device,
            )
        return self._imatrix

    @property
    def drawn(self) -> bool:
        """Whether the calibration set has been drawn (or provided) already."""
        return self._calibration is not None

    def rotated(self) -> SharedInputs:
        """The same inputs for the rotated model (`quantlab.models.rotation.rotated_model`,
        made once and cached): the same calibration token ids (drawn once, for both); its own
        importance matrix (the rotated model's activations are rotated too)."""
        if self._rotated is None:
            from quantlab.models.rotation import rotated_model

            ref = rotated_model(self.model_ref, cache=self.cache, log=self.log)
            self._rotated = SharedInputs(
                ref, self.calibration_config, data_root=self.data_root, cache=self.cache,
                log=self.log, device=self.device, offload=self.offload,
            )  # fmt: skip
            self._rotated._parent = self
        return self._rotated

    def provide(self, corpus, calibration, imatrix=None) -> None:
        """Use values computed elsewhere (another process: the Ray executor's shared task)."""
        self._calibration = (corpus, calibration)
        if imatrix is not None:
            self._imatrix = imatrix


def artifact_path(out_root: Path, variant: Variant) -> Path:
    """Where a variant's artifact goes: a folder, or a file with its format's suffix."""
    from quantlab.formats import get_format

    suffix = get_format(variant.format).suffix if variant.format else ""
    return Path(out_root) / f"{variant.name}{suffix}"


def remove_artifact(path: Path, fmt=None) -> None:
    """Remove a leftover artifact: a folder, or a file with the files its format (``fmt``)
    writes beside it, and the temporary folders of writes that were killed before they
    finished."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    if path.is_dir():
        shutil.rmtree(path)
        return
    for f in [path, *(fmt.side_files(path) if fmt is not None else [])]:
        f.unlink(missing_ok=True)


def preflight(variants, model_ref) -> None:
    """Refuse, before any work, variants whose format cannot hold this model's shapes."""
    from quantlab.formats import get_format

    shapes = linear_shapes(model_ref)
    for v in variants:
        if v.format is None or v.impl != IMPL or v.fit is not None:
            continue  # (a fit chooses only settings the shapes can hold)
        reason = get_format(v.format).preflight(v.config, v.options, shapes)
        if reason:
            raise QuantlabError(f"variant {v.name}: {reason}")


def produce(variant: Variant, shared: SharedInputs, out: Path, *, progress: bool = True):
    """Quantize and write ``variant`` at ``out``, with its model card; see the module
    docstring. A ``rotate`` variant is made from the rotated model exactly as any other from
    its model."""
    if variant.rotate:
        shared = shared.rotated()
    made = _make(variant, shared, out, progress=progress)
    if not variant.is_reference:
        write_variant_card(variant, shared, made)
    return made


def _make(variant: Variant, shared: SharedInputs, out: Path, *, progress: bool):
    from quantlab.formats import WriteRequest, get_format

    start = time.perf_counter()
    model_ref = shared.model_ref
    if variant.is_reference:
        return Produced(str(model_ref.path), "hf", 0.0, "the unquantized model, as it is")
    if variant.impl != IMPL:  # a reference toolkit on the same calibration ids
        from quantlab.reference import run_reference

        _, calibration = shared.calibration()
        cfg = variant.config
        run = run_reference(
            variant.impl,
            variant.method,
            model_ref.path,
            calibration.input_ids,
            out,
            bits=cfg.bits,
            group_size=cfg.group_size,
            sym=cfg.sym,
            act_order=getattr(cfg, "act_order", False),
            damp_percent=getattr(cfg, "damp_percent", 0.01),
        )
        seconds = time.perf_counter() - start
        summary = f"{variant.impl} {variant.method} in {run.seconds:.1f} s"
        return Produced(str(run.out_dir), f"{variant.impl}: {run.format}", seconds, summary)

    fmt = get_format(variant.format)
    if variant.fit is not None:  # the format's best per-tensor mix for a budget
        from quantlab.fit.build import make_fit
        from quantlab.formats import detect

        path, plan, _ = make_fit(variant.fit, fmt, shared, Path(out), progress=progress)
        seconds = time.perf_counter() - start
        written, options = detect(path)
        summary = f"fit for {variant.fit.describe()} in {seconds:.1f} s: " + "; ".join(
            plan.summary_lines()[1:3]
        )
        label = written.label(options)
        return Produced(str(path), label, seconds, summary, fmt.notes(path))
    request = WriteRequest(Path(out), model_ref, variant.options, cache=shared.cache)
    if variant.method is None:  # the format quantizes the unquantized model itself
        if variant.imatrix:
            corpus, calibration = shared.calibration()
            request = dataclasses.replace(
                request,
                imatrix=shared.imatrix(),
                calibration=calibration,
                corpus_label=corpus.label,
            )
        path = fmt.write(request)
        seconds = time.perf_counter() - start
        summary = f"{fmt.label(variant.options)} from the unquantized model in {seconds:.1f} s"
        return Produced(str(path), fmt.label(variant.options), seconds, summary, fmt.notes(path))

    from quantlab.methods import get_method
    from quantlab.methods.runner import quantize_model

    spec = get_method(variant.method)
    calibration = None
    if spec.needs_calibration or variant.imatrix:
        calibration = shared.calibration()[1]
    dtype = shared.calibration_config.dtype
    if variant.streaming:
        from quantlab.methods.streaming import quantize_streaming

        def walk(sink):
            return quantize_streaming(
                model_ref,
                variant.method,
                variant.config,
                calibration,
                sink,
                calib_dtype=dtype,
                progress=progress,
                device=shared.device,
                offload=shared.offload,
            )

        path, result = fmt.stream(request, walk)
    else:
        from quantlab.models import load_model

        model = load_model(model_ref)
        result = quantize_model(
            model,
            model_ref.folder.arch,
            variant.method,
            variant.config,
            calibration,
            calib_dtype=dtype,
            progress=progress,
            device=shared.device,
            offload=shared.offload,
        )
        written = time.perf_counter()
        path = fmt.write(dataclasses.replace(request, result=result, model=model))
        took = time.perf_counter() - written
        result.stage_seconds["write"] = result.stage_seconds.get("write", 0.0) + took
    how = " (streamed from the shards)" if variant.streaming else ""
    where = f" on {result.device}" if result.device != "cpu" else ""
    if result.offloaded:
        where += " (activations offloaded to the CPU)"
    took = f"{result.linears} linears in {result.seconds:.1f} s{where}{how}"
    summary = f"{variant.method} {variant.config}: {took}"
    label = fmt.label(variant.options)
    made = Produced(str(path), label, time.perf_counter() - start, summary, fmt.notes(path))
    made.device = result.device
    made.stage_seconds = dict(result.stage_seconds)
    made.stage_peak_bytes = dict(result.stage_peak_bytes)
    return made


def _base_model(model_ref) -> tuple[str, str]:
    """The source's name for a card's ``base_model`` and a note on its weights, if any."""
    import json

    provenance = Path(model_ref.path) / "quantlab_provenance.json"
    if provenance.is_file():
        data = json.loads(provenance.read_text())
        return data.get("original_model", model_ref.spec), data.get("weights_note", "")
    return model_ref.spec, ""


def write_variant_card(variant: Variant, shared: SharedInputs, made: Produced) -> Path | None:
    """The model card of a made artifact (`quantlab.formats.card`): front matter for the Hub,
    what it is, how it was made, how to run it."""
    import dataclasses as dc

    from quantlab.formats import detect
    from quantlab.formats.card import write_card
    from quantlab.version import __version__

    found = detect(made.target)
    if found is None:
        return None
    fmt, options = found
    path = Path(made.target)
    base, weights_note = _base_model(shared.model_ref)
    config = {} if variant.config is None else dc.asdict(variant.config)
    config.pop("version", None)
    calibration = None
    if variant.needs_calibration and shared.drawn:
        calibration = shared.calibration()[1].provenance()
    bits = config.get("bits")
    kind = variant.method or dc.asdict(variant.options).get("gguf_type") or made.format
    if variant.fit is not None:
        kind = f"Mixed-precision ({variant.fit.describe()}, measured sensitivity)"
    quantization = {
        "method": variant.method or fmt.name,
        "implementation": variant.impl,
        "config": config or dc.asdict(variant.options),
        "format": made.format,
        "importance_matrix": variant.imatrix or variant.fit is not None,
        **({"fit": dc.asdict(variant.fit)} if variant.fit is not None else {}),
        "calibration": calibration,
        "quantized_by": f"quantlab {__version__}",
    }
    tags = ["quantlab", "quantized", made.format, *([variant.method] if variant.method else [])]
    if bits:
        tags.append(f"{bits}-bit")
    meta = {"base_model": base, "pipeline_tag": "text-generation", "tags": tags}
    if fmt.runtime == "transformers":
        meta["library_name"] = "transformers"
    else:
        tags.append(fmt.runtime)
    meta["quantization"] = quantization
    about = [
        f"{kind} quantization of `{base}`, written as {made.format} by quantlab {__version__}."
    ]
    if weights_note:
        about += ["", f"Note on the source: {weights_note}."]
    details = [("source", f"`{shared.model_ref.spec}` ({shared.model_ref.path})")]
    if variant.method:
        details.append(("method", f"{variant.method} ({variant.impl}), {config}"))
    details.append(("format", f"{made.format} ({fmt.description})"))
    if calibration:
        details.append(
            (
                "calibration",
                f"{calibration['corpus']}, {calibration['n_samples']} x {calibration['seq_len']} "
                f"tokens, seed {calibration['seed']}, sha256 `{calibration['sha256']}`",
            )
        )
    details.append(("made", made.summary))
    details += [("note", note) for note in made.notes]
    return write_card(
        fmt.card_path(path),
        title=path.name,
        meta=meta,
        about=about,
        details=details,
        how_to_run=fmt.run_snippet.format(path=path),
    )


def evaluation_lines(metrics, reference: str | None) -> list[str]:
    """A card's evaluation section: the numbers of quantlab's harness and how each was
    measured."""
    lines = ["Measured by quantlab's evaluation harness, the same way for every artifact:", ""]
    for p in metrics.perplexity:
        lines.append(
            f"- perplexity {p.ppl:.4f} on {p.corpus} ({p.protocol} protocol, context {p.context}, "
            f"{p.scored_tokens:,} tokens scored)"
        )
    if metrics.kld is not None:
        k = metrics.kld
        lines.append(
            f"- KL divergence from `{reference or k.reference}`: mean {k.mean:.5f}, p99 "
            f"{k.p99:.4f}; top-1 agreement {100 * k.top1_agreement:.1f}% ({k.scored_tokens:,} "
            "tokens, full vocabulary)"
        )
    for t in metrics.tasks:
        lines.append(f"- {t.task} {t.metric} {t.value:.4f} ({t.samples} documents, lm-eval)")
    if metrics.size is not None:
        s = metrics.size
        linear = (
            ""
            if s.linear_bits_per_weight is None
            else (f", {s.linear_bits_per_weight:.2f} in the quantized linears")
        )
        lines.append(
            f"- size {s.bytes_on_disk / 2**20:.1f} MiB, {s.bits_per_weight:.2f} bits/weight{linear}"
        )
    if metrics.speed is not None:
        sp = metrics.speed
        lines.append(
            f"- decode {sp.decode_tokens_per_s:.1f} tokens/s, prefill "
            f"{sp.prefill_tokens_per_s:.1f} tokens/s ({sp.runtime}, {sp.threads} threads)"
        )
    if metrics.hardware is not None:
        hw = metrics.hardware
        lines += ["", f"Hardware: {hw.cpu}, {hw.cores} cores, {hw.gpu or 'no GPU'}."]
    return lines
