"""The ``quantlab`` command line.

Each subcommand is a thin layer over the library: parse arguments, call one public function,
print its result. User errors (`QuantlabError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quantlab.errors import QuantlabError
from quantlab.version import __version__

DEMO_PROMPT = "The three primary colors are"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _resolve(args):
    from quantlab.models import resolve_model

    return resolve_model(
        args.model,
        cache=args.cache,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )


def cmd_models(args) -> None:
    from quantlab.models import named_models, supported_architectures

    print("Named models:")
    _print_table(list(named_models().items()))
    print("\nAlso accepted: a local Hugging Face folder, or a Hub id (org/name) when online.")
    print("Supported architectures: " + ", ".join(supported_architectures()))


def cmd_info(args) -> None:
    from quantlab.models import model_info

    info = model_info(_resolve(args))
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return
    dtypes = ", ".join(f"{k} x{v}" for k, v in info.dtypes.items())
    rows = [
        ("model", info.spec),
        ("origin", info.origin),
        ("path", info.path),
        ("architecture", f"{info.architecture} ({info.model_type})"),
        ("parameters", f"{info.parameters:,} ({info.parameters / 1e6:.1f}M)"),
        ("layers", str(info.layers)),
        ("hidden size", str(info.hidden_size)),
        ("intermediate size", str(info.intermediate_size)),
        ("attention heads", f"{info.attention_heads} ({info.kv_heads} key/value)"),
        ("vocabulary", str(info.vocab_size)),
        ("tied embeddings", "yes" if info.tied_embeddings else "no"),
        ("stored dtypes", dtypes),
        ("size on disk", _human_bytes(info.size_on_disk)),
        ("tokenizer", info.tokenizer),
    ]
    if info.weights_note:
        rows.append(("note", info.weights_note))
    _print_table(rows)


def cmd_generate(args) -> None:
    from quantlab.models import generate_greedy, load_tokenizer

    model = _resolve(args)
    start = time.perf_counter()
    ids = generate_greedy(model, args.prompt, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    text = load_tokenizer(model).decode(ids, skip_special_tokens=True)
    print(f"{args.prompt}{text}")
    print(
        f"[{len(ids)} tokens, greedy, fp32 on CPU, {seconds:.1f} s incl. loading]", file=sys.stderr
    )


def cmd_corpora(args) -> None:
    from quantlab import settings
    from quantlab.data import corpus_entry, corpus_names, load_corpus

    root = settings.data_root(args.data_root)
    print(f"data root: {root or 'none (set QUANTLAB_DATA or --data-root)'}")
    rows = []
    for name in corpus_names():
        entry = corpus_entry(name)
        try:
            corpus = load_corpus(name, entry.splits[0], data_root=args.data_root)
            where = f"{len(corpus.documents)} docs from {corpus.source}"
        except QuantlabError as exc:
            where = f"unavailable ({exc})"
        rows.append((name, f"{entry.description}; splits {'/'.join(entry.splits)}; {where}"))
    _print_table(rows)


def _calibration(args, model_ref):
    """The corpus and calibration set that the calibration options of ``args`` describe."""
    from quantlab.data import calibration_for

    return calibration_for(model_ref, _calibration_config(args), data_root=args.data_root)


def cmd_calibrate(args) -> None:
    corpus, calib = _calibration(args, _resolve(args))
    config = calib.config
    rows = [
        ("corpus", corpus.label + (f" ({corpus.note})" if corpus.note else "")),
        ("source", corpus.source),
        ("corpus tokens", f"{calib.corpus_tokens:,}"),
        ("samples", f"{config.n_samples} x {config.seq_len} tokens, seed {config.seed}"),
        ("sha256", calib.sha256),
    ]
    _print_table(rows)


def _print_metrics(m) -> None:
    print(f"{m.target}  ({m.runtime})")
    rows = []
    for p in m.perplexity:
        rows.append(
            (
                f"ppl {p.corpus} [{p.protocol}, ctx {p.context}]",
                f"{p.ppl:.4f}  ({p.scored_tokens:,} tokens scored)",
            )
        )
    if m.kld is not None:
        k = m.kld
        rows.append(
            (
                f"KLD vs {k.reference}",
                f"mean {k.mean:.6f}  median {k.median:.6f}  p99 {k.p99:.6f}  max {k.max:.4f}",
            )
        )
        rows.append(("top-1 agreement", f"{100 * k.top1_agreement:.2f}%"))
        rows.append(("ppl ratio", f"{k.ppl_ratio:.4f}  (reference ppl {k.reference_ppl:.4f})"))
    for t in m.tasks:
        err = f" +/- {t.stderr:.4f}" if t.stderr is not None else ""
        rows.append((f"{t.task} {t.metric}", f"{t.value:.4f}{err}  ({t.samples} docs, {t.source})"))
    if m.size is not None:
        linears = m.size.linear_bits_per_weight
        per_linear = "" if linears is None else f" ({linears:.2f} in the quantized linears)"
        size = f"{_human_bytes(m.size.bytes_on_disk)}, {m.size.bits_per_weight:.2f} bits/weight"
        rows.append(("size", size + per_linear))
    if m.memory is not None and m.memory.peak_rss_bytes:
        gpu = f", GPU {_human_bytes(m.memory.cuda_peak_bytes)}" if m.memory.cuda_peak_bytes else ""
        rows.append(("peak memory", f"RSS {_human_bytes(m.memory.peak_rss_bytes)}{gpu}"))
    if m.speed is not None:
        sp = m.speed
        rows.append(
            (
                "speed",
                f"prefill {sp.prefill_tokens_per_s:.1f} tok/s ({sp.prompt_tokens} "
                f"tokens), decode {sp.decode_tokens_per_s:.1f} tok/s, median of "
                f"{sp.runs}, {sp.runtime}, {sp.threads} threads",
            )
        )
    if m.hardware is not None:
        gpu = m.hardware.gpu or "no GPU"
        rows.append(("hardware", f"{m.hardware.cpu}, {m.hardware.cores} cores, {gpu}"))
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in m.stage_seconds.items())
    rows.append(("stage times", stages))
    _print_table(rows)


def cmd_eval(args) -> None:
    from quantlab.eval.harness import EvalConfig, evaluate
    from quantlab.eval.perplexity import PerplexityConfig

    protocols = ["gptq", "llamacpp"] if args.protocol == "both" else [args.protocol]
    corpora = [c for c in (args.ppl or "").split(",") if c]
    ppl = tuple(
        PerplexityConfig(
            corpus=c, split=args.split, protocol=p, context=args.context, max_tokens=args.max_tokens
        )
        for c in corpora
        for p in protocols
    )
    config = EvalConfig(
        perplexity=ppl,
        kld=args.kld,
        tasks=tuple(t for t in (args.tasks or "").split(",") if t),
        limit=args.limit,
        speed=args.speed,
        dtype=args.dtype,
        gguf_runtime=args.gguf_runtime,
        kernels=not args.no_kernels,
        allow_fallback=args.allow_fallback,
    )
    from quantlab import settings
    from quantlab.console import session
    from quantlab.workbench.pipeline import add_card_evaluation

    log = settings.cache_dir(args.cache) / "logs" / "eval.log"
    with session(log, verbose=args.verbose, inner_bars=True):
        metrics = evaluate(
            args.target,
            config,
            reference=args.reference,
            data_root=args.data_root,
            cache=args.cache,
            device=args.device,
        )
        add_card_evaluation(args.target, metrics, args.reference)
    _print_metrics(metrics)
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(metrics.to_json() + "\n")
        print(f"wrote {args.json}")


def cmd_synthetic(args) -> None:
    """``quantlab synthetic SHAPE --out DIR``: a random model with a real architecture's shapes."""
    from quantlab.models.synthetic import SHAPES, shape_spec, synthetic_bytes, write_shape

    if args.shape == "list":
        for name, spec in SHAPES.items():
            gib = synthetic_bytes(**spec.kwargs()) / 2**30
            print(f"{name:<14} {spec.parameters() / 1e9:6.2f} B params, {gib:6.1f} GiB in bf16 "
                  f"({spec.source})")  # fmt: skip
        return
    spec = shape_spec(args.shape)
    out = Path(args.out or f"synthetic-{args.shape}")
    if out.exists():
        raise QuantlabError(f"{out} already exists; remove it or choose another --out")
    layers = args.layers or spec.layers
    kwargs = {**spec.kwargs(), "layers": layers, "itemsize": 2 if args.dtype != "float32" else 4}
    need = synthetic_bytes(**kwargs)
    import shutil

    free = shutil.disk_usage(out.resolve().parent if out.resolve().parent.exists() else ".").free
    if need > free:
        raise QuantlabError(
            f"{args.shape} needs {need / 2**30:.1f} GiB and {out.parent} has {free / 2**30:.1f} "
            "GiB free; use --layers to write fewer blocks"
        )
    write_shape(args.shape, out, layers=args.layers, dtype=args.dtype, seed=args.seed,
                progress=True)  # fmt: skip
    print(
        f"wrote {out}: {args.shape} shapes ({spec.source}), {layers} blocks, random {args.dtype} "
        f"weights ({need / 2**30:.1f} GiB) - for time and memory, not quality"
    )


def cmd_convert(args) -> None:
    """``quantlab convert MODEL --to gguf``: llama.cpp's own converter, output checked."""
    from quantlab import settings
    from quantlab.formats.gguf_convert import convert_hf_to_gguf
    from quantlab.formats.gguf_quant import type_mix, write_gguf_manifest

    out = Path(args.out)
    if out.suffix != ".gguf":
        raise QuantlabError(f"--out is a .gguf file path, got {out}")
    if out.exists():
        raise QuantlabError(f"{out} already exists; choose another --out or remove it")
    model_ref = _resolve(args)
    start = time.perf_counter()
    out, checks = convert_hf_to_gguf(
        model_ref, out, args.outtype, cache=settings.cache_dir(args.cache), llama_cpp=args.llama_cpp
    )
    seconds = time.perf_counter() - start
    write_gguf_manifest(out, None, model_ref, outtype=args.outtype, conversion=checks)
    mix = ", ".join(f"{n} {t}" for t, n in type_mix(out).items())
    print(f"wrote {out} in {seconds:.1f} s: {mix}; tokenizer {checks['tokenizer_parity']}")


def _setting_flags() -> dict[str, list]:
    """Every settable field of every registered method's config and format's options: field
    name -> [(owner kind, owner name, dataclass field, its type), ...]. Each becomes one
    ``quantize`` flag."""
    from quantlab.formats import formats, option_fields
    from quantlab.methods import get_method, method_names
    from quantlab.workbench.config import field_types

    flags: dict[str, list] = {}
    for name in method_names():
        config_cls = get_method(name).config_cls
        types = field_types(config_cls)
        for f in get_method(name).fields():
            flags.setdefault(f.name, []).append(("method", name, f, types[f.name]))
    for fmt in formats():
        if fmt.writable:
            types = field_types(fmt.options)
            for f in option_fields(fmt):
                flags.setdefault(f.name, []).append(("format", fmt.name, f, types[f.name]))
    return flags


def _value(text: str):
    """A command-line value whose type the owners of its flag disagree on: a bool, a number or
    a string, by its shape (the owner's dataclass then checks it)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _add_setting_flags(p) -> list[str]:
    """A flag per method/format setting (``--bits``, ``--act-order/--no-act-order``,
    ``--gptq-format``, ...); returns the field names added. Only flags given on the command
    line reach the variant, so the method's and format's own defaults apply. A field named like
    one of quantize's own options (a plugin's) is left to run configs."""
    kinds = {"int": int, "float": float, "str": str}
    added = []
    for name, owners in sorted(_setting_flags().items()):
        flag = "--" + name.replace("_", "-")
        types = {type_name.split(" ")[0] for *_, type_name in owners}
        where = ", ".join(
            f"{kind} {owner}" + ("" if g.default is None else f" (default {g.default})")
            for kind, owner, g, _ in owners
        )
        base = types.pop() if len(types) == 1 else "value"  # owners disagree: parse by shape
        try:
            if base == "bool" and name == "sym":  # --sym / --no-sym / --asym, one of them
                group = p.add_mutually_exclusive_group()
                group.add_argument(flag, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=where)  # fmt: skip
                group.add_argument("--asym", dest="sym", action="store_false",
                                   default=argparse.SUPPRESS, help="same as --no-sym")  # fmt: skip
            elif base == "bool":
                p.add_argument(flag, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=where)  # fmt: skip
            else:
                p.add_argument(flag, type=kinds.get(base, _value), default=argparse.SUPPRESS,
                               metavar=base.upper(), help=where)  # fmt: skip
        except argparse.ArgumentError:
            continue
        added.append(name)
    return added


def _calibration_config(args):
    from quantlab.data import CalibrationConfig

    return CalibrationConfig(
        corpus=args.calib,
        split=args.split,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        dtype=getattr(args, "calib_dtype", "float32"),
        allow_fallback=args.allow_fallback,
    )


def _variant(args):
    """The `Variant` the quantize options describe: the same object, validated the same way, as
    a run config's variant."""
    from quantlab.formats import formats, get_format, option_fields
    from quantlab.methods import get_method
    from quantlab.workbench.config import parse_variant

    given = {name: getattr(args, name) for name in args.setting_flags if hasattr(args, name)}
    if not args.method and not args.format:
        selfmade = [f.name for f in formats() if f.writable and not f.needs_method]
        raise QuantlabError(
            f"give --method, or a --format that quantizes by itself ({', '.join(selfmade)})"
        )
    owned = {f.name for f in (get_method(args.method).fields() if args.method else [])}
    # with --format, its options; without, any format's (the variant infers the format from
    # them, as a run config does: --gptq-format v2 means --format gptq)
    named = [get_format(args.format)] if args.format else [f for f in formats() if f.writable]
    owned |= {f.name for fmt in named for f in option_fields(fmt)}
    for name in given:
        if name not in owned:
            what = f"--method {args.method}" if args.method else "no --method"
            what += f" and --format {args.format}" if args.format else ""
            raise QuantlabError(f"--{name.replace('_', '-')} does not apply to {what}")
    data = {"method": args.method, "format": args.format, **given}
    if args.imatrix:
        data["imatrix"] = True
    if args.streaming:
        data["streaming"] = True
    if args.rotate:
        data["rotate"] = True
    return parse_variant(data, "quantize")


def cmd_quantize(args) -> None:
    """``quantlab quantize``: one variant, made by the same code as a sweep's
    (`quantlab.workbench.produce`)."""
    from quantlab.formats import get_format
    from quantlab.workbench.produce import SharedInputs, preflight, produce

    out = Path(args.out)
    if out.exists():
        raise QuantlabError(f"{out} already exists; remove it or choose another --out")
    variant = _variant(args)
    suffix = get_format(variant.format).suffix
    if suffix and out.suffix != suffix:
        raise QuantlabError(
            f"--out for --format {variant.format} is a {suffix} file path, got {out}"
        )
    from quantlab import settings
    from quantlab.console import say, session

    log = settings.cache_dir(args.cache) / "logs" / "quantize.log"
    with session(log, verbose=args.verbose, inner_bars=True):
        model_ref = _resolve(args)
        preflight([variant], model_ref)
        shared = SharedInputs(
            model_ref,
            _calibration_config(args),
            data_root=args.data_root,
            cache=args.cache,
            log=say,
            device=args.device,
            offload=bool(args.offload),
        )
        made = produce(variant, shared, out)
    print(made.summary)
    if made.stages_line():
        print(made.stages_line())
    for note in made.notes:
        print(f"note: {note}")
    print(
        f"wrote {made.target} (evaluate it with: quantlab eval {made.target} --ppl wikitext2 --kld "
        f"--reference {args.model})"
    )


def _print_results(rows) -> None:
    from quantlab.workbench.report import format_table, results_table

    print(format_table(*results_table(rows)))


def _task_resources(args):
    """``--task-*`` options as the Ray executor's `TaskResources` (None for the local executor)."""
    from quantlab.workbench.plan import parse_size
    from quantlab.workbench.ray_executor import TaskResources

    ray_only = [
        f"--{n.replace('_', '-')}"
        for n in ("address", "task_cpus", "task_gpus", "task_memory")
        if getattr(args, n) is not None
    ]
    if args.executor != "ray":
        if ray_only:
            raise QuantlabError(f"{', '.join(ray_only)} apply to --executor ray only")
        return None
    cpus = 1.0 if args.task_cpus is None else args.task_cpus
    gpus = 0.0 if args.task_gpus is None else args.task_gpus
    if cpus <= 0 or gpus < 0:
        raise QuantlabError("--task-cpus must be > 0 and --task-gpus >= 0")
    memory = parse_size(args.task_memory) if args.task_memory else None
    return TaskResources(cpus=cpus, gpus=gpus, memory_bytes=memory)


def cmd_run(args) -> None:
    """``quantlab run CONFIG``: the sweep, then the results table and the report."""
    from quantlab.console import session
    from quantlab.workbench.config import load_run_config
    from quantlab.workbench.pipeline import run_sweep
    from quantlab.workbench.store import ResultStore

    config = load_run_config(args.config)
    changes = {"device": args.device, "offload": args.offload}
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:
        import dataclasses

        config = dataclasses.replace(config, **changes)
    store_path = args.store or config.store
    resources = _task_resources(args)
    log = Path(args.output or config.output) / config.name / "quantlab.log"
    with session(log, verbose=args.verbose, inner_bars=False):
        report = run_sweep(
            config,
            data_root=args.data_root,
            cache=args.cache,
            store_path=store_path,
            output=args.output,
            progress_file=args.progress_file,
            executor=args.executor,
            address=args.address,
            resources=resources,
            wait=args.wait,
        )
    keys = set(report.keys.values())
    with ResultStore(store_path) as store:
        rows = [r for r in store.results() if r.key in keys]
    print(
        f"\n{config.name}: {len(report.done)} evaluated, {len(report.skipped)} already stored "
        f"({report.seconds:.0f} s); results in {store_path}"
    )
    _print_results(rows)
    out = Path(args.output or config.output) / config.name / "report"
    path = _write_report(rows, out, config.name, config.model, report.notes)
    print(f"\nreport: {path} (and report.html beside it)")


def _write_report(rows, out, name, model, notes=()):
    from quantlab.workbench.report import write_report

    notes = list(notes)
    if any("smollm2" in r.model for r in rows):
        notes.append(
            "The embedded default model's weights were dequantized from a Q4_1 GGUF: the numbers "
            "describe SmolLM2-135M-Instruct after Q4_1, not the original bf16 weights."
        )
    return write_report(rows, out, title=f"{name} ({model})", notes=notes)


def cmd_report(args) -> None:
    from quantlab.workbench.store import ResultStore

    with ResultStore(args.store) as store:
        runs = store.runs()
        if not runs:
            raise QuantlabError(f"{args.store} holds no runs yet (quantlab run CONFIG)")
        name = args.run or runs[-1]["name"]
        rows = store.results(run_name=name)
    if not rows:
        known = ", ".join(sorted({r["name"] for r in runs}))
        raise QuantlabError(f"no results for run {name!r} in {args.store}; runs: {known}")
    _print_results(rows)
    out = Path(args.out or Path("out") / name / "report")
    path = _write_report(rows, out, name, rows[0].model)
    print(f"\nreport: {path}")


def cmd_doctor(args) -> None:
    from quantlab.doctor import checks, report

    print(report(checks(data_root=args.data_root, cache=args.cache)))


def cmd_verify(args) -> None:
    from quantlab.verify import verify

    report = verify(args.artifact)
    print(f"{args.artifact}: verified ({report.kind}, {len(report.checks)} checks)")


def cmd_plan(args) -> None:
    from quantlab.workbench.plan import GIB, parse_size, plan, read_config
    from quantlab.workbench.store import ResultStore

    vram = parse_size(args.vram)
    config, label, model_sha = read_config(args.model, cache=args.cache)
    measured = []
    if model_sha and Path(args.store).is_file():
        with ResultStore(args.store) as store:
            measured = [r for r in store.results(model_sha256=model_sha) if r.metrics.kld]
        measured.sort(key=lambda r: r.metrics.kld.mean)
    rows = plan(config, args.context, args.batch, measured)
    print(f"{label}: {args.context:,}-token context, batch {args.batch}, {vram / GIB:.1f} GiB")
    print("memory = weights + KV cache (fp16) + compute buffer + 0.25 GiB runtime\n")
    header = (
        f"{'variant':<26} {'runtime':<30} {'weights':>8} {'KV':>6} {'compute':>7} "
        f"{'total GiB':>9} {'fits':>4}  quality / notes"
    )
    print(header)
    print("-" * (len(header) + 10))
    for r in rows:
        fits = "yes" if r.total <= vram else "no"
        extra = r.note
        if r.measured is not None:
            m = r.measured.metrics
            extra = f"measured: KLD {m.kld.mean:.4f}, ppl {m.perplexity[0].ppl:.3f}"
            if m.memory and m.memory.vram_bytes:
                extra += (
                    f"; measured VRAM {m.memory.vram_bytes / GIB:.2f} GiB on {m.memory.device}"
                    + (f", planned {m.memory.planned_bytes / GIB:.2f}"
                       if m.memory.planned_bytes else "")
                )  # fmt: skip
            elif m.memory and m.memory.peak_rss_bytes:
                extra += f"; peak RSS {m.memory.peak_rss_bytes / GIB:.2f} GiB (CPU process)"
        print(
            f"{r.name:<26} {r.runtime:<30} {r.weights / GIB:>8.2f} {r.kv / GIB:>6.2f} "
            f"{r.compute / GIB:>7.2f} {r.total / GIB:>9.2f} {fits:>4}  {extra}"
        )
    fitting = [r for r in rows if r.total <= vram]
    if not fitting:
        print("\nnothing fits: lower the context or the batch, or use a smaller model")
    elif fitting[0].measured is not None:
        print(f"\nbest measured quality that fits: {fitting[0].name}")
    else:
        best = max(fitting, key=lambda r: r.weights)
        print(f"\nno measurements for this model; most bits that fit: {best.name}")
    if fitting:
        print(
            f"a mixed-precision file that uses all of it: quantlab fit {args.model} --vram "
            f"{args.vram} --context {args.context} --format gguf (or gptq)"
        )


def cmd_sensitivity(args) -> None:
    """``quantlab sensitivity MODEL``: measure (or read from the cache) the per-tensor
    sensitivity on the calibration set and print what it found."""
    import shutil

    from quantlab import settings
    from quantlab.console import say, session
    from quantlab.fit.sensitivity import SensitivityConfig, measure_sensitivity, sensitivity_path
    from quantlab.workbench.produce import SharedInputs

    cache = settings.cache_dir(args.cache)
    with session(cache / "logs" / "sensitivity.log", verbose=args.verbose, inner_bars=True):
        model_ref = _resolve(args)
        shared = SharedInputs(
            model_ref, _calibration_config(args), data_root=args.data_root, cache=args.cache,
            log=say,
        )  # fmt: skip
        _, calibration = shared.calibration()
        try:
            groups = tuple(int(g) for g in args.group_sizes.split(",") if g)
        except ValueError:
            raise QuantlabError(
                f"--group-sizes: {args.group_sizes!r} is not a list of numbers"
            ) from None
        config = SensitivityConfig(
            families=tuple(f for f in args.families.split(",") if f),
            group_sizes=groups,
            tokens=args.tokens,
            swaps=args.swaps,
        )
        sens = measure_sensitivity(
            model_ref, calibration, shared.imatrix()[0], config, cache=cache, log=say
        )
    path = sensitivity_path(cache, sens.model_sha256, calibration.sha256, config)
    _print_sensitivity(sens, path)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.json)
        print(f"copied to {args.json}")


def _print_sensitivity(sens, path) -> None:
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in sens.stage_seconds.items())
    rho = sens.spearman
    print(f"{sens.model}: {len(sens.units)} tensors, KLD measured on {sens.tokens} tokens")
    print(f"  cost: {sens.seconds:.0f} s ({stages})")
    if rho is not None:
        print(f"  prediction vs {len(sens.swaps)} measured single-tensor swaps: Spearman {rho:.3f}")
    by_kind: dict[str, list[float]] = {}
    for u in sens.units.values():
        by_kind.setdefault(u.unit.kind, []).append(u.probe_kld)
    print("  mean KLD of one tensor at the probe (RTN 3-bit g32), by kind:")
    for kind, values in sorted(by_kind.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        print(f"    {kind:<12} {sum(values) / len(values):.5f}  ({len(values)} tensors)")
    top = sorted(sens.units.values(), key=lambda u: -u.probe_kld)[:5]
    print("  most sensitive: " + ", ".join(f"{u.unit.name} {u.probe_kld:.4f}" for u in top))
    print(f"  stored: {path}")


def _fit_target(args):
    from quantlab.fit import FitTarget

    return FitTarget(
        bpw=args.bpw, size=args.size, vram=args.vram, size_of=args.size_of,
        context=args.context, batch=args.batch, group_size=args.group_size,
        exclude=tuple(k for k in args.exclude.split(",") if k),
    )  # fmt: skip


def cmd_fit(args) -> None:
    """``quantlab fit MODEL --format F --bpw|--size|--vram``: the best mix that fits, built,
    evaluated and stored like any variant (a one-variant run); ``--dry-run`` prints the
    allocation only."""
    from quantlab.formats import get_format
    from quantlab.workbench.config import parse_variant

    fmt = get_format(args.format)
    if not fmt.fit_family:
        from quantlab.formats import formats

        can = ", ".join(f.name for f in formats() if f.fit_family)
        raise QuantlabError(f"format {fmt.name} cannot hold a fit; use one of {can}")
    target = _fit_target(args)
    if args.dry_run:
        _fit_dry_run(args, fmt, target)
        return
    variant = parse_variant(
        {"fit": {k: v for k, v in vars(target).items() if k != "version"}, "format": fmt.name}
    )
    from quantlab.console import session
    from quantlab.eval.harness import EvalConfig
    from quantlab.eval.perplexity import PerplexityConfig
    from quantlab.fit.build import fit_record
    from quantlab.workbench.config import RunConfig
    from quantlab.workbench.pipeline import run_sweep
    from quantlab.workbench.store import ResultStore

    config = RunConfig(
        name=args.name,
        model=args.model,
        variants=(variant,),
        calibration=_calibration_config(args),
        evaluation=EvalConfig(
            perplexity=(PerplexityConfig(context=512, max_tokens=args.max_tokens),),
            kld=True,
            speed=True,
            allow_fallback=args.allow_fallback,
        ),
        output=args.out,
        store=args.store,
        device=args.device,
    )
    log = Path(args.out) / args.name / "quantlab.log"
    with session(log, verbose=args.verbose, inner_bars=True):
        report = run_sweep(config, data_root=args.data_root, cache=args.cache)
    with ResultStore(args.store) as store:
        rows = [r for r in store.results() if r.key == report.keys[variant.name]]
    _print_results(rows)
    for row in rows:
        fit = fit_record(row.artifact)
        if fit and row.metrics.kld is not None:
            print(
                f"\n{variant.name}: predicted KLD {fit['predicted_kld']:.5f}, measured "
                f"{row.metrics.kld.mean:.5f}; {fit['bits_per_weight']:.3f} bits/weight "
                f"({', '.join(f'{n} {k}' for k, n in fit['counts'].items())})"
            )
        print(f"artifact: {row.artifact}")


def _fit_dry_run(args, fmt, target) -> None:
    """The allocation a fit would target: from the measured sensitivity when the cache holds one
    for this model and calibration set, else from the prior; sizes from the real shapes."""
    from quantlab import settings
    from quantlab.fit.build import config_units, plan_fit, resolve_size_of, units_for
    from quantlab.workbench.plan import read_config

    family = fmt.fit_family
    target = resolve_size_of(target, Path(args.out) / args.name / "fit")
    config, label, model_sha = read_config(args.model, cache=args.cache)
    sens = None
    if model_sha is None:  # a config alone: the planner's shapes
        units, arch, fixed = config_units(config, family)
    else:
        from quantlab.fit.sensitivity import Sensitivity, SensitivityConfig, sensitivity_path

        model_ref = _resolve_plain(args)
        units, arch = units_for(model_ref, family), model_ref.folder.arch
        fixed = config_units(config, family)[2]
        _, calibration = _calibration(args, model_ref)
        cache = settings.cache_dir(args.cache)
        path = sensitivity_path(cache, model_sha, calibration.sha256, SensitivityConfig())
        if path.is_file():
            sens = Sensitivity.load(path)
    plan = plan_fit(
        units, family, target, arch=arch, config=config, fixed_bytes=fixed, sensitivity=sens
    )
    print(f"{label}: fit for {fmt.name} ({target.describe()}), dry run")
    for line in plan.summary_lines():
        print("  " + line)
    kinds: dict[str, dict[str, int]] = {}
    by_name = {u.name: u for u in plan.units}
    for name, key in plan.settings().items():
        counts = kinds.setdefault(by_name[name].kind, {})
        counts[key] = counts.get(key, 0) + 1
    print("  per kind of tensor:")
    for kind, counts in kinds.items():
        print(f"    {kind:<12} " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    bits = plan.layer_bits()
    print(
        "  bits/weight per layer: "
        + " ".join(("emb" if layer < 0 else str(layer)) + f":{b:.2f}" for layer, b in bits.items())
    )
    if not plan.measured:
        print(
            "  (no measured sensitivity: every tensor taken as equally sensitive; run "
            "`quantlab sensitivity MODEL` on the weights for a measured fit)"
        )


def _resolve_plain(args):
    from quantlab.models import resolve_model

    return resolve_model(args.model, cache=args.cache)


def device_arg(p: argparse.ArgumentParser, default: str | None = "auto", offload=False) -> None:
    """``--device`` (and ``--offload``) of a command that runs models."""
    from quantlab.devices import DEVICE_CHOICES

    p.add_argument(
        "--device",
        default=default,
        help=f"where to compute: {DEVICE_CHOICES}"
        + (f" (default {default})" if default else " (default: the run config's, else auto)"),
    )
    if offload:
        p.add_argument(
            "--offload",
            action="store_true",
            default=None,
            help="keep the calibration activations between blocks on the CPU (the GPU then holds "
            "the block, its Hessians and the inputs of the block's current layer; automatic when "
            "the activations would take over half of the GPU's free memory)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantlab",
        description="Quantize language models (GPTQ, AWQ, GGUF) and measure every output the "
        "same way.",
    )
    parser.add_argument("--version", action="version", version=f"quantlab {__version__}")
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="cache folder (default: $QUANTLAB_CACHE or ~/.cache/quantlab)",
    )
    parser.add_argument(
        "--data-root", metavar="DIR", help="local datasets folder (default: $QUANTLAB_DATA)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show third-party output (library logs, llama.cpp) on the terminal instead of only "
        "in the command's log file",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "model",
            metavar="MODEL",
            help="named model (see 'quantlab models'), local folder or Hub id",
        )
        p.add_argument(
            "--allow-pickle",
            action="store_true",
            help="accept pickle weights (*.bin); they can run code when loaded",
        )
        p.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="allow model code shipped with the model (auto_map)",
        )
        return p

    sub.add_parser(
        "doctor", help="what is installed, and what each missing piece disables"
    ).set_defaults(func=cmd_doctor)
    sub.add_parser("models", help="list named models and supported architectures").set_defaults(
        func=cmd_models
    )
    p = model_cmd("info", "describe a model: architecture, parameters, layers, dtype, size")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)
    p = model_cmd("generate", "greedy text generation with transformers (a quick sanity check)")
    p.add_argument("prompt", nargs="?", default=DEMO_PROMPT, help=f"default: {DEMO_PROMPT!r}")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.set_defaults(func=cmd_generate)
    sub.add_parser("corpora", help="list corpora and where each would be read from").set_defaults(
        func=cmd_corpora
    )

    def calibration_args(p: argparse.ArgumentParser, n_samples=128, seq_len=2048) -> None:
        p.add_argument("--calib", default="c4", help="corpus name or .txt/.jsonl path (c4)")
        p.add_argument("--split", default=None, help="corpus split (default: the corpus's first)")
        p.add_argument("--n-samples", type=int, default=n_samples)
        p.add_argument("--seq-len", type=int, default=seq_len)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--allow-fallback",
            action="store_true",
            help="use the embedded pydoc corpus if the corpus is unavailable",
        )

    p = model_cmd("calibrate", "draw a calibration set and print its hash (its provenance)")
    calibration_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "eval",
        help="measure a model or GGUF file: perplexity, KLD, accuracy, size, memory, speed",
        description="Measure a model or artifact the same way as every other: same tokens, "
        "named protocols, one JSON record.",
    )
    p.add_argument(
        "target", metavar="MODEL_OR_ARTIFACT", help="model spec, HF folder or .gguf file"
    )
    p.add_argument(
        "--ppl",
        metavar="CORPORA",
        help="perplexity corpora, comma-separated (wikitext2, c4, pydoc, a .txt/.jsonl path)",
    )
    p.add_argument("--split", default=None, help="corpus split (default: test for wikitext2)")
    p.add_argument(
        "--protocol",
        choices=["gptq", "llamacpp", "both"],
        default="gptq",
        help="gptq: non-overlapping seq_len windows; llamacpp: llama-perplexity's "
        "chunks, second half scored",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="seq_len / n_ctx (default 2048 for gptq, 512 for llamacpp)",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    p.add_argument(
        "--kld",
        action="store_true",
        help="KL divergence and top-1 agreement vs the reference, on the first perplexity corpus",
    )
    p.add_argument("--reference", metavar="MODEL", help="reference model (default: the target)")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated (piqa, arc_easy, ...)")
    p.add_argument("--limit", type=int, default=None, help="documents per task")
    p.add_argument("--speed", action="store_true", help="prefill and decode tokens/s")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--gguf-runtime",
        default="llama.cpp",
        choices=["llama.cpp", "torch"],
        help="run a .gguf in llama.cpp, or dequantized into transformers (weight quality only)",
    )
    p.add_argument(
        "--no-kernels",
        action="store_true",
        help="measure the speed of quantized linears through the torch reference "
        "dequantization, not the fastest kernels (quality is always the exact weights')",
    )
    p.add_argument(
        "--allow-fallback",
        action="store_true",
        help="use the embedded pydoc corpus if a corpus is unavailable",
    )
    p.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    device_arg(p)
    p.set_defaults(func=cmd_eval)

    sub.add_parser("app", help="start the web app (quantlab app --help for its options)")
    p = sub.add_parser("run", help="run a sweep from a YAML config: quantize, evaluate, store")
    p.add_argument("config", help="run config (configs/demo.yaml, ...)")
    p.add_argument("--store", help="results database (default: the config's store)")
    p.add_argument("--output", help="artifacts folder (default: the config's output)")
    p.add_argument("--progress-file", help="keep a JSON progress record here (for front ends)")
    device_arg(p, default=None, offload=True)
    p.add_argument(
        "--wait",
        action="store_true",
        help="if the same run is already running on the same store, wait for it (default: stop)",
    )
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: variants one after another here; ray: each variant's quantization and "
        "evaluation as Ray tasks (results still written here)",
    )
    p.add_argument(
        "--address",
        help="Ray cluster to join (auto: the one started on this node with `ray start`; "
        "default: a local Ray instance)",
    )
    p.add_argument("--task-cpus", type=float, help="CPUs each Ray task declares (default 1)")
    p.add_argument("--task-gpus", type=float, help="GPUs each Ray task declares (default 0)")
    p.add_argument(
        "--task-memory", help="memory each Ray task declares, e.g. 8GiB (default: from model size)"
    )
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="write the report of a stored run (markdown, html, plots)")
    p.add_argument("--run", help="run name (default: the latest run)")
    p.add_argument("--store", default="results/quantlab.db", help="results database")
    p.add_argument("--out", help="report folder (default: out/<run>/report)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser(
        "synthetic",
        help="write a random model with a real architecture's shapes (time and memory at scale)",
    )
    p.add_argument("shape", help="llama-3-8b, qwen2.5-7b, ... ('list' lists them)")
    p.add_argument("--out", help="folder to write (default: synthetic-SHAPE)")
    p.add_argument("--layers", type=int, help="write only this many blocks (default: all)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synthetic)

    p = sub.add_parser("verify", help="check an artifact: manifest, checksums, shapes, loading")
    p.add_argument("artifact", help="a checkpoint folder or a .gguf file")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("plan", help="which variants of a model fit in a GPU's memory")
    p.add_argument("model", help="model spec, folder, or a config.json (no weights needed)")
    p.add_argument("--vram", required=True, help="GPU memory, e.g. 24GiB")
    p.add_argument("--context", type=int, default=4096, help="context length in tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--store", default="results/quantlab.db", help="results database")
    p.set_defaults(func=cmd_plan)

    p = model_cmd(
        "sensitivity",
        "measure how much each tensor's quantization moves the output (once per model and "
        "calibration set; every fit reuses it)",
    )
    calibration_args(p, n_samples=32, seq_len=512)
    p.add_argument(
        "--tokens", type=int, default=1024, help="calibration tokens the KLDs are measured on"
    )
    p.add_argument(
        "--swaps", type=int, default=40, help="single-tensor swaps measured to check the model"
    )
    p.add_argument(
        "--families",
        default="ggml,int",
        help="settings to measure the errors of: ggml (llama.cpp's types, needs the model as "
        "GGUF) and/or int (GPTQ/RTN bits at --group-sizes)",
    )
    p.add_argument("--group-sizes", default="32,64,128", help="the int family's group sizes")
    p.add_argument("--json", metavar="PATH", help="also copy the sensitivity file here")
    p.set_defaults(func=cmd_sensitivity)
    p = sub.add_parser(
        "fit",
        help="the best artifact that fits a budget: measured sensitivity, mixed precision, "
        "built, evaluated and stored",
    )
    p.add_argument(
        "model", metavar="MODEL", help="model spec or folder; a config.json with --dry-run"
    )
    p.add_argument(
        "--format", required=True, help="gguf (a type per tensor) or gptq (bits per module)"
    )
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bpw", type=float, help="bits per weight of the quantized tensors")
    budget.add_argument("--size", help="the artifact's size, e.g. 3GiB, 105MiB")
    budget.add_argument("--vram", help="GPU memory, e.g. 8GiB (with --context and --batch)")
    budget.add_argument("--size-of", metavar="ARTIFACT", help="the size of this artifact")
    p.add_argument("--context", type=int, default=4096, help="context length for --vram")
    p.add_argument("--batch", type=int, default=1, help="batch for --vram")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="GPTQ fits: one group size for every module (default: each module's own among "
        "32, 64, 128)",
    )
    p.add_argument(
        "--exclude",
        default="",
        help="settings the fit may not choose, comma-separated (Q4_1,Q5_1 or w2g128)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the allocation it would build (sizes from the shapes; a config.json is enough)",
    )
    calibration_args(p, n_samples=32, seq_len=512)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=8192,
        help="WikiText-2 test tokens the fitted artifact is evaluated on (perplexity, KLD)",
    )
    p.add_argument("--name", default="fit", help="run name in the results store (fit)")
    device_arg(p)
    p.add_argument("--out", default="out", help="output folder: <out>/<name>/<variant>")
    p.add_argument("--store", default="results/quantlab.db", help="results database")
    p.set_defaults(func=cmd_fit)
    p = model_cmd("convert", "convert a model to GGUF with llama.cpp's own converter")
    p.add_argument("--to", choices=["gguf"], default="gguf", help="target format (gguf)")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument(
        "--llama-cpp",
        metavar="PATH",
        help="llama.cpp checkout or llama-cpp-python sdist holding convert_hf_to_gguf.py "
        "(default: taken from the installed llama-cpp-python's sdist, cached)",
    )
    p.set_defaults(func=cmd_convert)

    from quantlab.formats import formats
    from quantlab.methods import get_method, method_names

    methods = ", ".join(f"{m} ({get_method(m).description})" for m in method_names())
    p = model_cmd("quantize", "quantize a model and write one artifact in one format")
    p.add_argument("--method", choices=method_names(), help=f"the method: {methods}")
    writable = [f for f in formats() if f.writable]
    p.add_argument(
        "--format",
        choices=[f.name for f in writable],
        help="what to write (default: native with a method): "
        + "; ".join(f"{f.name}: {f.description}" for f in writable),
    )
    calibration_args(p)
    p.add_argument(
        "--calib-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of the calibration forward passes (weights are solved in fp32)",
    )
    p.add_argument(
        "--imatrix",
        action="store_true",
        help="measure the importance matrix on the calibration set (recorded in the artifact; "
        "a format that quantizes by itself, GGUF, is fed it)",
    )
    p.add_argument(
        "--streaming",
        action="store_true",
        help="never load the whole model: read, quantize and write one block at a time from the "
        "safetensors shards (for models larger than memory; formats written block by block)",
    )
    p.add_argument(
        "--rotate",
        action="store_true",
        help="quantize the model after a Hadamard rotation fused into its weights (same function, "
        "outliers spread; the rotated copy is cached; a tied embedding gets untied)",
    )
    p.add_argument("--out", required=True, help="artifact to write (a folder, or a .gguf file)")
    device_arg(p, offload=True)
    settings = p.add_argument_group("method and format settings (each flag: who has it)")
    p.set_defaults(setting_flags=_add_setting_flags(settings))
    p.set_defaults(func=cmd_quantize)
    return parser


FIRST_STEPS = """quantlab: quantize a language model (GPTQ, AWQ, GGUF), measure every output alike.

The five commands to start with:

  quantlab doctor                         what is installed, and what each missing piece disables
  quantlab run configs/demo.yaml          the demo: the default model through every path, evaluated
  quantlab quantize smollm2-135m --method gptq --bits 4 --format gptq --out my-gptq
  quantlab eval my-gptq --ppl wikitext2 --kld --reference smollm2-135m
  quantlab plan smollm2-135m --vram 8GiB --context 8192

More: quantlab --help, quantlab COMMAND --help, README.md and docs/."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(FIRST_STEPS)
        return 0
    if argv[:1] == ["app"]:  # the Gradio app has its own options (quantlab app --help)
        from quantlab.webapp import main as app_main

        return app_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except QuantlabError as exc:
        print(f"quantlab: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
