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
from quantlab.workbench.config import IMPL, Variant


@dataclass
class Produced:
    """What `produce` made."""

    target: str  # what to evaluate: the artifact (or the model folder, for the reference)
    format: str  # the format's label as results store it ("hf" for the unquantized model)
    seconds: float
    summary: str  # one line: what was made
    notes: list[str] = field(default_factory=list)  # what a user should know about it


class SharedInputs:
    """The calibration set and importance matrix every variant of a run shares (on first use)."""

    def __init__(self, model_ref, calibration, *, data_root=None, cache=None, log=None):
        self.model_ref, self.calibration_config = model_ref, calibration
        self.data_root, self.cache = data_root, cache
        self.log = log or (lambda _msg: None)
        self._calibration = self._imatrix = None

    def calibration(self):
        """``(corpus, CalibrationSet)``, drawn once."""
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
            )
        return self._imatrix

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


def linear_shapes(model_ref) -> dict[str, tuple[int, int]]:
    """The (out, in) shape of every quantizable linear, from the safetensors headers."""
    arch = model_ref.folder.arch
    return {
        t.name.removesuffix(".weight"): (t.shape[0], t.shape[1])
        for t in model_ref.folder.tensors
        if t.name.startswith(arch.blocks + ".")
        and len(t.shape) == 2
        and any(t.name.endswith(f".{name}.weight") for name in arch.linears)
    }


def preflight(variants, model_ref) -> None:
    """Refuse, before any work, variants whose format cannot hold this model's shapes."""
    from quantlab.formats import get_format

    shapes = linear_shapes(model_ref)
    for v in variants:
        if v.format is None or v.impl != IMPL:
            continue
        reason = get_format(v.format).preflight(v.config, v.options, shapes)
        if reason:
            raise QuantlabError(f"variant {v.name}: {reason}")


def produce(variant: Variant, shared: SharedInputs, out: Path, *, progress: bool = True):
    """Quantize and write ``variant`` at ``out``; see the module docstring."""
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
        )
        path = fmt.write(dataclasses.replace(request, result=result, model=model))
    how = " (streamed from the shards)" if variant.streaming else ""
    took = f"{result.linears} linears in {result.seconds:.1f} s{how}"
    summary = f"{variant.method} {variant.config}: {took}"
    label = fmt.label(variant.options)
    return Produced(str(path), label, time.perf_counter() - start, summary, fmt.notes(path))
