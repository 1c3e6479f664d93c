"""The `seecl` command line: demo, learn, ask, info, bench, orders, serve, export-base, config.

Each command parses its arguments, builds a config (defaults <- --preset <- --config YAML <-
`section.field=value` overrides) and calls library code. Errors seecl raises on purpose are
printed as one line without a traceback (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from seecl import options
from seecl.config import ServerConfig, VllmConfig
from seecl.errors import SeeclError
from seecl.options import add_options


def _add_config_args(parser: argparse.ArgumentParser, preset: bool = True, positional: bool = True) -> None:
    """--config FILE, --preset, and `section.field=value` overrides (as arguments, or with --set)."""
    parser.add_argument("--config", help="YAML file with config sections (see `seecl config`)")
    if preset:
        parser.add_argument("--preset", choices=["small", "paper"], help="named hyper-parameter set")
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="section.field=value",
        help="config override, e.g. --set see.threshold=0.7 (see `seecl config` for every field)",
    )
    if positional:
        parser.add_argument(
            "overrides",
            nargs="*",
            metavar="section.field=value",
            help="config overrides, e.g. train.lr=1e-3 adapter.r=16",
        )


def _config_sections(path: str | None) -> tuple[list[str], dict, dict]:
    """A --config file's run-config sections as overrides, and its `server:` and `vllm:` sections."""
    if path is None:
        return [], {}, {}
    from seecl.typed_config import flatten, read_yaml

    data = read_yaml(path)
    server, vllm = data.pop("server", None) or {}, data.pop("vllm", None) or {}
    return [f"{k}={json.dumps(v)}" for k, v in flatten(data).items()], server, vllm


def cmd_demo(args: argparse.Namespace) -> int:
    from seecl.recipes.demo import DEMO_TASKS, run_demo

    tasks = tuple(args.tasks.split(",")) if args.tasks else DEMO_TASKS
    run_demo(args.out, tasks, args.n_train, args.n_eval, _config_sections(args.config)[0] + args.overrides)
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    from seecl.data.formats import load_task
    from seecl.data.task import check_name
    from seecl.see.ensemble import SeeEnsemble
    from seecl.see.store import validate_expert_name

    # Names become paths inside the ensemble: checked before any data or model is loaded.
    if args.task is not None:
        check_name(args.task, "task")
    if args.name is not None:
        validate_expert_name(args.name)
    overrides = ([f"see.tau={args.tau}"] if args.tau is not None else []) + list(args.overrides)
    ensemble = SeeEnsemble.open(args.ensemble, overrides, args.config, args.preset)
    task = load_task(args.data, name=args.task, split=args.split, limit=args.limit, sample=args.sample)
    record = ensemble.learn(task, name=args.name)
    metrics = record["metrics"]
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(
            f"expert {args.name or task.name!r} added to {args.ensemble} ({len(ensemble.experts())} "
            f"experts): {record['n_positives']} positives, {sum(record['n_negatives'].values())} "
            f"negatives, final loss {metrics['final_loss']:.4f}, {metrics['seconds']:.0f} s"
        )
    return 0


def _stdin_queries() -> list[str]:
    """One query per non-empty line of standard input, which must be UTF-8."""
    queries = []
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise SeeclError(f"<stdin>:{number}: not UTF-8 (byte {exc.start + 1} of the line)") from None
        if line.strip():
            queries.append(line)
    return queries


def _read_queries(args: argparse.Namespace) -> list[str]:
    queries = list(args.query)
    if args.file:
        from seecl.data.formats import load_instances

        queries += [inst.query for inst in load_instances(args.file, responses=False)]
    if not queries and not sys.stdin.isatty():
        queries = _stdin_queries()
    if not queries:
        raise SeeclError("no query given: pass it as an argument, with --file, or on stdin")
    for number, query in enumerate(queries, start=1):
        if not query.strip():
            raise SeeclError(f"query {number} is empty")
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:  # an argument with bytes that are not UTF-8
            raise SeeclError(f"query {number} is not valid UTF-8") from None
    return queries


VLLM_PREFIX = "vllm."


def _split_overrides(args: argparse.Namespace) -> tuple[list[str], list[str], dict]:
    """Run-config overrides (the --config file's, then the command line's, then --device), `vllm.*`
    overrides (the VllmConfig's, prefix removed) and the --config file's `vllm:` section."""
    file_run, _, file_vllm = _config_sections(getattr(args, "config", None))
    run = file_run + [o for o in args.overrides if not o.startswith(VLLM_PREFIX)]
    vllm = [o[len(VLLM_PREFIX) :] for o in args.overrides if o.startswith(VLLM_PREFIX)]
    vllm += options.overrides(args, VLLM_PREFIX)
    if getattr(args, "backend", "peft") != "vllm" and (vllm or file_vllm):
        name = vllm[0].split("=")[0] if vllm else next(iter(file_vllm))
        raise SeeclError(f"{name!r}: vllm.* settings need --backend vllm")
    return run + ([f"model.device={args.device}"] if getattr(args, "device", None) else []), vllm, file_vllm


def _open_ensemble(args: argparse.Namespace):
    """The ensemble and, with --backend vllm, the vLLM engine over it (base exported if needed)."""
    from seecl.see.ensemble import SeeEnsemble
    from seecl.see.store import EnsembleStore

    if not EnsembleStore(args.ensemble).exists():
        raise SeeclError(f"no ensemble at {args.ensemble}; create one with `seecl learn`")
    overrides, vllm_overrides, file_vllm = _split_overrides(args)
    if args.backend != "vllm":
        return SeeEnsemble.open(args.ensemble, overrides), None
    if args.routers:
        raise SeeclError("--routers needs --backend peft: vLLM cannot serve the activated-LoRA experts routers are")
    from seecl.config import VllmConfig, load_config
    from seecl.serving.vllm_engine import VllmEngine
    from seecl.serving.vllm_llm import require_vllm

    config = load_config(VllmConfig, overrides=vllm_overrides, defaults=file_vllm)
    require_vllm()  # before anything slow
    ensemble = SeeEnsemble.open(args.ensemble, overrides)
    return ensemble, VllmEngine(ensemble.store.root, threshold=ensemble.thresholds(), config=config)


def cmd_ask(args: argparse.Namespace) -> int:
    from seecl.serving.routed_by import RoutedBy

    ensemble, engine = _open_ensemble(args)
    routers = _open_routers(args)
    budget = ensemble.config.generate.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    backend = engine or (ensemble if routers is None else RoutedBy(routers, ensemble))
    try:
        answers = backend.ask(_read_queries(args), budget)
    finally:
        if engine is not None:
            engine.close()
    for answer in answers:
        if args.json:
            print(json.dumps(answer.to_dict(), ensure_ascii=False))
            continue
        print(f"[{answer.route.answered_by} | {answer.route.reason}] {answer.text}")
        checks = ", ".join(f"{c.expert}:{c.verdict} (p_pos={c.p_pos:.2f})" for c in answer.route.checks)
        if checks:
            print(f"    route: {checks}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from seecl.see.store import EnsembleStore

    store = EnsembleStore(args.ensemble)
    manifest = store.manifest()
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(
        f"ensemble {store.root}: base {manifest['model']['name']}, indicators "
        f"{manifest['indicators']['pos']}/{manifest['indicators']['neg']}"
    )
    for number, expert in enumerate(manifest["experts"], start=1):
        negatives = sum(expert.get("n_negatives", {}).values())
        print(
            f"  {number}. {expert['name']:<16} task={expert['task']:<16} positives={expert['n_positives']:<5} "
            f"negatives={negatives:<5} tau={expert['tau']} loss={expert['metrics']['final_loss']:.4f}"
        )
    return 0


def cmd_export_base(args: argparse.Namespace) -> int:
    from seecl.serving.vllm_export import export_base

    out = export_base(args.ensemble, args.out, args.dtype)
    print(f"exported the base of {args.ensemble} to {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from seecl.config import PRESETS, ServerConfig, VllmConfig, describe

    if args.preset:
        print(f"preset {args.preset!r} overrides: {PRESETS[args.preset] or 'none (the defaults)'}")
    for name, default, text in describe() + describe(ServerConfig, "server.") + describe(VllmConfig, VLLM_PREFIX):
        print(f"{name:<34} {default:<28} {text}")
    return 0


def _add_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=["peft", "vllm"],
        default="peft",
        help="peft: seecl's engine (generate.engine); vllm: vLLM, set up with --set vllm.FIELD=VALUE (docs/vllm.md)",
    )
    parser.add_argument(
        "--routers",
        metavar="ENSEMBLE",
        help="route with this ensemble's experts (aLoRA experts of the same tasks) and answer with --ensemble's",
    )


def _open_routers(args: argparse.Namespace):
    """The --routers ensemble (opened with the same overrides), or None."""
    from seecl.see.ensemble import SeeEnsemble
    from seecl.see.store import EnsembleStore

    if not args.routers:
        return None
    if not EnsembleStore(args.routers).exists():
        raise SeeclError(f"no ensemble at {args.routers} (--routers); create one with `seecl learn`")
    return SeeEnsemble.open(args.routers, _split_overrides(args)[0])


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses

    from seecl.config import load_config, parse_override
    from seecl.recipes.superni import BenchConfig, run_benchmark

    cfg = load_config(BenchConfig, args.config, overrides=options.overrides(args))
    run = dict(cfg.run)  # `section.field=value` arguments: the run config shared by every method
    for item in args.overrides:
        path, value = parse_override(item)
        run[".".join(path)] = value
    run_benchmark(dataclasses.replace(cfg, run=run))
    return 0


def cmd_orders(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seecl.evaluation.orders import across_orders, load_run, orders_markdown
    from seecl.publish import make_dir, write_json_atomic

    result = across_orders([load_run(run) for run in args.runs])
    table = orders_markdown(result)
    if args.out:
        out = Path(args.out)
        make_dir(out, SeeclError)
        write_json_atomic(out / "summary.json", result)
        (out / "report.md").write_text("# SuperNI benchmark over task orders\n\n" + table, encoding="utf-8")
    print(json.dumps(result, indent=2) if args.json else table.rstrip("\n"))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seecl.config import ServerConfig, load_config
    from seecl.serving.routing import as_query
    from seecl.serving.server import create_app, ensemble_app, serve

    # `server.*` settings are the server's own (never stored with the ensemble); the rest configure it.
    served = [o.split("=", 1)[0].startswith("server.") for o in args.overrides]
    server_overrides = [o.split(".", 1)[1] for o, mine in zip(args.overrides, served) if mine]
    server_overrides += options.overrides(args, "server.")
    args.overrides = [o for o, mine in zip(args.overrides, served) if not mine]
    key = os.environ.get("SEECL_API_KEY")
    if key and not any(o.startswith("api_key=") for o in server_overrides):
        server_overrides.append(f"api_key={key}")
    server = load_config(ServerConfig, overrides=server_overrides, defaults=_config_sections(args.config)[1])
    ensemble, engine = _open_ensemble(args)
    if engine is None:
        # loads the base and every expert (of both ensembles, with --routers) before serving
        app = ensemble_app(ensemble, server, bind=args.host, router=_open_routers(args))
    else:
        app = create_app(
            engine,
            Path(ensemble.store.root).resolve().name,
            _vllm_server_config(server, ensemble, args.host),
            lambda query: len(engine.formatter.chat_ids(as_query(query).turns())),
            lambda token: engine.formatter.tokenizer.decode([token]),
        )
    print(
        f"serving ensemble {args.ensemble} ({len(ensemble.experts())} experts, {args.backend}) "
        f"at http://{args.host}:{args.port}/v1" + (" (API key required)" if server.api_key else ""),
        flush=True,
    )
    if engine is not None:
        import signal

        # uvicorn shuts down gracefully on SIGTERM, then raises it again; its default action would
        # end this process before the vLLM engine processes are stopped, and they would outlive it.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(app, args.host, args.port)
    finally:
        if engine is not None:
            engine.close()
    return 0


def _vllm_server_config(server, ensemble, bind: str):
    """The server settings ensemble_app derives for the PEFT backend, for the vLLM one."""
    import dataclasses

    from seecl.serving.security import default_hosts

    default = server.default_max_tokens or min(ensemble.config.generate.max_new_tokens, server.max_tokens)
    hosts = list(server.allowed_hosts) or default_hosts(bind)
    return dataclasses.replace(server, default_max_tokens=default, allowed_hosts=hosts)


def _budget(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 routes without answering), got {value}")
    return value


class _PrintVersions(argparse.Action):
    """`--version`, looked up only when asked for."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from seecl.versions import versions

        print(versions())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seecl", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--version", action=_PrintVersions, help="print the versions of seecl, torch, transformers, peft, vllm"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="learn synthetic tasks on the default model and report routing")
    p.add_argument("--out", default="seecl-demo", help="output directory (resumes if it exists)")
    p.add_argument("--tasks", help="comma-separated synthetic tasks (default: all five)")
    p.add_argument("--n-train", type=int, default=48, help="training instances per task")
    p.add_argument("--n-eval", type=int, default=16, help="eval queries per task")
    _add_config_args(p, preset=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("learn", help="append one expert for a new task to an ensemble")
    p.add_argument("--ensemble", required=True, help="ensemble directory (created if missing)")
    p.add_argument("--task", help="task name (default: from the data file name)")
    p.add_argument(
        "--data",
        required=True,
        help="JSONL (SSR, prompt/response or prompt/completion, chat messages, Alpaca), a SuperNI task "
        "JSON or a JSON list of records, a TRACE folder, or synthetic:<task> (docs/training.md)",
    )
    p.add_argument("--split", default="train", help="split for TRACE folders (train/eval/test)")
    p.add_argument("--limit", type=int, help="use only the first N instances")
    p.add_argument(
        "--sample", type=int, help="use a seeded sample of N instances, stratified by label for classification data"
    )
    p.add_argument("--tau", type=float, help="rehearsal ratio (shortcut for see.tau=...)")
    p.add_argument("--name", help="expert name (default: the task name)")
    _add_config_args(p)
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("ask", help="answer queries through sequential routing")
    p.add_argument("--ensemble", required=True)
    p.add_argument("query", nargs="*", default=[], help="queries (or --file, or stdin)")
    p.add_argument("--file", help="read queries from a data file in any format `learn --data` reads")
    p.add_argument(
        "--max-new-tokens", type=_budget, default=None, help="answer budget in tokens (0: only route the queries)"
    )
    p.add_argument("--device", help="cpu, cuda, auto")
    p.add_argument("--json", action="store_true", help="one JSON object per answer")
    _add_backend_args(p)
    _add_config_args(p, preset=False, positional=False)  # positional arguments are the queries
    add_options(p, VllmConfig, "vllm.", skip=("llm_args",), flag_prefix="vllm-")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("info", help="list an ensemble's experts")
    p.add_argument("--ensemble", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    from seecl.recipes.superni import BenchConfig

    p = sub.add_parser("bench", help="run a benchmark (superni: every method through the protocol)")
    p.add_argument("suite", choices=["superni"])
    add_options(p, BenchConfig, skip=("run",))
    _add_config_args(p, preset=False)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("orders", help="AR and BWT of benchmark runs in different task orders, and their mean")
    p.add_argument("runs", nargs="+", metavar="RUN", help="`seecl bench superni --out` directories, one per order")
    p.add_argument("--out", help="also write DIR/summary.json and DIR/report.md")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.set_defaults(func=cmd_orders)

    p = sub.add_parser("serve", help="serve an ensemble over an OpenAI-compatible HTTP API")
    p.add_argument("--ensemble", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="cpu, cuda, auto")
    _add_backend_args(p)
    _add_config_args(p, preset=False)
    add_options(p, ServerConfig, "server.")
    add_options(p, VllmConfig, "vllm.", skip=("llm_args",), flag_prefix="vllm-")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export-base", help="write the ensemble's base as a model directory vLLM loads")
    p.add_argument("--ensemble", required=True)
    p.add_argument("--out", help="new directory (default: ENSEMBLE/vllm-base, where --backend vllm looks)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(func=cmd_export_base)

    p = sub.add_parser("config", help="print every config field with its default and meaning")
    p.add_argument("--preset", choices=["small", "paper"])
    p.set_defaults(func=cmd_config)
    return parser


_python_format_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """seecl's own warnings (about the user's data) read as one line, like its errors; others keep
    Python's form, which points at the code that raised them."""
    if category.__module__.startswith("seecl."):
        return f"seecl: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    # PEFT calls a transformers method that transformers 5 deprecated; nothing for users to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.formatwarning = _format_warning
    parser = build_parser()
    # Overrides may follow options (`bench superni --out X train.lr=1e-3`); argparse would have
    # bound the positional list already, so collect the trailing `key=value` items here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "set_overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "set_overrides"):  # `--set a.b=v` and `a.b=v` arguments alike, in the order given
        args.overrides = list(args.set_overrides) + list(getattr(args, "overrides", [])) + extra
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here rather than at interpreter exit
        return code
    except SeeclError as exc:
        print(f"seecl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seecl: interrupted; finished stages are kept and a rerun resumes", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`seecl info | head`): no traceback, and nothing more to write at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a tool killed by the signal


if __name__ == "__main__":
    sys.exit(main())
