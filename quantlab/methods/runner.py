"""The calibration pipeline: walk the decoder blocks once, quantize each from real activations.

1. Capture the inputs of the first decoder block (and the keyword arguments the model passes to
   every block: position embeddings, attention mask) for the whole calibration set.
2. For each block in order: make a compute copy (in ``calib_dtype``, on ``device``; on a GPU in
   float32 the block itself goes to the device and comes back), hand a `BlockContext` to the
   method, which runs forward passes with hooks at the input of each
   `InputGroup` (statistics, or quantization just before the group runs) and sets
   `QuantizedWeight`s.
   The importance matrix (mean of x^2 per input column, llama.cpp's imatrix) of every linear is
   collected during the first pass.
3. The *quantized* block's outputs become the next block's inputs. Only one block's compute copy
   and the calibration activations are live at a time; the master weights stay on the CPU.
   Everything a method makes (quantized weights, changed parameters, records) comes back to the
   CPU when its block is done, so no tensor of another block sits on the compute device. With
   ``offload`` the activations between blocks stay on the CPU too and go to the device one chunk
   at a time (for calibration sets larger than the device's memory).

Every stage is timed (`quantlab.devices.StageClock`: capture, read, copy, forward, the method's
own stages such as hessians and solve, write), with its peak device memory on a GPU; an
out-of-memory error names the block and what to lower (`quantlab.devices.device_oom`).

This is the one block walk: each finished block goes to a *sink*. In memory (the default) the
model is left holding the dequantized weights (fake quantization), ready to evaluate, and the
returned `QuantizationResult` holds the integer tensors a format writer packs; streaming
(`quantlab.methods.streaming`) walks a model read block by block from its shards (a
`BlockLoader`) into a format's block writer, which packs and writes each block as it comes.
Methods never see which.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from quantlab.console import bar_stream
from quantlab.devices import StageClock, device_oom, is_gpu, resolve_device
from quantlab.errors import QuantlabError
from quantlab.methods.registry import get_method
from quantlab.models.arch import ArchSpec, InputGroup
from quantlab.types import QuantizedWeight


class _StopForward(Exception):
    pass


@dataclass
class QuantizationResult:
    """What a method produced for a whole model."""

    method: str
    config: object  # the method's frozen config dataclass
    weights: dict[str, QuantizedWeight]  # full module name of each linear -> its quantization
    modified: dict[str, torch.Tensor]  # other parameters the method changed (AWQ-scaled norms)
    imatrix: dict[str, torch.Tensor]  # linear name -> mean of x^2 per input column (in,)
    imatrix_tokens: int
    records: dict[str, object]  # per-block method records (e.g. AWQ scales), keyed by block name
    calibration: dict | None  # CalibrationSet.provenance(), None for RTN without calibration
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"  # where the blocks were computed
    offloaded: bool = False  # the activations between blocks stayed on the CPU
    stage_peak_bytes: dict[str, int] = field(default_factory=dict)  # GPU: peak allocated per stage
    linears: int = 0  # linears quantized (also when a streaming sink holds their tensors)
    overrides: dict = field(default_factory=dict)  # linear -> its own config (per-module)


class BlockContext:
    """One decoder block as a method sees it: weights by name, forward passes with hooks."""

    def __init__(
        self,
        prefix: str,
        block,
        compute,
        arch: ArchSpec,
        inputs,
        kwargs,
        imatrix,
        configs=None,
        clock: StageClock | None = None,
    ):
        self.prefix, self.block, self.compute, self.arch = prefix, block, compute, arch
        self.clock = clock or StageClock()
        self.device = _param_device(compute)
        self._configs = configs or {}  # linear (block-local name) -> its own config
        self.inputs, self.kwargs = inputs, kwargs
        self.linear_names = list(arch.linears)
        self.groups = list(arch.input_groups)
        self.quantized: dict[str, QuantizedWeight] = {}
        self.modified: set[str] = set()  # names of non-linear-weight parameters changed
        self.records: list[object] = []
        self.outputs = None
        self.outputs_stale = True
        self._in_forward = False
        self._imatrix = imatrix  # full linear name -> [sum of x^2, count]

    def config_for(self, name: str, config):
        """The config linear ``name`` is quantized with: its own (a per-module override, e.g. a
        fit's bits) or the method's ``config``."""
        return self._configs.get(name, config)

    def stage(self, name: str):
        """Time the enclosed work as stage ``name`` (e.g. ``with ctx.stage("solve"): ...``)."""
        return self.clock.stage(name)

    # --- weights ----------------------------------------------------------------------------
    def weight(self, name: str) -> torch.Tensor:
        """The current float32 weight of a linear (a copy, on the compute device)."""
        w = self.block.get_submodule(name).weight.detach()
        return w.to(self.device, torch.float32, copy=True)

    def original_dtype(self, name: str) -> torch.dtype:
        return self.block.get_submodule(name).weight.dtype

    def _write(self, path: str, value: torch.Tensor, transform) -> None:
        new = transform(value.detach().float()).clone()  # computed once: value may alias the param
        for module in {id(m): m for m in (self.block, self.compute)}.values():
            param = module.get_parameter(path)
            with torch.no_grad():
                param.copy_(new.to(param.device, param.dtype))
        if not self._in_forward:
            self.outputs_stale = True

    def set_quantized(self, name: str, qw: QuantizedWeight) -> None:
        """Record ``qw`` for linear ``name`` and put its dequantized values into the block."""
        self.quantized[name] = qw
        self._write(f"{name}.weight", qw.dequantize(), lambda v: v)

    def quantize_each_linear(self, config, quantize: Callable) -> None:
        """The whole step of a weight-only method: each linear's weight through
        ``quantize(weight, its config)`` (its own per-module config, else ``config``), timed as
        the ``solve`` stage, recorded with `set_quantized`."""
        for name in self.linear_names:
            c = self.config_for(name, config)
            with self.stage("solve"):
                qw = quantize(self.weight(name), c)
            self.set_quantized(name, qw)

    def can_fold(self, group: InputGroup) -> bool:
        """Whether a per-input-channel scale of ``group`` can be folded into its producer."""
        prev = self.block.get_submodule(group.prev_op)
        width = self.block.get_submodule(group.linears[0]).in_features
        return prev.weight.shape[0] == width

    def fold_scale(self, group: InputGroup, s: torch.Tensor) -> None:
        """Divide the producer's output channels by ``s`` and multiply the linears' inputs by it."""
        prev = self.block.get_submodule(group.prev_op)
        s = s.to(self.device)
        self._write(
            f"{group.prev_op}.weight",
            prev.weight.detach().to(self.device, torch.float32),
            lambda w: w / (s if w.ndim == 1 else s[:, None]),
        )
        self.modified.add(f"{group.prev_op}.weight")
        if getattr(prev, "bias", None) is not None:
            bias = prev.bias.detach().to(self.device, torch.float32)
            self._write(f"{group.prev_op}.bias", bias, lambda b: b / s)
            self.modified.add(f"{group.prev_op}.bias")
        for name in group.linears:
            self._write(f"{name}.weight", self.weight(name), lambda w: w * s[None, :])

    def record(self, item: object) -> None:
        self.records.append(item)

    def error(self, name: str, message: str) -> QuantlabError:
        return QuantlabError(f"{self.prefix}.{name}: {message}")

    # --- forward ----------------------------------------------------------------------------
    def record_imatrix(self, group: InputGroup, sum_sq: torch.Tensor, rows: int) -> None:
        """Set the importance matrix of ``group``'s linears from a method's own statistics (the
        sum of x^2 per input column over ``rows`` rows), when its forward passed
        ``imatrix=False``."""
        for name in group.linears:
            stats = self._imatrix.get(f"{self.prefix}.{name}")
            if stats is not None and stats[1] == 0:
                stats[0], stats[1] = sum_sq.detach().float().cpu().clone(), rows

    def forward(
        self, on_group_input=None, *, imatrix: bool = True, chunks: bool = False
    ) -> torch.Tensor:
        """Run the compute block on the calibration inputs; call ``on_group_input(group, x)`` with
        each input group's input just before the group's first linear runs. With ``imatrix``
        False the method records the importance matrix itself (`record_imatrix`). With
        ``chunks`` the method takes ``x`` as the list of the chunks' inputs (see below) instead
        of their concatenation, which a GPU then never holds twice (`chunk_inputs`).

        The batch runs in chunks of about `CHUNK_TOKENS` tokens, one after the other, each
        stopping at every group's input until all chunks have reached it; the group then sees
        the whole batch's input (the chunks' inputs concatenated). Same results as one pass over
        the batch, faster on a CPU: a chunk's temporaries stay small enough for the allocator to
        reuse them, where the whole batch's are fresh page-faulted memory every time."""
        first_of = {}
        for group in self.groups:
            first_of[min(group.linears, key=self.linear_names.index)] = group
        record = set()  # linears whose importance matrix this pass collects (the first pass)
        for name in self.linear_names:
            stats = self._imatrix.get(f"{self.prefix}.{name}")
            if imatrix and stats is not None and stats[1] == 0:
                record.add(name)

        def at_group(name: str, xs: list[torch.Tensor]) -> None:
            group = first_of[name]
            parts = chunk_inputs(xs)
            if record.intersection(group.linears):
                sq, rows = 0.0, 0
                for part in parts:
                    flat = part.reshape(-1, part.shape[-1])
                    sq = sq + flat.float().square().sum(dim=0).cpu()
                    rows += flat.shape[0]
                for linear in record.intersection(group.linears):
                    stats = self._imatrix[f"{self.prefix}.{linear}"]
                    stats[0] += sq
                    stats[1] += rows
            if on_group_input is not None:
                on_group_input(group, parts if chunks else _joined(parts))

        stops = list(first_of) if record or on_group_input is not None else []
        self._in_forward = True
        try:
            with self.clock.stage("forward"):
                out = _chunked_forward(self.compute, self.inputs, self.kwargs, stops, at_group)
        finally:
            self._in_forward = False
        self.outputs = out
        self.outputs_stale = False
        return self.outputs


CHUNK_TOKENS = 2048  # tokens per chunk of a calibration forward (see BlockContext.forward)
GPU_CHUNK_TOKENS = 32768  # on a GPU: bounds the block's temporaries (an 8B MLP's are 4 x 14336
# values per token), not the allocator's reuse


def chunk_inputs(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A group's input as methods that take chunks see it: on the CPU one tensor, the chunks
    concatenated (the statistics are then summed exactly as over one batch, bit for bit as
    before chunking); on a GPU the chunks as they are (a concatenation would hold the group's
    input twice: 7.5 GB for an 8B model's down_proj at 128 x 2048 tokens in bf16)."""
    if len(xs) == 1 or xs[0].device.type == "cpu":
        return [_joined(xs)]
    return list(xs)


def _joined(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs)


def _batch_slices(batch: int, seq_len: int, tokens: int | None = None) -> list[slice]:
    # whole sequences per chunk: attention needs them
    per = max(1, (tokens or CHUNK_TOKENS) // max(1, seq_len))
    return [slice(i, min(i + per, batch)) for i in range(0, batch, per)]


def _cut(value, batch: int, sl: slice):
    """``value`` (a keyword argument of the block) restricted to the sequences ``sl``: tensors
    of two or more dimensions whose first is the batch (position embeddings, masks, position
    ids) are sliced, other values passed as they are."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        return value[sl]
    if isinstance(value, tuple):
        return tuple(_cut(v, batch, sl) for v in value)
    if isinstance(value, list):
        return [_cut(v, batch, sl) for v in value]
    return value


def _chunked_forward(module, inputs, kwargs, stops: list[str], at_stop) -> torch.Tensor:
    """``module(inputs, **kwargs)`` (in inference mode) over chunks of the batch, pausing every
    chunk before each submodule named in ``stops`` (in execution order) until all chunks are
    there, then calling ``at_stop(name, [each chunk's input to it])``.

    The chunks are greenlets of the calling thread: each runs until its next stop, then hands
    control back, so one thread runs every chunk in turn (one thread per chunk, each with its own
    allocator arena and OpenMP team, lost most of the gain). On a GPU the chunks are
    `GPU_CHUNK_TOKENS` long, to bound the temporaries. An exception in a chunk or in ``at_stop``
    ends every chunk and is raised here. On the CPU the outputs equal one pass over the whole
    batch (tested); the point is speed. Keyword arguments are cut by `_cut`'s shape rule (right
    for the supported decoder blocks).

    When ``module`` sits on another device than ``inputs`` (offloaded activations), each chunk
    goes to the module's device and its output comes back, so only a chunk's activations are on
    the device between stops."""
    import greenlet

    batch = inputs.shape[0]
    param = next(module.parameters(), None)
    home = inputs.device
    target = param.device if param is not None else home
    seq = inputs.shape[1] if inputs.dim() > 1 else 1
    if target.type == "cpu":
        slices = _batch_slices(batch, seq)
    else:
        slices = _batch_slices(batch, seq, GPU_CHUNK_TOKENS)
    if target != home:
        kwargs = {k: _moved(v, target) for k, v in kwargs.items()}
    hooks = []
    if len(slices) == 1:
        try:
            for name in stops:
                sub = module.get_submodule(name)
                pause = sub.register_forward_pre_hook(lambda _m, a, n=name: at_stop(n, [a[0]]))
                hooks.append(pause)
            with torch.inference_mode():
                out = module(inputs.to(target), **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        return (out[0] if isinstance(out, tuple) else out).to(home)

    parent = greenlet.getcurrent()

    def pause(name):
        def run(_module, args):
            parent.switch(("at", name, args[0]))

        return run

    def work(sl: slice):
        out = module(inputs[sl].to(target), **{k: _cut(v, batch, sl) for k, v in kwargs.items()})
        return ("done", (out[0] if isinstance(out, tuple) else out).to(home))

    chunks = [greenlet.greenlet(lambda sl=sl: work(sl)) for sl in slices]
    try:
        for name in stops:
            hooks.append(module.get_submodule(name).register_forward_pre_hook(pause(name)))
        with torch.inference_mode():
            while True:
                state = [chunk.switch() for chunk in chunks]  # each runs to its next stop or end
                kinds = {st[0] for st in state}
                if kinds == {"done"}:
                    break
                names = {st[1] for st in state if st[0] == "at"}
                if kinds != {"at"} or len(names) != 1:
                    where = [st[1] if st[0] == "at" else st[0] for st in state]
                    raise RuntimeError(f"calibration chunks stopped at different places: {where}")
                at_stop(names.pop(), [st[2] for st in state])
    finally:
        for hook in hooks:
            hook.remove()
        for chunk in chunks:
            if not chunk.dead:  # GreenletExit unwinds the chunk's paused forward; an error while
                with contextlib.suppress(Exception):  # unwinding must not hide the first one
                    chunk.throw()
    return torch.cat([st[1] for st in state])


def _moved(value, device):
    """A block keyword argument on ``device`` (tensors, and tensors in tuples and lists)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device) for v in value)
    return value


def _capture_first_block_inputs(model, arch: ArchSpec, ids: torch.Tensor, dtype, device):
    blocks = model.get_submodule(arch.blocks)
    captured = {}

    def grab(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    embed_device = model.get_submodule(arch.embed).weight.device  # the master weights' device
    try:
        with torch.inference_mode():
            model(ids.to(embed_device), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()

    def cast(v):  # every tensor to the device (masks, position ids too); floats to the dtype
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        if isinstance(v, tuple):
            return tuple(cast(x) for x in v)
        return v

    kwargs = {k: cast(v) for k, v in captured["kwargs"].items() if k != "past_key_values"}
    kwargs["use_cache"] = False
    return cast(captured["hidden"]), kwargs


def capture_block_inputs(model, arch: ArchSpec, ids: torch.Tensor, dtype, device):
    """The first block's input for token ids ``ids`` (batch, seq) and the keyword arguments every
    block is called with (position embeddings, masks), in ``dtype`` on ``device``."""
    return _capture_first_block_inputs(model, arch, ids, dtype, device)


def forward_block(block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One block's output for ``hidden`` (inference mode, in the calibration walk's chunks)."""
    return _chunked_forward(block, hidden, kwargs, [], None)


def _param_device(module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def run_block(
    spec,
    config,
    prefix,
    block,
    arch,
    hidden,
    kwargs,
    imatrix,
    *,
    dtype,
    device,
    configs=None,
    clock: StageClock | None = None,
):
    """Quantize one block with method ``spec``; returns its `BlockContext` (the quantized weights,
    changed parameters, records) and the block's outputs, the next block's inputs (``hidden`` is
    None without calibration). The per-block step of `quantize_model`.

    On a GPU the block is computed there: in float32 the block itself moves to the device (and
    `quantize_model` moves it back), in another dtype a compute copy is made on the device;
    without calibration (RTN) the weights are solved there too."""
    clock = clock or StageClock(str(device))
    calibrated = hidden is not None
    compute = block
    with clock.stage("copy"):
        if is_gpu(str(device)) and dtype == torch.float32:
            block.to(device)  # in place: the master is the compute block
        elif (calibrated and dtype != torch.float32) or is_gpu(str(device)):
            compute = _compute_copy(block, device, dtype)
    ctx = BlockContext(prefix, block, compute, arch, hidden, kwargs, imatrix, configs, clock)
    if calibrated and not spec.needs_calibration:
        ctx.forward()  # RTN with calibration: the pass only gathers the importance matrix
    spec.quantize_block(ctx, config)
    if calibrated:
        hidden = ctx.forward() if ctx.outputs_stale else ctx.outputs
    ctx.compute = None  # the compute copy is not needed past this point
    return ctx, hidden


def _compute_copy(block, device, dtype):
    """``block`` in ``dtype`` on ``device``; a CPU block bound for a GPU is copied tensor by
    tensor straight to the device (no second full copy on the CPU)."""
    if str(device) == "cpu" or _param_device(block) == torch.device(device):
        clone = copy.deepcopy(block)
    else:
        memo = {}  # each tensor converted on its way (no float32 copy of the block on the device)
        for param in block.parameters():
            kind = dtype if param.is_floating_point() else param.dtype
            memo[id(param)] = torch.nn.Parameter(
                param.detach().to(device, kind, copy=True), requires_grad=param.requires_grad
            )
        for buf in block.buffers():
            memo[id(buf)] = buf.to(
                device, dtype if buf.is_floating_point() else buf.dtype, copy=True
            )
        clone = copy.deepcopy(block, memo)
    return clone.to(device=device, dtype=dtype)


def _to_cpu(value):
    """``value`` with every tensor in it (dataclasses, dicts, lists, tuples) moved to the CPU."""
    import dataclasses

    if isinstance(value, torch.Tensor):
        return value.cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _to_cpu(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


@dataclass
class BlockResult:
    """What the walk hands its sink after each block."""

    index: int
    prefix: str  # e.g. "model.layers.3"
    block: torch.nn.Module  # the block, holding the dequantized (fake-quant) weights
    weights: dict[str, QuantizedWeight]  # full linear name -> its quantization
    modified: dict[str, torch.Tensor]  # full name -> other parameters the method changed
    records: object | None  # the method's record of the block (e.g. AWQ's search), if any


class BlockLoader(Protocol):
    """Where the walk's blocks come from when the model is not in memory (streaming: the shards,
    `quantlab.models.shards.ShardBlockLoader`). Without a loader the model holds every block."""

    def load_embedding(self, model) -> None: ...
    def release_embedding(self, model) -> None: ...
    def load_block(self, prefix: str, block) -> None: ...
    def release_block(self, prefix: str, block) -> None: ...


def quantize_model(
    model,
    arch: ArchSpec,
    method: str,
    config,
    calibration=None,
    *,
    calib_dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    loader: BlockLoader | None = None,
    sink: Callable[[BlockResult], None] | None = None,
    overrides: dict | None = None,
    offload: bool = False,
) -> QuantizationResult:
    """The block walk: quantize every block of ``model`` in order and return the result.

    ``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``): where each block is computed (see
    `run_block`); the model's master weights stay where they are. ``offload``: keep the
    calibration activations between blocks on the CPU (slower; the device still holds the
    block and, while a layer's statistics are gathered, every chunk's input to that layer:
    for an 8B model at 128 x 2048 bf16 tokens ~7.5 GB at down_proj). On a GPU
    the walk offloads by itself when the activations would take more than half of the device's
    free memory (``result.offloaded`` says so).

    ``calibration`` is a `CalibrationSet` (required unless the method needs none); its samples are
    processed as one batch, so memory grows with n_samples x seq_len x hidden.

    Each finished block goes to ``sink``. The default sink keeps everything in memory: the model
    is left holding the dequantized weights (fake quant) and the result holds the integer
    tensors. A streaming sink (a format's block writer) packs and writes each block as it comes,
    and the result then holds only what describes the whole run (importance matrix, records,
    calibration, timings). ``loader`` fills each block before it runs and empties it afterwards
    (a model read from its shards); without it the blocks are already in ``model``.

    ``overrides`` (full linear name -> a config of the method's class) quantizes those linears
    with their own settings (per-module bits, e.g. a fit's); only methods registered with
    ``per_module`` take them.
    """
    from tqdm import tqdm

    spec = get_method(method)
    if not isinstance(config, spec.config_cls):
        raise QuantlabError(f"method {method} takes a {spec.config_cls.__name__}")
    overrides = dict(overrides or {})
    if overrides and not spec.per_module:
        raise QuantlabError(f"method {method} does not take per-module settings")
    for name, own in overrides.items():
        if not isinstance(own, spec.config_cls):
            raise QuantlabError(f"{name}: the override must be a {spec.config_cls.__name__}")
    if spec.needs_calibration and calibration is None:
        raise QuantlabError(f"method {method} needs a calibration set")
    device = resolve_device(device)
    start = time.perf_counter()
    dtype = getattr(torch, calib_dtype)
    blocks = model.get_submodule(arch.blocks)
    clock = StageClock(device)
    hidden = kwargs = None
    imatrix: dict[str, list] = {}
    if calibration is not None and not offload:
        offload = not _activations_fit(model, calibration, dtype, device)
    advice = _oom_advice(device, calibration, offload, dtype)
    if calibration is not None:
        ids = torch.as_tensor(np.array(calibration.input_ids))  # a copy: ids may be read-only
        with clock.stage("capture"), device_oom("the embedding (capture)", device, advice):
            if loader is not None:
                loader.load_embedding(model)
            where = "cpu" if offload else device
            hidden, kwargs = _capture_first_block_inputs(model, arch, ids, dtype, where)
            if loader is not None:
                loader.release_embedding(model)
        for i in range(len(blocks)):
            for name in arch.linears:
                imatrix[f"{arch.blocks}.{i}.{name}"] = [0.0, 0]
    result = QuantizationResult(method, config, {}, {}, {}, 0, {}, None, 0.0, clock.seconds)
    result.overrides = overrides
    result.device = device
    result.offloaded = offload

    def keep(done: BlockResult) -> None:  # the in-memory sink
        result.weights.update(done.weights)
        result.modified.update(done.modified)

    sink = sink or keep
    bar = tqdm(
        range(len(blocks)),
        desc=f"{method} blocks" + (" (streaming)" if loader is not None else ""),
        unit="block",
        file=bar_stream(),
        disable=not progress,
    )
    home = _param_device(blocks[0]) if len(blocks) else torch.device("cpu")
    for i in bar:
        prefix = f"{arch.blocks}.{i}"
        block = blocks[i]
        with device_oom(f"block {prefix} ({method})", device, advice):
            if loader is not None:
                with clock.stage("read"):
                    loader.load_block(prefix, block)
            configs = {
                n.removeprefix(prefix + "."): c
                for n, c in overrides.items()
                if n.startswith(prefix + ".")
            }
            try:
                ctx, hidden = run_block(
                    spec, config, prefix, block, arch, hidden, kwargs, imatrix,
                    dtype=dtype, device=device, configs=configs, clock=clock,
                )  # fmt: skip
            finally:  # the master block goes home, also when the block failed
                if loader is None and _param_device(block) != home:
                    with clock.stage("copy"):
                        block.to(home)
            with clock.stage("copy"):  # everything the method made comes back to the CPU
                quantized = {f"{prefix}.{n}": _to_cpu(qw) for n, qw in ctx.quantized.items()}
                modified = {
                    f"{prefix}.{name}": block.get_parameter(name).detach().cpu().clone()
                    for name in sorted(ctx.modified)
                }
                records = None
                if ctx.records:
                    records = _to_cpu(ctx.records[0] if len(ctx.records) == 1 else ctx.records)
        missing = [name for name in arch.linears if name not in ctx.quantized]
        if missing:
            raise QuantlabError(f"{method} left {prefix} {', '.join(missing)} unquantized")
        result.linears += len(ctx.quantized)
        if records is not None:
            result.records[prefix] = records
        with clock.stage("write"):
            sink(BlockResult(i, prefix, block, quantized, modified, records))
        del ctx, quantized, modified
        gc.collect()  # a block's tensors can sit in reference cycles (hooks, closures): free them
        if loader is not None:
            loader.release_block(prefix, block)
    bar.close()
    result.imatrix = {k: (v[0] / v[1]).float() for k, v in imatrix.items() if v[1]}
    result.imatrix_tokens = next((v[1] for v in imatrix.values()), 0)
    if calibration is not None:
        result.calibration = calibration.provenance()
    result.seconds = time.perf_counter() - start
    result.stage_seconds = dict(clock.seconds)
    result.stage_seconds["blocks"] = result.seconds - clock.seconds.get("capture", 0.0)
    result.stage_peak_bytes = dict(clock.peak_allocated)
    if is_gpu(device):  # hand the walk's cached blocks back (an evaluation may follow)
        torch.cuda.empty_cache()
    return result


def _activations_fit(model, calibration, dtype, device: str) -> bool:
    """Whether the calibration activations between blocks (a block's inputs and outputs) take at
    most half of ``device``'s free memory (always true on the CPU); if not, the walk keeps them
    on the CPU (`quantize_model`'s ``offload``)."""
    if not is_gpu(device):
        return True
    hidden = getattr(model.config, "hidden_size", None)
    if not hidden:
        return True
    n, seq = np.shape(calibration.input_ids)
    # a block's inputs, its outputs (and their concatenation) between blocks; offloading moves
    # these to the CPU (the inputs of the block's stops stay on the device either way)
    need = 3 * n * seq * hidden * torch.empty((), dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return need <= free / 2


def _oom_advice(device: str, calibration, offload: bool, dtype=torch.float32) -> str:
    """What to lower when a block does not fit in ``device``'s memory."""
    tips = []
    if calibration is not None:
        n, seq = np.shape(calibration.input_ids)
        tips.append(f"fewer calibration samples or a shorter sequence (now {n} x {seq})")
        if dtype != torch.bfloat16:
            tips.append("--calib-dtype bfloat16")
        if is_gpu(device) and not offload:
            tips.append("--offload (activations between blocks on the CPU)")
    if is_gpu(device):
        tips.append("or --device cpu")
    return "try " + ", ".join(tips) if tips else "free memory or use a machine with more"


def collect_imatrix(
    model,
    arch: ArchSpec,
    calibration,
    *,
    calib_dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """The importance matrix of the *unquantized* model (what llama-imatrix measures): mean of x^2
    per input column of every linear, from one pass over the calibration set. Returns the matrix
    (full linear name -> (in,) float32) and the number of rows (tokens) it averages."""
    from tqdm import tqdm

    dtype = getattr(torch, calib_dtype)
    device = resolve_device(device)
    ids = torch.as_tensor(np.array(calibration.input_ids))  # a copy: ids may be read-only
    hidden, kwargs = _capture_first_block_inputs(model, arch, ids, dtype, device)
    blocks = model.get_submodule(arch.blocks)
    stats: dict[str, list] = {
        f"{arch.blocks}.{i}.{name}": [0.0, 0] for i in range(len(blocks)) for name in arch.linears
    }
    for i in tqdm(
        range(len(blocks)), desc="imatrix", unit="block", file=bar_stream(), disable=not progress
    ):
        block = blocks[i]
        compute = block
        if dtype != torch.float32 or device != "cpu":
            compute = _compute_copy(block, device, dtype)
        ctx = BlockContext(f"{arch.blocks}.{i}", block, compute, arch, hidden, kwargs, stats)
        hidden = ctx.forward()
        del compute, ctx
    rows = max(v[1] for v in stats.values())
    return {k: (v[0] / v[1]).float() for k, v in stats.items() if v[1]}, rows
