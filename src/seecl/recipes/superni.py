"""`seecl bench superni`: every method through the protocol on SuperNI tasks; summary, report, plots.

A recipe that reads top to bottom: load the tasks of the chosen order (the first `n_train`
training and `n_eval` eval instances of each), the OOD queries, build one method per label, run
each through the protocol (resumable per stage: rerunning the same command continues where it
stopped; trained adapters are shared through `OUT/cache`), and write OUT/summary.json,
OUT/report.md and the plots after every method. A rerun resumes only what was computed with the
same data and settings: each method's directory records its settings (`settings.json`), and a
summary row computed on other data or with other settings leaves the table.

The OOD file serves two purposes and is split so that no expert is trained on an OOD query that
RB-Acc is measured on: the first `n_ood` queries are the OOD test set; general negatives and
pseudo-negatives are drawn only from the second half of the file.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from seecl.cache import AdapterCache, cache_key
from seecl.config import RunConfig, doc, from_dict, merge_overrides, to_dict
from seecl.data.formats import load_instances, load_task, require_labels
from seecl.data.prompts import PromptFormatter
from seecl.data.task import Task, check_name
from seecl.errors import ConfigError, DataError, SeeclError
from seecl.evaluation.protocol import EvalSet, Protocol
from seecl.evaluation.report import write_report
from seecl.methods.base import MethodContext, free_memory
from seecl.methods.registry import build_method
from seecl.publish import held, write_json_atomic
from seecl.typed_config import flatten

# kind and target language of the ten SuperNI tasks in ../shared/data/superni
SUPERNI_TASKS = {
    "qa": ("generation", "en"),
    "qg": ("generation", "en"),
    "sa": ("classification", "en"),
    "sum": ("generation", "en"),
    "trans": ("generation", "es"),
    "dsg": ("generation", "en"),
    "expl": ("generation", "en"),
    "para": ("generation", "en"),
    "pe": ("generation", "en"),
    "pos": ("classification", "en"),
}
ORDERS = {
    1: ["qa", "qg", "sa", "sum", "trans"],
    2: ["trans", "sa", "qa", "sum", "qg"],
    3: ["sum", "qg", "trans", "qa", "sa"],
}
DEFAULT_METHODS = ["MTL", "AvgSTL", "Non-rehearsal", "RandSel(10%)", "KMeansSel(10%)", "SSR", "SEE(1%)", "SEE(10%)"]
# Shared by every method in the comparison. The template's default system message would add ~20
# tokens to every example and query; it carries no task information. The run config records the
# paper's SEE recipe (no general negatives, greedy indicators); SEE labels pin it themselves.
BENCH_OVERRIDES = ["model.system_prompt=", "train.progress=true", "see.general_negatives=0", "see.calibrate=false"]
# Settings that change how fast or where a run goes, never its numbers: a rerun may change them and
# keep everything it computed. Every other setting is part of what a row was computed with.
SPEED_SETTINGS = (
    "train.checkpoint_every",
    "train.progress",
    "model.device",
    "generate.batch_size",
    "generate.engine",
    "generate.prefix_cache_tokens",
    "generate.prefix_block",
    "generate.prefill_tokens",
    "generate.check_group",
)


@dataclass
class BenchConfig:
    data_dir: str = doc("Folder with <task>.train.jsonl and <task>.<eval_split>.jsonl.", "../shared/data/superni")
    eval_split: str = doc("Eval file infix: <task>.<eval_split>.jsonl.", "dev")
    ood_file: str = doc("OOD queries (any supported format).", "../shared/data/ood/lima.dev.jsonl")
    order: list[str] = doc("Task order: task names, or 1, 2 or 3 (the orders of the SEE paper).", ORDERS[1])
    methods: list[str] = doc("Method labels (see methods/registry.py).", DEFAULT_METHODS)
    n_train: int = doc("Training instances per task.", 100)
    n_eval: int = doc("Eval instances per task.", 50)
    n_ood: int = doc("OOD test queries (the first of the OOD file).", 100)
    general_negatives: int = doc("General negatives per expert for SEE(x%)-general.", 10)
    full_matrix: bool = doc("Score every seen task after every stage (default: diagonal + final row).", False)
    out: str = doc("Output directory.", "results/superni-mini")
    reuse_experts: list[str] = doc(
        "Earlier output directories whose trained adapters may be reused, and their scores where a "
        "method ran with the same settings on the same data (e.g. the first stages of a longer order).",
        [],
    )
    run: dict = field(default_factory=dict, metadata={"doc": "RunConfig overrides (dotted keys) for all methods."})

    def __post_init__(self):
        from seecl.methods.registry import parse_label

        if len(self.order) == 1 and self.order[0] in {str(k) for k in ORDERS}:
            self.order = list(ORDERS[int(self.order[0])])
        elif len(self.order) == 1 and self.order[0].isdigit():
            raise ConfigError(f"order {self.order[0]} is not one of the SEE paper's orders 1, 2, 3 (or name the tasks)")
        check_name(self.eval_split, "eval split")  # it becomes part of a file name
        for name in ("n_train", "n_eval", "n_ood"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.order:
            raise ConfigError("order names no task: give 1, 2 or 3 (the SEE paper's orders) or task names")
        if len(set(self.order)) != len(self.order):
            raise ConfigError(f"order must name distinct tasks, got {self.order}")
        for name in self.order:  # names become file, directory and expert names
            check_name(name, "task")
        if not self.methods:
            raise ConfigError("methods names no method: give one or more labels, e.g. SEE(10%),MTL")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must be distinct labels, got {self.methods}")
        for label in self.methods:
            parse_label(label)
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"out: {self.out} exists and is not a directory")
        for earlier in self.reuse_experts:  # a mistyped directory would silently reuse nothing
            if not (Path(earlier) / "cache").is_dir() and not (Path(earlier) / "methods").is_dir():
                raise ConfigError(
                    f"reuse_experts: {earlier} is not a `seecl bench` output directory (no cache/ or methods/)"
                )


def check_task_files(cfg: BenchConfig) -> None:
    """Every task of the order has both files and the OOD file exists, said before any is read: a run
    started from another folder, or a task name mistyped, is one error naming the folder and the
    tasks it holds."""
    data = Path(cfg.data_dir)
    if not data.is_dir():
        where = "" if data.is_absolute() else f" (relative to {Path.cwd()})"
        raise DataError(f"no such folder{where}; --data-dir names the folder of the task files", data)
    held_tasks = sorted(p.name.removesuffix(".train.jsonl") for p in data.glob("*.train.jsonl"))
    for name in cfg.order:
        for split in ("train", cfg.eval_split):
            if not (data / f"{name}.{split}.jsonl").is_file():
                raise DataError(
                    f"task {name!r} has no {name}.{split}.jsonl here; tasks with training files: "
                    f"{', '.join(held_tasks) or 'none'}",
                    data,
                )
    if not Path(cfg.ood_file).exists():
        raise DataError("OOD file not found; --ood-file names it", cfg.ood_file)


def load_benchmark(cfg: BenchConfig, formatter: PromptFormatter) -> tuple[list[Task], dict[str, EvalSet]]:
    check_task_files(cfg)
    data = Path(cfg.data_dir)
    tasks, evals = [], {}
    for name in cfg.order:
        kind, language = SUPERNI_TASKS.get(name, ("generation", "en"))
        train = load_task(data / f"{name}.train.jsonl", name=name, limit=cfg.n_train)
        test = load_task(data / f"{name}.{cfg.eval_split}.jsonl", name=name, limit=cfg.n_eval)
        for subset, wanted, what in ((train, cfg.n_train, "n_train"), (test, cfg.n_eval, "n_eval")):
            if len(subset) < wanted:  # the report would state sizes the run did not use
                raise DataError(f"holds {len(subset)} instances; {what}={wanted} asks for more", subset.source)
        if kind == "classification":  # a one-label subset would score nothing but that label
            require_labels(train, train.source)
            require_labels(test, test.source)
        budget = formatter.answer_budget([r for inst in train.instances for r in inst.references])
        tasks.append(train)
        evals[name] = EvalSet(test, budget, language, kind == "classification")
    return tasks, evals


def changed_settings(cfg: BenchConfig, run_config: RunConfig) -> str:
    """The run settings this benchmark changed for every method, as resolved (a rerun's report says
    which regime its numbers come from); resuming and progress settings change no result."""
    resolved = flatten(to_dict(run_config))
    changed = [f"{key}={resolved[key]}" for key in sorted(flatten(cfg.run)) if key not in SPEED_SETTINGS]
    return f" Changed for every method: {', '.join(changed)}." if changed else ""


def load_ood(cfg: BenchConfig) -> tuple[list[str], Task]:
    instances = load_instances(cfg.ood_file, responses=False)  # queries: routed, or declined by experts
    half = len(instances) // 2
    if cfg.n_ood > half:
        raise DataError(f"n_ood={cfg.n_ood} exceeds the first half of the OOD file ({half} queries)", cfg.ood_file)
    general = Task("general", tuple(instances[half:]), source=f"{cfg.ood_file}[{half}:]")
    return [i.query for i in instances[: cfg.n_ood]], general


def run_benchmark(cfg: BenchConfig, log=print) -> dict:
    """Run `cfg` into `cfg.out`, which one run at a time holds: two runs into the same directory
    would each rewrite summary.json from their own copy and drop the other's rows."""
    check_task_files(cfg)  # before the output folder exists: a mistyped run leaves nothing behind
    with held(Path(cfg.out) / ".bench.lock", f"seecl bench superni --methods {','.join(cfg.methods)}", SeeclError):
        return _run(cfg, log)


def _run(cfg: BenchConfig, log=print) -> dict:
    from seecl.model.base import load_tokenizer

    out = Path(cfg.out)
    run_config = from_dict(
        RunConfig,
        merge_overrides(
            to_dict(RunConfig()), BENCH_OVERRIDES + [f"{k}={json.dumps(v)}" for k, v in flatten(cfg.run).items()]
        ),
    )
    formatter = PromptFormatter(load_tokenizer(run_config.model), None, run_config.model.system_prompt)
    tasks, evals = load_benchmark(cfg, formatter)
    ood, general = load_ood(cfg)
    cache = AdapterCache(out / "cache", [Path(p) / "cache" for p in cfg.reuse_experts])
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"methods": {}}
    fingerprint = benchmark_fingerprint(tasks, evals, ood)
    settings = result_settings(cfg, run_config, general)
    settings_digest = cache_key(settings=settings)  # what a summary row records of them
    drop_stale_rows(summary, fingerprint, settings_digest, summary_path, log)
    summary["config"] = {
        **to_dict(cfg),
        "run_config": to_dict(run_config),
        "ood_split": {"test": f"first {cfg.n_ood} queries of {cfg.ood_file}", "general_negatives_pool": general.source},
    }
    summary["description"] = (
        f"Order {' -> '.join(cfg.order)}; {cfg.n_train} training and {cfg.n_eval} {cfg.eval_split} instances per "
        f"task; {cfg.n_ood} OOD queries ({cfg.ood_file}); base model {run_config.model.name}; "
        f"ROUGE-L x100 (Unicode tokenizer for trans); routing metrics on 0-1." + changed_settings(cfg, run_config)
    )
    log(f"seecl bench superni: {len(cfg.methods)} methods x {len(tasks)} tasks -> {out}/")
    total = time.perf_counter()
    for label in cfg.methods:
        started = time.perf_counter()
        workdir = out / "methods" / method_dirname(label)
        claim_workdir(workdir, {"label": label, **settings}, log)
        reusable = reusable_workdirs(cfg.reuse_experts, label, settings)
        ctx = MethodContext(
            run_config,
            workdir,
            cache,
            general,
            general_negatives=cfg.general_negatives,
        )
        method = build_method(label, ctx)
        log(f"== {label}")
        ood_queries = ood if method.routed else ()
        progress = run_config.train.progress  # the benchmark's bars: training steps and scoring alike
        protocol = Protocol(method, tasks, evals, workdir, ood_queries, cfg.full_matrix, log, progress, reusable)
        result = protocol.run()
        method.close()
        del method
        free_memory()
        summary["methods"][label] = {**result, "benchmark": fingerprint, "settings": settings_digest}
        write_json_atomic(summary_path, summary)
        write_report(summary, out)
        log(
            f"== {label}: AR {result['AR']:.2f}, BWT {_rounded(result['BWT'])}, "
            f"{(time.perf_counter() - started) / 60:.1f} min this session "
            f"({sum(result['seconds'].values()) / 60:.1f} min in all)"
        )
    log(f"total {(time.perf_counter() - total) / 60:.1f} min; {summary_path}")
    return summary


def drop_stale_rows(summary: dict, fingerprint: str, settings_digest: str, where: Path, log=print) -> None:
    """A row computed on other data (files changed, another --n-train) or with other settings is
    not this run's: it leaves the summary and the report; its label, run again, recomputes only
    what changed. Rows from before settings were recorded carry none and stay."""
    rows = summary["methods"]
    for reason, stale in (
        ("computed on other data", [k for k, row in rows.items() if row.get("benchmark") != fingerprint]),
        (
            "computed with other settings",
            [k for k, row in rows.items() if row.get("settings", settings_digest) != settings_digest],
        ),
    ):
        if stale:
            log(f"dropped from {where} ({reason}; run them again): {', '.join(stale)}")
            rows = {k: v for k, v in rows.items() if k not in stale}
    summary["methods"] = rows


def reusable_workdirs(earlier_runs: list[str], label: str, settings: dict) -> list[Path]:
    """The directories of `label` in earlier runs whose scores this run may copy: those that
    recorded exactly these settings."""
    candidates = (Path(run) / "methods" / method_dirname(label) for run in earlier_runs)
    return [d for d in candidates if read_settings(d / "settings.json") == {"label": label, **settings}]


def benchmark_fingerprint(tasks: list[Task], evals: dict[str, EvalSet], ood: list[str]) -> str:
    """The data a summary row was computed on: training and eval instances, answer budgets, OOD
    queries (what the protocol's own cell fingerprints cover, for the whole table)."""
    parts = [
        [[t.name, t.fingerprint()] for t in tasks],
        [[name, e.task.fingerprint(), e.budget] for name, e in sorted(evals.items())],
        list(ood),
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def result_settings(cfg: BenchConfig, run_config: RunConfig, general: Task) -> dict:
    """Every setting a row's numbers depend on beyond the data `benchmark_fingerprint` covers: the
    resolved run config without `SPEED_SETTINGS`, and the general instructions SEE(x%)-general
    draws its negatives from."""
    resolved = {k: v for k, v in flatten(to_dict(run_config)).items() if k not in SPEED_SETTINGS}
    settings = {
        **resolved,
        "bench.general_negatives": cfg.general_negatives,
        "bench.general_pool": general.fingerprint(),
    }
    return json.loads(json.dumps(settings, default=str))  # as settings.json reads back (tuples as lists)


def claim_workdir(workdir: Path, settings: dict, log=print) -> None:
    """Make `workdir` a method's state for `settings` (written to its settings.json). State computed
    with other settings (a rerun into the same OUT with, say, another `adapter.r`) is never resumed
    or reported as this run's: it is moved aside, whole, to `<workdir>.replaced-<time>`, and the
    method runs again (what the adapter cache holds for these settings is still reused). A
    directory from before settings were recorded is taken as computed with these settings."""
    path = workdir / "settings.json"
    if path.is_file():
        stored = read_settings(path)
        if stored != settings:
            changes = [
                f"{key}: {stored.get(key)!r} -> {settings.get(key)!r}"
                for key in sorted(set(stored) | set(settings))
                if stored.get(key) != settings.get(key)
            ]
            aside = move_aside(workdir)
            log(
                f"  {settings.get('label')}: {workdir} was computed with other settings ({'; '.join(changes)}); "
                f"moved it to {aside} and computing it again"
            )
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)


def move_aside(workdir: Path) -> Path:
    """Rename `workdir` to a fresh `<workdir>.replaced-<time>[-n]` and return it. Two replacements
    within one second (two quick reruns) get two directories; neither overwrites the other."""
    stamp = f"{workdir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = workdir.with_name(stamp), 1
    while True:
        if not aside.exists():
            try:
                workdir.rename(aside)
                return aside
            except OSError:  # another process took the name first
                if not aside.exists():
                    raise
        n += 1
        aside = workdir.with_name(f"{stamp}-{n}")


def read_settings(path: Path) -> dict:
    """A method directory's recorded settings; an unreadable file (edited by hand, other bytes)
    records none, so that state counts as computed with other settings."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def method_dirname(label: str) -> str:
    """Directory name of a method label inside `OUT/methods` (e.g. `SEE(10%)-aLoRA` -> `SEE_10__-aLoRA`)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label).strip("_")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
