import pytest

from curate import records
from curate.records import ADAPTERS, RowError, adapt, detect_adapter


def one(row, name, fields=None, source="src"):
    out = adapt(row, ADAPTERS[name], fields or {}, source)
    assert len(out) == 1
    return out[0]


def test_alpaca_joins_instruction_and_input():
    r = one({"instruction": "Translate", "input": "hello", "output": "bonjour"}, "alpaca")
    assert r["prompt"] == "Translate\n\nhello"
    assert r["response"] == "bonjour"
    assert r["messages"] == [{"role": "user", "content": "Translate\n\nhello"},
                             {"role": "assistant", "content": "bonjour"}]
    assert r["source"] == "src" and r["generator"] is None


def test_alpaca_empty_input_is_not_appended():
    assert one({"instruction": "Say hi", "input": "  ", "output": "hi"}, "alpaca")["prompt"] == "Say hi"


def test_qa_and_field_mapping():
    r = one({"q": "2+2?", "a": "4"}, "qa", fields={"question": "q", "answer": "a"})
    assert (r["prompt"], r["response"]) == ("2+2?", "4")


def test_openai_messages_with_system_and_multi_turn():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"}]
    r = one({"messages": msgs}, "messages")
    assert r["response"] == "Goodbye"
    assert r["prompt"] == "system: Be brief.\nuser: Hi\nassistant: Hello\nuser: Bye"
    assert r["messages"] == msgs


def test_sharegpt_roles_are_mapped():
    r = one({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "sharegpt")
    assert r["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_pool_rows_share_prompt_id_but_not_id():
    a = one({"instruction": "Q", "output": "A1", "generator": "m1"}, "alpaca")
    b = one({"instruction": "Q", "output": "A2", "generator": "m2"}, "alpaca")
    assert a["prompt_id"] == b["prompt_id"] and a["id"] != b["id"]
    assert (a["generator"], b["generator"]) == ("m1", "m2")


def test_pool_list_column_expands():
    out = adapt({"instruction": "Q", "outputs": ["x", "y"], "generators": ["g1", "g2"]},
                ADAPTERS["pool_list"], {}, "s")
    assert [r["response"] for r in out] == ["x", "y"]
    assert [r["generator"] for r in out] == ["g1", "g2"]
    assert len({r["prompt_id"] for r in out}) == 1


def test_ids_are_stable_content_hashes():
    row = {"question": "Q", "answer": "A"}
    assert one(row, "qa")["id"] == one(dict(row), "qa", source="other")["id"]
    assert one(row, "qa")["id"] != one({"question": "Q", "answer": "B"}, "qa")["id"]


def test_content_hash_is_sha256_of_the_canonical_json():
    """The hand-built JSON of the usual messages equals json.dumps's canonical form
    (ids of every saved pool depend on it), for odd text and for the fallback shapes."""
    import hashlib
    import json
    import random

    rng = random.Random(0)
    alphabet = ['a', 'Z', ' ', '"', '\\', '\n', '\t', '\x00', '\x1f', '\x7f', 'é', '中', '\u2028', '\U0001f600', '/']
    cases = [[], [{"role": "user", "content": ""}],
             [{"content": "c", "role": "user", "name": "x"}],  # an extra key: the json.dumps fallback
             [{"role": "user", "content": 5}]]
    cases += [[{"role": r, "content": "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))}
               for r in ("system", "user", "assistant")[rng.randrange(3):]] for _ in range(200)]
    def reference(obj):
        data = json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]

    for messages in cases:
        assert records.content_hash(messages) == reference(messages)
        if messages and messages[-1]["role"] == "assistant" and any(m["role"] == "user" for m in messages):
            rec = records.make_record(messages, "s")
            assert (rec["id"], rec["prompt_id"]) == (reference(messages), reference(messages[:-1]))


@pytest.mark.parametrize("row,name,reason", [
    ({"instruction": "Q"}, "alpaca", "missing field 'output'"),
    ({"instruction": "Q", "output": "   "}, "alpaca", "empty field 'output'"),
    ({"instruction": "Q", "output": 3}, "alpaca", "field 'output' is int, expected text"),
    ({"question": None, "answer": "A"}, "qa", "missing field 'question'"),
    ({"messages": []}, "messages", "must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "Q"}]}, "messages", "last turn must be the assistant"),
    ({"messages": [{"role": "robot", "content": "Q"}, {"role": "assistant", "content": "A"}]},
     "messages", "messages[0].role is 'robot'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "A"}]},
     "messages", "messages[0].content is int"),
    ({"instruction": "Q", "outputs": ["a", 2]}, "pool_list", "outputs[1] is int"),
])
def test_bad_rows_name_the_field(row, name, reason):
    with pytest.raises(RowError, match=reason.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        adapt(row, ADAPTERS[name], {}, "s")


def test_non_object_row():
    with pytest.raises(RowError, match="row is list"):
        adapt([1, 2], ADAPTERS["qa"], {}, "s")


def test_detect_adapter():
    assert detect_adapter({"instruction": "", "input": "", "output": ""}, {}).name == "alpaca"
    assert detect_adapter({"question": "", "answer": ""}, {}).name == "qa"
    assert detect_adapter({"messages": []}, {}).name == "messages"
    assert detect_adapter({"instruction": "", "outputs": []}, {}).name == "pool_list"
    assert detect_adapter({"q": "", "a": ""}, {"question": "q", "answer": "a"}).name == "qa"
    assert detect_adapter({"text": ""}, {}) is None
    assert "alpaca (instruction, output)" in records.describe_shapes()
