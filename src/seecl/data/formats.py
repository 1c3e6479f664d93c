"""Readers for the task formats seecl accepts (docs/design.md §4), with errors that name file and line.

- SSR-style JSONL: one object per line with `full_prompt`, `output`, `id` (`task_name` optional).
- Official SuperNI task JSON: `Definition` (list), `Instances` with `input` and `output` (list);
  the query is Definition + "\\n\\n" + input.
- TRACE folder: `train.json` / `eval.json` / `test.json`, each a list of `{prompt, answer}`.
- Plain JSONL with `prompt` and `response` (or `completion`, TRL's prompt-completion, whose
  conversational form, lists of messages, reads as chat; optional `id`).
- Chat JSONL with `messages`: one user message and the assistant's answer (OpenAI's fine-tuning
  format, TRL's conversational one); system messages are skipped, as `seecl serve` skips them.
- Alpaca JSONL with `instruction`, `input` (may be empty) and `output`; the query is
  instruction + "\\n\\n" + input.
A `.json` file holding a list of records in any of these record formats reads like the JSONL form.
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
# Where a record is, as DataError takes it: (file, line) for JSONL, ("file[N]", None) for a JSON list
# (N counts from 0, as jq's .[N] and the server's input[N] do).
Where = tuple[object, "int | None"]


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig on every line: files concatenated from BOM-marked files carry one per part
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise DataError(f"not UTF-8 (byte {exc.start + 1} of the line)", path, number) from None
            if not line.strip():
                continue
            try:
                # without its newline, an error at the line's end is reported there, not at column 1
                # of a line after it
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path, number) from None
            except RecursionError:
                raise DataError("malformed JSON: nested too deeply", path, number) from None
            if not isinstance(record, dict):
                raise DataError("each line must be a JSON object", path, number)
            yield number, record


def _text(record: dict[str, Any], key: str, path: object, line: int | None) -> str:
    if key not in record:
        raise DataError(f"missing field {key!r}", path, line)
    return _checked_text(record[key], f"field {key!r}", path, line)


def _checked_text(value: Any, what: str, path: object, line: int | None) -> str:
    if not isinstance(value, str):
        raise DataError(f"{what} must be a string, got {type(value).__name__}", path, line)
    if not value.strip():
        raise DataError(f"{what} is empty", path, line)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{what} holds an unpaired surrogate escape (\\ud800-\\udfff)", path, line) from None
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
    if required and not any(text.strip() for text in values):  # an expert would learn to claim and say nothing
        raise DataError(f"field {key!r} is empty", path, line)
    return tuple(values)


RESPONSE_KEYS = ("response", "completion", "answer")


def _record_kind(record: dict[str, Any]) -> str | None:
    if "full_prompt" in record:
        return "ssr"
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record:
        return "plain"
    return None


def _unknown_record(record: dict[str, Any]) -> str:
    return (
        "cannot tell the format: expected SSR fields (full_prompt, output, id), chat messages "
        "(messages), Alpaca fields (instruction, input, output) or plain fields (prompt, "
        f"response/completion); found {sorted(record)}"
    )


def _ssr_instance(record: dict[str, Any], where: Where, responses: bool) -> tuple[str, tuple[str, ...]]:
    return _text(record, "full_prompt", *where), _references(record, "output", *where, responses)


def _plain_instance(record: dict[str, Any], where: Where, responses: bool) -> tuple[str, tuple[str, ...]]:
    if isinstance(record.get("prompt"), list):  # TRL's conversational prompt-completion
        completion = record.get("completion", [])
        if not isinstance(completion, list):
            raise DataError("a conversational 'prompt' (a list of messages) needs a list 'completion'", *where)
        return _chat_instance({"messages": record["prompt"] + completion}, where, responses)
    keys = [key for key in RESPONSE_KEYS if key in record]
    if len(keys) > 1:
        raise DataError(f"fields {' and '.join(map(repr, keys))} both hold the response; keep one", *where)
    query = _text(record, "prompt", *where)
    if not keys and responses:
        raise DataError("missing field 'response' (or 'completion', or TRACE's 'answer')", *where)
    return query, _references(record, keys[0], *where, responses) if keys else ()


def _alpaca_instance(record: dict[str, Any], where: Where, responses: bool) -> tuple[str, tuple[str, ...]]:
    instruction = _text(record, "instruction", *where)
    context = record.get("input", "")
    if not isinstance(context, str):
        raise DataError(f"field 'input' must be a string, got {type(context).__name__}", *where)
    query = f"{instruction}\n\n{context}" if context.strip() else instruction
    return query, _references(record, "output", *where, responses)


SYSTEM_ROLES = ("system", "developer")


class SystemMessageSkipped(UserWarning):
    """A chat file's system messages are not part of its instances (said once per file)."""


def _chat_instance(record: dict[str, Any], where: Where, responses: bool) -> tuple[str, tuple[str, ...]]:
    """One user message, then the assistant's answer (the training target). System and developer
    messages are skipped, as `seecl serve` skips them: experts learn and answer under the
    ensemble's own system prompt (`model.system_prompt`)."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError("'messages' must be a non-empty list of message objects", *where)
    turns = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role in SYSTEM_ROLES:
            continue
        if role not in ("user", "assistant"):
            raise DataError(f"messages[{index}]: role {role!r} is not supported (user, assistant, system)", *where)
        try:
            turns.append((role, content_text(message.get("content"))))
        except (TypeError, ValueError) as exc:
            raise DataError(f"messages[{index}]: content {exc}", *where) from None
    roles = [role for role, _ in turns]
    if roles not in (["user"], ["user", "assistant"]) or (responses and roles != ["user", "assistant"]):
        wanted = "one user message and the assistant's answer" if responses else "one user message"
        raise DataError(f"an instance is {wanted} (system messages aside); found the turns {roles or 'none'}", *where)
    texts = {role: _checked_text(text, f"the {role} message", *where) for role, text in turns}
    return texts["user"], (texts["assistant"],) if "assistant" in texts else ()


def _has_system_message(record: dict[str, Any]) -> bool:
    messages = record.get("messages", record.get("prompt"))  # chat, or TRL's conversational form
    return isinstance(messages, list) and any(isinstance(m, dict) and m.get("role") in SYSTEM_ROLES for m in messages)


RECORD_READERS = {"ssr": _ssr_instance, "plain": _plain_instance, "alpaca": _alpaca_instance, "chat": _chat_instance}


def content_text(content: Any) -> str:
    """A chat message's text: a string, or a list of text parts (OpenAI's content array), joined.

    Raises ValueError for parts that are not text and TypeError for any other shape, each saying
    what is wrong after the word "content"; callers add where it was."""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        others = sorted({str(part.get("type")) for part in content} - {"text"})
        if others:
            raise ValueError(f"parts of type {', '.join(others)} are not supported (text only)")
        if all(isinstance(part.get("text"), str) for part in content):
            content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise TypeError("must be a string or an array of text parts")
    return content


def _read_records(records: Iterator[tuple[dict[str, Any], Where, str]], path: Path, responses: bool) -> list[Instance]:
    """Instances from records that share one format, decided by the first record."""
    kind = None
    skipped = False
    out = []
    for record, where, default_id in records:
        if kind is None:
            kind = _record_kind(record)
            if kind is None:
                raise DataError(_unknown_record(record), *where)
        elif _record_kind(record) != kind:
            raise DataError(f"this record is not in the file's format ({kind}, from its first record)", *where)
        query, references = RECORD_READERS[kind](record, where, responses)
        out.append(Instance(str(record.get("id", default_id)), query, references))
        if not skipped and _has_system_message(record):
            skipped = True
            warnings.warn(
                SystemMessageSkipped(
                    f"{path}: system messages are skipped; experts learn and answer under the "
                    "ensemble's system prompt (model.system_prompt), as `seecl serve` does"
                ),
                stacklevel=3,
            )
    if kind is None:
        raise DataError("file has no records", path)
    return out


def _jsonl_records(path: Path) -> Iterator[tuple[dict[str, Any], Where, str]]:
    for number, record in _iter_jsonl(path):
        yield record, (path, number), f"{path.stem}-{number}"


def _list_records(data: list, path: Path, id_prefix: str) -> Iterator[tuple[dict[str, Any], Where, str]]:
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError("must be a JSON object", f"{path}[{index}]")
        yield record, (f"{path}[{index}]", None), f"{id_prefix}-{index}"


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
    except RecursionError:
        raise DataError("malformed JSON: nested too deeply", path) from None


def read_superni_json(data: dict, path: Path, responses: bool = True) -> list[Instance]:
    if "Instances" not in data or "Definition" not in data:
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
            refs = _references(record, "output", path, None, responses)
        except DataError as exc:
            raise DataError(f"{where}: {str(exc).split(': ', 1)[-1]}", path) from None
        query = f"{definition}\n\n{text}" if definition else text
        out.append(Instance(str(record.get("id", f"{path.stem}-{index}")), query, refs))
    return out


def read_json_file(path: Path, responses: bool = True, id_prefix: str | None = None) -> list[Instance]:
    """A `.json` file: a SuperNI task (an object with Definition and Instances) or a list of records
    in any JSONL record format (TRACE splits, Alpaca's alpaca_data.json, chat datasets)."""
    data = _load_json(path)
    if isinstance(data, list):
        return _read_records(_list_records(data, path, id_prefix or path.stem), path, responses)
    if isinstance(data, dict):
        return read_superni_json(data, path, responses)
    raise DataError("a .json data file must be a SuperNI task object or a list of records", path)


def read_trace_split(folder: Path, split: str) -> list[Instance]:
    if split not in TRACE_SPLITS:
        raise DataError(f"TRACE split must be one of {TRACE_SPLITS}, got {split!r}", folder)
    path = folder / f"{split}.json"
    if not path.is_file():
        raise DataError(f"TRACE folder has no {split}.json", folder)
    return read_json_file(path, id_prefix=f"{folder.name}-{split}")


def load_instances(path: str | Path, split: str = "train", responses: bool = True) -> list[Instance]:
    """Read instances from any supported format (`split` only applies to TRACE folders).

    With `responses=False` (queries to ask, general instructions) records need no response.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if any((path / f"{s}.json").is_file() for s in TRACE_SPLITS):
            return read_trace_split(path, split)
        raise DataError("a directory must be a TRACE folder with train.json/eval.json/test.json", path)
    if not path.is_file():
        raise DataError("data file not found", path)
    if path.suffix == ".json":
        return read_json_file(path, responses)
    return _read_records(_jsonl_records(path), path, responses)


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
