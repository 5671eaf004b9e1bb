"""Streaming quantization: models larger than the memory they are quantized in.

`quantize_streaming` never holds the model. It builds the model's modules on the ``meta`` device
(shapes only) and runs the same block walk as an in-memory run (`quantize_model`), with a
`ShardBlockLoader` that reads one decoder block at a time from the safetensors shards
(memory-mapped, only the block's byte ranges are touched) and returns it to ``meta`` once the
block is done, and with the caller's ``sink`` receiving each finished block (a format's streaming
writer: ``get_format("gptq").stream(request, run)`` hands ``run`` its sink). The embedding is read
once to compute the first block's inputs and then freed.

What is alive at any moment: one block (float32 master + compute copy), the calibration
activations (n_samples x seq_len x hidden in ``calib_dtype``, inputs and outputs of one block),
and the per-linear importance matrix (in_features floats each). None of it grows with the number
of blocks. `bound_allocator` changes glibc's mmap threshold for the rest of the process (see
`quantlab.models.shards`).
"""

from __future__ import annotations

from collections.abc import Callable

from quantlab.methods.runner import BlockResult, QuantizationResult, quantize_model


def quantize_streaming(
    model_ref,
    method: str,
    config,
    calibration,
    sink: Callable[[BlockResult], None],
    *,
    calib_dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    overrides: dict | None = None,
    offload: bool = False,
) -> QuantizationResult:
    """Quantize ``model_ref`` block by block from its shards, handing each block to ``sink``;
    returns the run's result (without per-linear tensors: the sink has them)."""
    from quantlab.devices import resolve_device
    from quantlab.models.shards import ShardBlockLoader, bound_allocator, model_skeleton

    device = resolve_device(device)
    loader = ShardBlockLoader(model_ref, device)  # refuses a folder without safetensors shards
    bound_allocator()
    model = model_skeleton(model_ref)
    return quantize_model(
        model,
        model_ref.folder.arch,
        method,
        config,
        calibration,
        calib_dtype=calib_dtype,
        device=device,
        progress=progress,
        loader=loader,
        sink=sink,
        overrides=overrides,
        offload=offload,
    )
