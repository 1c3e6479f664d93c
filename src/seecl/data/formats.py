"""Readers for the task formats seecl accepts (docs/design.md §4), with errors that name file and line.

- SSR-style JSONL: one object per line with `full_prompt`, `output`, `id` (`task_name` optional).
- Official SuperNI task JSON: `Definition` (list), `Instances` with `input` and `output` (list);
  the query is Definition + "\\n\\n" + input.
- TRACE folder: `train.json` / `eval.json` / `test.json`, each a list of `{prompt, answer}`.
- Plain JSONL with `prompt` and `response` (optional `id`).
The format is detected from the path and the first record; `load_task` returns a validated Task.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from seecl.data.task import Instance, Task
from seecl.errors import DataError

TRACE_SPLITS = ("train", "eval", "test")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"not UTF-8 (byte {exc.start + 1} of the line)", path, number) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path, number) from None
            if not isinstance(record, dict):
                raise DataError("each line must be a JSON object", path, number)
            yield number, record


def _text(record: dict[str, Any], key: str, path: Path, line: int | None) -> str:
    if key not in record:
        raise DataError(f"missing field {key!r}", path, line)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"field {key!r} must be a string, got {type(value).__name__}", path, line)
    if not value.strip():
        raise DataError(f"field {key!r} is empty", path, line)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"field {key!r} holds an unpaired surrogate escape (\\ud800-\\udfff)", path, line) from None
    return value


def _references(
    record: dict[str, Any], key: str, path: Path, line: int | None, required: bool = True
) -> tuple[str, ...]:
    if key not in record and not required:
        return ()
    if key not in record:
        raise DataError(f"missing field {key!r}", path, line)
    value = record[key]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise DataError(f"field {key!r} must be a string or a non-empty list of strings", path, line)
    for text in values:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"field {key!r} holds an unpaired surrogate escape", path, line) from None
    return tuple(values)


def _detect_jsonl(path: Path) -> str:
    for number, record in _iter_jsonl(path):
        if "full_prompt" in record:
            return "ssr"
        if "prompt" in record:
            return "plain"
        raise DataError(
            "cannot tell the format: expected SSR fields (full_prompt, output, id) or plain fields "
            f"(prompt, response); found {sorted(record)}",
            path,
            number,
        )
    raise DataError("file has no records", path)


def read_ssr_jsonl(path: Path, responses: bool = True) -> list[Instance]:
    out = []
    for number, record in _iter_jsonl(path):
        query = _text(record, "full_prompt", path, number)
        refs = _references(record, "output", path, number, responses)
        inst_id = str(record.get("id", f"{path.stem}-{number}"))
        out.append(Instance(inst_id, query, refs))
    return out


def read_plain_jsonl(path: Path, responses: bool = True) -> list[Instance]:
    out = []
    for number, record in _iter_jsonl(path):
        query = _text(record, "prompt", path, number)
        refs = _references(record, "response", path, number, responses)
        out.append(Instance(str(record.get("id", f"{path.stem}-{number}")), query, refs))
    return out


def _load_json(path: Path) -> Any:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError("not UTF-8", path, line) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path, exc.lineno) from None


def read_superni_json(path: Path) -> list[Instance]:
    data = _load_json(path)
    if not isinstance(data, dict) or "Instances" not in data or "Definition" not in data:
        raise DataError("a SuperNI task file needs 'Definition' and 'Instances'", path)
    definition = data["Definition"]
    if isinstance(definition, list):
        if not all(isinstance(d, str) for d in definition):
            raise DataError("'Definition' must be a list of strings", path)
        definition = definition[0] if definition else ""
    if not isinstance(definition, str):
        raise DataError("'Definition' must be a string or a list of strings", path)
    instances = data["Instances"]
    if not isinstance(instances, list):
        raise DataError("'Instances' must be a list", path)
    out = []
    for index, record in enumerate(instances):
        where = f"Instances[{index}]"
        if not isinstance(record, dict):
            raise DataError(f"{where} must be an object", path)
        try:
            text = _text(record, "input", path, None)
            refs = _references(record, "output", path, None)
        except DataError as exc:
            raise DataError(f"{where}: {str(exc).split(': ', 1)[-1]}", path) from None
        query = f"{definition}\n\n{text}" if definition else text
        out.append(Instance(str(record.get("id", f"{path.stem}-{index}")), query, refs))
    return out


def read_trace_split(folder: Path, split: str) -> list[Instance]:
    if split not in TRACE_SPLITS:
        raise DataError(f"TRACE split must be one of {TRACE_SPLITS}, got {split!r}", folder)
    path = folder / f"{split}.json"
    if not path.is_file():
        raise DataError(f"TRACE folder has no {split}.json", folder)
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError("a TRACE split must be a JSON list of {prompt, answer}", path)
    out = []
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"item {index} must be an object", path)
        try:
            query = _text(record, "prompt", path, None)
            refs = _references(record, "answer", path, None)
        except DataError as exc:
            raise DataError(f"item {index}: {str(exc).split(': ', 1)[-1]}", path) from None
        out.append(Instance(f"{folder.name}-{split}-{index}", query, refs))
    return out


def detect_format(path: Path) -> str:
    if path.is_dir():
        if any((path / f"{s}.json").is_file() for s in TRACE_SPLITS):
            return "trace"
        raise DataError("a directory must be a TRACE folder with train.json/eval.json/test.json", path)
    if not path.is_file():
        raise DataError("data file not found", path)
    if path.suffix == ".json":
        return "superni"
    return _detect_jsonl(path)


def load_instances(path: str | Path, split: str = "train", responses: bool = True) -> list[Instance]:
    """Read instances from any supported format (`split` only applies to TRACE folders).

    With `responses=False` (queries to ask, general instructions) JSONL lines need no response.
    """
    path = Path(path).expanduser()
    kind = detect_format(path)
    if kind == "trace":
        return read_trace_split(path, split)
    if kind == "superni":
        return read_superni_json(path)
    return {"ssr": read_ssr_jsonl, "plain": read_plain_jsonl}[kind](path, responses)


class LabelOrderWarning(UserWarning):
    """The first N instances of a classification-looking file have another label balance than the file."""


def load_task(
    path: str | Path,
    name: str | None = None,
    split: str = "train",
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> Task:
    """Load a task; the name defaults to the file stem's first part (`qa.train.jsonl` -> `qa`).

    `limit` keeps the first N instances (warning when that changes a classification task's label
    balance: a label-sorted file); `sample` keeps a seeded, label-stratified sample of N instead.
    `synthetic:<task>` gives a built-in synthetic task (64 instances unless `limit` says otherwise).
    """
    for what, value in (("limit", limit), ("sample", sample)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"{what} must be a positive number of instances, got {value!r}")
    if limit is not None and sample is not None:
        raise DataError("give either limit (the first N instances) or sample (a stratified sample), not both")
    if str(path).startswith("synthetic:"):
        from seecl.data.synthetic import make_task

        task_name = str(path).split(":", 1)[1]
        size = limit or sample or 64
        task = make_task(task_name, "train" if split == "train" else "eval", size)
        return Task(name or task.name, task.instances, task.source)
    path = Path(path).expanduser()
    instances = load_instances(path, split)
    if not instances:
        raise DataError("task has no instances", path)
    if name is None:
        name = path.name.split(".")[0]
    task = Task(name, tuple(instances), source=str(path))
    if sample is not None:
        return task.sample(sample, seed)
    if limit is not None and limit < len(task):
        head = task.head(limit)
        if task.looks_like_classification() and _unbalanced(head.labels(), task.labels()):
            warnings.warn(
                LabelOrderWarning(
                    f"{path}: the first {limit} instances hold labels {dict(head.labels().most_common())} "
                    f"while the file holds {dict(task.labels().most_common())}; the file looks sorted by "
                    "label (a stratified sample keeps the balance: --sample N)"
                ),
                stacklevel=2,
            )
        return head
    return task


def _unbalanced(head, whole) -> bool:
    """A label missing from the head, or a label share off by more than half its share in the file."""
    n_head, n_whole = sum(head.values()), sum(whole.values())
    return any(
        abs(head.get(label, 0) / n_head - count / n_whole) > 0.5 * count / n_whole
        for label, count in whole.items()
        if count / n_whole * n_head >= 1
    )


def require_labels(task: Task, path: object, minimum: int = 2) -> None:
    """A classification task whose instances carry fewer than `minimum` labels is refused."""
    labels = task.labels()
    if len(labels) < minimum:
        raise DataError(
            f"classification task {task.name!r}: its {len(task)} instances carry "
            f"{len(labels)} label(s) {dict(labels.most_common())}; a one-label subset "
            "scores nothing but that label (is the file sorted by label?)",
            path,
        )
