"""Local SFT datasets: loading, format detection, conversion to TRL formats, tokenization with stats.

Formats (by column names, first match wins):
  messages           `messages`: [{"role", "content"}, ...]                  (TRL conversational)
  prompt_completion  `prompt` + `completion`: both strings or both message lists (TRL)
  sharegpt           `conversations`: [{"from": human|gpt|system, "value"}, ...]
  alpaca             `instruction`, `output` [, `input`, `system`]
  text               `text`: plain string, every token trained            (TRL language modeling)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from data_tools.chat import IGNORE_INDEX, tokenize_row

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
FORMATS = ("messages", "prompt_completion", "sharegpt", "alpaca", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
TRAIN_ON = ("assistant", "all")
TRUNCATION = ("right", "drop")
ON_ERROR = ("raise", "skip")

logger = logging.getLogger(__name__)

_SUPPORTED = (
    "a .jsonl / .json / .parquet file, a directory written by Dataset.save_to_disk or "
    "DatasetDict.save_to_disk, or a directory holding <split>.jsonl / .json / .parquet"
)


def _find_json_error(path: Path) -> str | None:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                return f"line {err.lineno}, column {err.colno}: {err.msg}"
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {lineno}, column {err.colno}: {err.msg}"
        if not isinstance(value, dict):
            return f"line {lineno}: expected a JSON object, got {type(value).__name__}"
    return None


def _json_lines(path: Path) -> tuple[list[dict], list[str]]:
    """The lines of a JSON Lines file that are JSON objects, and what is wrong with each other line."""
    rows, bad = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append(f"line {lineno}: {err.msg}")
            continue
        if isinstance(value, dict):
            rows.append(value)
        else:
            bad.append(f"line {lineno}: a JSON {type(value).__name__}, not an object")
    return rows, bad


def _skip_bad_lines(path: Path, err: Exception) -> datasets.Dataset:
    """data.on_error=skip: the file's JSON-object lines, the others counted and named in a warning."""
    rows, bad = _json_lines(path)
    if not bad:
        raise ValueError(f"{path}: could not load as json: {err.__cause__ or err}") from err
    if not rows:
        raise ValueError(f"{path}: no line is a JSON object (first problem: {bad[0]})") from err
    logger.warning("%s: skipped %d line(s) that are not JSON objects (data.on_error=skip): %s%s", path, len(bad),
                   "; ".join(bad[:3]), "; ..." if len(bad) > 3 else "")
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as again:  # e.g. a column holding a number in one row and a string in another
        raise ValueError(f"{path}: its JSON lines do not form one table: {again}") from again


def _load_file(path: Path, on_error: str = "raise") -> datasets.Dataset:
    builder = "parquet" if path.suffix == ".parquet" else "json"
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        if builder == "json" and on_error == "skip":
            return _skip_bad_lines(path, err)
        problem = _find_json_error(path) if builder == "json" else None
        if problem is not None:
            raise ValueError(f"{path}: invalid JSON at {problem} (data.on_error=skip skips such lines)") from err
        cause = err.__cause__ or err
        raise ValueError(f"{path}: could not load as {builder}: {cause}") from err


def _saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_saved(path: Path, split: str | None) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise ValueError(f"{path}: no split {name!r}; available splits: {', '.join(loaded)}")
        return loaded[name]
    if split not in (None, "train"):
        raise ValueError(f"{path}: holds a single dataset without splits; split {split!r} does not exist")
    return loaded


def _split_file(path: Path, split: str | None) -> Path:
    name = split or "train"
    for suffix in FILE_SUFFIXES:
        if (path / f"{name}{suffix}").is_file():
            return path / f"{name}{suffix}"
    raise ValueError(
        f"{path}: directory is not a saved dataset and has no {name}.jsonl / {name}.json / "
        f"{name}.parquet; expected {_SUPPORTED}"
    )


def load_rows(path: str | Path, split: str | None = None, on_error: str = "raise") -> datasets.Dataset:
    """Rows of a local dataset. `split` picks a split of a directory (default "train");
    a single file is its own data whatever the split. A JSON Lines line that is not a JSON object
    is an error naming it (on_error "raise"), or skipped with a logged warning counting them ("skip")."""
    _check_choice("on_error", on_error, ON_ERROR)
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {str(path)!r} does not exist; expected {_SUPPORTED}")
    if path.is_dir():
        return _load_saved(path, split) if _saved_dataset(path) else _load_file(_split_file(path, split), on_error)
    if path.suffix not in FILE_SUFFIXES:
        raise ValueError(f"dataset {str(path)!r} has unsupported extension {path.suffix!r}; expected {_SUPPORTED}")
    return _load_file(path, on_error)


def detect_format(column_names: Sequence[str]) -> str:
    """One of FORMATS, from the dataset's columns."""
    columns = set(column_names)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "conversations" in columns:
        return "sharegpt"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"cannot tell the dataset format from columns {sorted(columns)}; expected 'messages' "
        "(role/content list), 'prompt' + 'completion', 'conversations' (ShareGPT from/value), "
        "'instruction' + 'output' (Alpaca) or 'text'"
    )


def _sharegpt_messages(turns: object, where: str) -> list[dict[str, str]]:
    if isinstance(turns, str | bytes) or not isinstance(turns, Sequence):
        raise ValueError(f"{where}: 'conversations' must be a list of turns, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{where}: conversations[{i}] must be a dict with 'from' and 'value', got {turn!r}")
        if turn["from"] not in SHAREGPT_ROLES:
            raise ValueError(
                f"{where}: conversations[{i}] 'from' is {turn['from']!r}; expected one of "
                f"{', '.join(SHAREGPT_ROLES)}"
            )
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _text_field(row: Mapping[str, object], key: str, where: str, required: bool) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _alpaca_messages(row: Mapping[str, object], where: str) -> list[dict[str, str]]:
    instruction = _text_field(row, "instruction", where, required=True)
    extra = _text_field(row, "input", where, required=False)
    system = _text_field(row, "system", where, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}]
    return messages + [{"role": "assistant", "content": _text_field(row, "output", where, required=True)}]


def to_standard(row: Mapping[str, object], fmt: str, where: str = "row") -> dict[str, object]:
    """A row of format `fmt` as {"messages"}, {"prompt", "completion"} or {"text"} (TRL formats)."""
    if fmt == "messages":
        return {"messages": row.get("messages")}
    if fmt == "prompt_completion":
        return {"prompt": row.get("prompt"), "completion": row.get("completion")}
    if fmt == "sharegpt":
        return {"messages": _sharegpt_messages(row.get("conversations"), where)}
    if fmt == "alpaca":
        return {"messages": _alpaca_messages(row, where)}
    if fmt == "text":
        return {"text": _text_field(row, "text", where, required=True)}
    raise ValueError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")


@dataclass
class DataStats:
    """What tokenize_dataset kept and why it dropped the rest; lengths are of kept examples.

    rows = kept + dropped_too_long + dropped_no_trained + skipped_malformed; `truncated` counts kept
    examples that were cut to max_length.
    """

    source: str = "<data>"
    max_length: int = 0
    truncation: str = "right"
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trained: int = 0
    skipped_malformed: int = 0
    first_skipped: str = ""  # why the first skipped row was malformed
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def _percentile(self, q: float) -> int:
        ordered = sorted(self.lengths)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0

    @property
    def length_min(self) -> int:
        return min(self.lengths, default=0)

    @property
    def length_max(self) -> int:
        return max(self.lengths, default=0)

    @property
    def length_mean(self) -> float:
        return sum(self.lengths) / len(self.lengths) if self.lengths else 0.0

    @property
    def length_p50(self) -> int:
        return self._percentile(0.5)

    @property
    def length_p95(self) -> int:
        return self._percentile(0.95)

    def as_dict(self) -> dict[str, object]:
        names = ("rows", "kept", "truncated", "dropped_too_long", "dropped_no_trained", "skipped_malformed",
                 "tokens", "trained_tokens", "length_min", "length_mean", "length_p50", "length_p95",
                 "length_max")
        return {"source": self.source, "max_length": self.max_length, "truncation": self.truncation,
                **{name: getattr(self, name) for name in names}}

    def summary(self) -> str:
        share = self.trained_tokens / self.tokens if self.tokens else 0.0
        return "\n".join([
            f"data {self.source}: {self.rows} rows -> {self.kept} examples "
            f"(max_length {self.max_length}, truncation {self.truncation!r})",
            f"  truncated {self.truncated}, dropped too long {self.dropped_too_long}, "
            f"dropped with nothing to train {self.dropped_no_trained}, "
            f"skipped malformed {self.skipped_malformed}"
            + (f" (the first: {self.first_skipped})" if self.first_skipped else ""),
            f"  tokens {self.tokens:,}, trained {self.trained_tokens:,} ({share:.1%})",
            f"  length min {self.length_min} / mean {self.length_mean:.1f} / p50 {self.length_p50} / "
            f"p95 {self.length_p95} / max {self.length_max}",
        ])


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} is {value!r}; expected one of {', '.join(choices)}")


def _fit(ids: list[int], labels: list[int], max_length: int, truncation: str, stats: DataStats) -> dict | None:
    too_long = len(ids) > max_length
    if too_long and truncation == "drop":
        stats.dropped_too_long += 1
        return None
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        stats.dropped_no_trained += 1
        return None
    stats.truncated += too_long
    return {"input_ids": ids, "labels": labels}


def check_replies(row: Mapping[str, object], where: str) -> None:
    """A training conversation ends with an assistant reply, and no assistant reply is empty. `row` is a
    standard-format row that tokenize_row accepted: `messages`, `prompt` + `completion`, or `text`."""
    if "messages" in row:
        messages, name = row["messages"], "message {}"
    elif "completion" in row:
        completion = row["completion"]
        messages = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        name = "the completion"
    else:
        return  # plain text: every token is trained
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise ValueError(f"{where}: {name.format(i)} is an empty assistant reply; a training row needs a reply")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the conversation ends with a {messages[-1]['role']!r} message, not an "
                         f"assistant reply (a truncated conversation?)")


def _tokenize_one(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, object], fmt: str, train_on: str, where: str
) -> tuple[list[int], list[int]]:
    try:
        standard = to_standard(row, fmt, where)
        tokenized = tokenize_row(tokenizer, standard, train_on, where)  # its errors first: the more basic ones
        check_replies(standard, where)
        return tokenized
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{where}: malformed row ({type(err).__name__}: {err})") from err


def tokenize_dataset(
    rows: datasets.Dataset | Sequence[Mapping[str, object]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    train_on: str = "assistant",
    truncation: str = "right",
    on_error: str = "raise",
    source: str = "<data>",
    progress: bool = False,
) -> tuple[list[dict], DataStats]:
    """Examples {"input_ids", "labels"} (labels unshifted, IGNORE_INDEX where untrained) and stats.

    train_on: "assistant" trains assistant replies / the completion; "all" every token but BOS.
    truncation: "right" keeps the first max_length tokens; this CAN cut an assistant reply (and its
    EOS) short; rows left with no trained token are dropped and counted. "drop" drops longer rows.
    on_error: "raise" stops at the first malformed row, naming `source` and the 1-based row;
    "skip" skips and counts it.
    """
    _check_choice("train_on", train_on, TRAIN_ON)
    _check_choice("truncation", truncation, TRUNCATION)
    _check_choice("on_error", on_error, ON_ERROR)
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    columns = rows.column_names if isinstance(rows, datasets.Dataset) else list(rows[0]) if rows else []
    fmt = detect_format(columns) if rows else "messages"
    stats = DataStats(source=source, max_length=max_length, truncation=truncation)
    examples, seen = [], {}  # seen: a row's JSON -> its tokens, so repeated rows are tokenized once
    for number, row in enumerate(_progress(rows, progress, source), start=1):
        stats.rows += 1
        key = json.dumps(row, sort_keys=True, default=str)
        try:
            if key not in seen:
                seen[key] = _tokenize_one(tokenizer, row, fmt, train_on, f"{source}: row {number}")
            ids, labels = seen[key]
        except ValueError as err:
            if on_error == "raise":
                raise
            stats.skipped_malformed += 1
            stats.first_skipped = stats.first_skipped or str(err)
            continue
        example = _fit(ids, labels, max_length, truncation, stats)
        if example is not None:
            examples.append(example)
            _count(stats, example)
    return examples, stats


def _count(stats: DataStats, example: dict) -> None:
    stats.kept += 1
    stats.tokens += len(example["input_ids"])
    stats.trained_tokens += sum(label != IGNORE_INDEX for label in example["labels"])
    stats.lengths.append(len(example["input_ids"]))


def row_dicts(rows: datasets.Dataset | Sequence[Mapping[str, object]]) -> Iterator[Mapping[str, object]]:
    """The rows as dicts; a Dataset is read in Arrow batches (row-by-row indexing costs ~30 us a row)."""
    if not isinstance(rows, datasets.Dataset):
        yield from rows
        return
    for batch in rows.iter(batch_size=1024):
        columns = list(batch)
        yield from (dict(zip(columns, values, strict=True)) for values in zip(*batch.values(), strict=True))


def _progress(rows: object, enabled: bool, source: str) -> object:
    if not enabled:
        return row_dicts(rows)
    from tqdm.auto import tqdm

    return tqdm(row_dicts(rows), total=len(rows), desc=f"tokenizing {source}", unit="row")
