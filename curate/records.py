"""The canonical example schema and the adapters that map input rows onto it.

Every example that flows through a pipeline is a plain dict with these columns:

    id          stable content hash of the conversation (reruns agree, candidates differ)
    prompt_id   content hash of the prompt alone: rows answering the same instruction share it
    source      the input's name (job config) or the file stem
    origin      where the row was read: "file:line" (":k" for the k-th record of a list row);
                file is the path relative to the common parent directory of the run's
                input files. A curate output read back keeps its stored origins, prefixed
                "file:" when it is read alongside other inputs.
    prompt      instruction text (multi-turn: the earlier turns, "role: content" lines)
    response    the final assistant turn, the text every loss and score is taken over
    messages    the whole conversation as [{role, content}], system turn included
    generator   who wrote the response, when the input says (multi-response pools)

Invariant: (id, origin) is unique across the records of one run; selectors break ties
on it, so a duplicate would let them keep more rows than the budget.

Stages add flat score columns (`score_grape`, `cluster`, `don`, ...) next to these.
Adapters raise `RowError` with the field at fault; the reader turns that into a
dead-letter row naming file, line and reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from json.encoder import encode_basestring  # json.dumps's own (C) string encoder
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

BASE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt_id", pa.string()),
        ("source", pa.string()),
        ("origin", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        (
            "messages",
            pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
        ),
        ("generator", pa.string()),
    ]
)
BASE_COLUMNS = tuple(BASE_SCHEMA.names)

ROLES = ("system", "user", "assistant")
# ShareGPT spells roles its own way.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system"}


class RowError(ValueError):
    """A row that cannot become an example; the message is the dead-letter reason."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_unicode(value: str, name: str) -> str:
    """`value`, or a RowError when it holds a lone surrogate (JSON can escape one, as
    "\\ud800"; it is not valid Unicode, and fails once encoded as UTF-8)."""
    bad = None if value.isascii() else _SURROGATE.search(value)  # isascii: O(1), a flag of the string
    if bad:
        raise RowError(f"field '{name}' contains a lone surrogate (\\u{ord(bad.group()):04x}), "
                       f"not valid Unicode")
    return value


_ROLE_CONTENT = {"role", "content"}


def _turns_json(messages: Any) -> list[str] | None:
    """Each turn's canonical JSON (sorted keys, no spaces, UTF-8 as is) for the usual list
    of {role, content} dicts, built directly: a third of json.dumps's CPU, on the path
    every row takes twice. None for any other shape."""
    if type(messages) is not list:
        return None
    turns = []
    for m in messages:
        if type(m) is not dict or m.keys() != _ROLE_CONTENT or type(m["role"]) is not str \
                or type(m["content"]) is not str:
            return None
        turns.append('{"content":' + encode_basestring(m["content"]) + ',"role":' + encode_basestring(m["role"]) + "}")
    return turns


def _sha(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


def content_hash(obj: Any) -> str:
    """The first 16 hex digits of the SHA-256 of `obj`'s canonical JSON."""
    turns = _turns_json(obj)
    if turns is None:
        return _sha(json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")))
    return _sha("[" + ",".join(turns) + "]")


def _ids(messages: list[dict]) -> tuple[str, str]:
    """(content_hash(messages), content_hash(messages[:-1])), each turn encoded once."""
    turns = _turns_json(messages)
    if turns is None:
        return content_hash(messages), content_hash(messages[:-1])
    return _sha("[" + ",".join(turns) + "]"), _sha("[" + ",".join(turns[:-1]) + "]")


def prompt_text(messages: list[dict]) -> str:
    """The prompt as one string: the single user turn, or earlier turns as lines."""
    turns = messages[:-1]
    non_system = [m for m in turns if m["role"] != "system"]
    if len(non_system) == 1 and non_system[0]["role"] == "user":
        return non_system[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns)


def make_record(messages: list[dict], source: str, generator: str | None = None) -> dict:
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError("messages: the last turn must be the assistant's response")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise RowError("messages: no user turn before the response")
    id_, prompt_id = _ids(messages)
    return {
        "id": id_,
        "prompt_id": prompt_id,
        "source": source,
        "origin": "",  # set by the reader
        "prompt": prompt_text(messages),
        "response": messages[-1]["content"],
        "messages": messages,
        "generator": generator,
    }


def _text(row: dict, name: str, *, required: bool = True, allow_empty: bool = False) -> str | None:
    if name not in row or row[name] is None:
        if required:
            raise RowError(f"missing field '{name}'")
        return None
    value = row[name]
    if not isinstance(value, str):
        raise RowError(f"field '{name}' is {type(value).__name__}, expected text")
    if not allow_empty and not value.strip():
        if required:
            raise RowError(f"empty field '{name}'")
        return None
    return _check_unicode(value, name)


def _single_turn(prompt: str, response: str, system: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# ---------------------------------------------------------------- adapters
# Each adapter takes (row, fields, source) -> iterator of records. `fields` maps the
# adapter's canonical names to the names the input uses (job config `fields:`).


def adapt_alpaca(row: dict, f: dict, source: str) -> Iterator[dict]:
    instruction = _text(row, f.get("instruction", "instruction"))
    extra = _text(row, f.get("input", "input"), required=False, allow_empty=True)
    prompt = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
    response = _text(row, f.get("output", "output"))
    system = _text(row, f.get("system", "system"), required=False)
    generator = _text(row, f.get("generator", "generator"), required=False)
    yield make_record(_single_turn(prompt, response, system), source, generator)


def adapt_qa(row: dict, f: dict, source: str) -> Iterator[dict]:
    question = _text(row, f.get("question", "question"))
    answer = _text(row, f.get("answer", "answer"))
    yield make_record(_single_turn(question, answer, None), source,
                      _text(row, f.get("generator", "generator"), required=False))


def adapt_prompt_response(row: dict, f: dict, source: str) -> Iterator[dict]:
    prompt = _text(row, f.get("prompt", "prompt"))
    response = _text(row, f.get("response", "response"))
    system = _text(row, f.get("system", "system"), required=False)
    yield make_record(_single_turn(prompt, response, system), source,
                      _text(row, f.get("generator", "generator"), required=False))


def adapt_messages(row: dict, f: dict, source: str) -> Iterator[dict]:
    """OpenAI `messages` ({role, content}) and ShareGPT `conversations` ({from, value})."""
    name = f.get("messages")
    if name is None:
        name = "messages" if "messages" in row else "conversations"
    turns = row.get(name)
    if turns is None:
        raise RowError(f"missing field '{name}'")
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field '{name}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"{name}[{i}] is {type(turn).__name__}, expected an object")
        if "role" in turn or "content" in turn:
            role, content = turn.get("role"), turn.get("content")
        else:
            raw_role, content = turn.get("from"), turn.get("value")
            role = SHAREGPT_ROLES.get(str(raw_role).lower(), raw_role)
        if role not in ROLES:
            raise RowError(f"{name}[{i}].role is {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"{name}[{i}].content is {type(content).__name__}, expected text")
        if not content.strip():
            raise RowError(f"{name}[{i}].content is empty")
        _check_unicode(content, f"{name}[{i}].content")
        messages.append({"role": role, "content": content})
    generator = _text(row, f.get("generator", "generator"), required=False)
    yield make_record(messages, source, generator)


def adapt_pool_list(row: dict, f: dict, source: str) -> Iterator[dict]:
    """One row, several candidate responses in a list column (`outputs` by default),
    optionally named by a parallel list column (`generators`)."""
    instruction = _text(row, f.get("instruction", "instruction"))
    extra = _text(row, f.get("input", "input"), required=False, allow_empty=True)
    prompt = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
    name = f.get("outputs", "outputs")
    outputs = row.get(name)
    if outputs is None:
        raise RowError(f"missing field '{name}'")
    if not isinstance(outputs, list) or not outputs:
        raise RowError(f"field '{name}' must be a non-empty list of responses")
    gen_name = f.get("generators", "generators")
    generators = row.get(gen_name)
    if generators is not None and (not isinstance(generators, list) or len(generators) != len(outputs)):
        raise RowError(f"field '{gen_name}' must be a list as long as '{name}'")
    records = []
    for i, out in enumerate(outputs):
        if not isinstance(out, str):
            raise RowError(f"{name}[{i}] is {type(out).__name__}, expected text")
        if not out.strip():
            raise RowError(f"{name}[{i}] is empty")
        _check_unicode(out, f"{name}[{i}]")
        gen = str(i) if generators is None else _check_unicode(str(generators[i]), f"{gen_name}[{i}]")
        records.append(make_record(_single_turn(prompt, out, None), source, gen))
    yield from records


def adapt_curate(row: dict, f: dict, source: str) -> Iterator[dict]:
    """A row of a curate output (scores from `curate score`): passed through unchanged,
    score columns included, after checking the canonical columns are sound."""
    for name in ("id", "prompt_id", "prompt", "response"):
        _text(row, name)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise RowError("field 'messages' must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        _check_unicode(m["content"], f"messages[{i}].content")
    yield dict(row)


@dataclass(frozen=True)
class Adapter:
    name: str
    fn: Callable[[dict, dict, str], Iterator[dict]]
    # canonical field names whose presence identifies the shape (for auto-detection)
    signature: tuple[str, ...] = field(default=())


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in [
        Adapter("curate", adapt_curate, ("id", "prompt_id", "messages", "origin")),
        Adapter("messages", adapt_messages, ("messages",)),
        Adapter("sharegpt", adapt_messages, ("conversations",)),
        Adapter("pool_list", adapt_pool_list, ("instruction", "outputs")),
        Adapter("alpaca", adapt_alpaca, ("instruction", "output")),
        Adapter("qa", adapt_qa, ("question", "answer")),
        Adapter("prompt_response", adapt_prompt_response, ("prompt", "response")),
    ]
}


def detect_adapter(row: dict, fields: dict) -> Adapter | None:
    """The first adapter whose (mapped) signature fields are all in the row."""
    for adapter in ADAPTERS.values():
        if all(fields.get(k, k) in row for k in adapter.signature):
            return adapter
    return None


def describe_shapes() -> str:
    return "; ".join(f"{a.name} ({', '.join(a.signature)})" for a in ADAPTERS.values())


def scalars_as_text(value: Any) -> Any:
    """`value` with every scalar inside it that is not text (a number, a bool; anything
    without a length but None) written as its text, in dicts and lists at any depth."""
    if isinstance(value, dict):
        return {k: scalars_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scalars_as_text(v) for v in value]
    return value if value is None or hasattr(value, "__len__") else str(value)


def adapt(row: Any, adapter: Adapter, fields: dict, source: str, lenient: bool = False) -> list[dict]:
    """The records of one input row. `lenient` reads a number or bool where text is
    expected as its text (`scalars_as_text`): for evaluation sets, whose answers are often
    numbers; training inputs stay strict, such a field is a RowError naming it."""
    if not isinstance(row, dict):
        raise RowError(f"row is {type(row).__name__}, expected a JSON object")
    try:
        return list(adapter.fn(scalars_as_text(row) if lenient else row, fields, source))
    except RecursionError:  # a field nested thousands deep, met while hashing or printing it
        raise RowError("JSON nested too deeply") from None


def iter_texts(record: dict) -> Iterable[str]:
    for m in record["messages"]:
        yield m["content"]
