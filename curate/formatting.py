"""Turn an example into token ids with the response span marked.

One place for this so a score, a training loss and a trajectory all mean the same
thing: scorers, the trainer and every selector that needs a loss call `encode`.

Templates
- "plain" (GRAPE's paper template, the default): `Question: {prompt}\nAnswer: {response}`.
  Single-turn: a conversation's earlier turns are the prompt (as "role: content" lines)
  and only its last assistant turn is the response (a warning says so once).
- "chat": the tokenizer's own chat template over `messages`. `turns` says which assistant
  turns carry the loss: "all" (default: every assistant turn of a multi-turn
  conversation, each with the template's end-of-turn tokens) or "last" (the last one; the
  earlier turns are context), as LLaMA-Factory's `mask_history` does. A turn's tokens are
  cut where the template renders the conversation up to the turn before it, with the
  generation prompt: the span is the assistant's text and its end-of-turn, nothing else.

Prompt and response are tokenized separately and concatenated, so the response span is
exact (no boundary token shared between the two), and the tokenizer's EOS closes the
response: a model trained on these learns to stop, and a score includes stopping.
`include_eos=False` leaves the end out (plain: no EOS; chat: the template's tokens after
the response's text), for comparing with implementations that score the text alone.

Truncation policy (counted by `Encoded.truncated`): when prompt + response exceed
`max_length`, drop prompt tokens from the left, but keep at least
`min(prompt length, max_length // 2)` of them; then cut the response on the right. The
"prompt" is everything before the last assistant turn (earlier assistant turns lose
their left part first, with the rest of the conversation's start).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

PLAIN_PROMPT = "Question: {prompt}\nAnswer:"
PLAIN_RESPONSE = " {response}"
TEMPLATES = ("plain", "chat")
TURNS = ("all", "last")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    prompt_len: int  # the last response's tokens are input_ids[prompt_len:]
    truncated: bool
    # (start, end) token ranges that carry the loss; empty: the one range (prompt_len, len)
    spans: tuple[tuple[int, int], ...] = ()

    @property
    def loss_spans(self) -> tuple[tuple[int, int], ...]:
        return self.spans or ((self.prompt_len, len(self.input_ids)),)

    @property
    def targets(self) -> list[int]:
        """Positions of the tokens that carry the loss (each predicted from the one before)."""
        return [t for a, b in self.loss_spans for t in range(a, b)]

    @property
    def n_response(self) -> int:
        return sum(b - a for a, b in self.loss_spans)


def assistant_turns(record: dict) -> int:
    """Assistant turns of a record; a bare {prompt, response} one has one."""
    messages = record.get("messages")
    return sum(m["role"] == "assistant" for m in messages) if messages else 1


def split_text(record: dict, tokenizer, template: str = "plain",
               include_eos: bool = True) -> tuple[str, str]:
    """(prompt text, response text) as the model sees them."""
    if template == "plain":
        return (PLAIN_PROMPT.format(prompt=record["prompt"]),
                PLAIN_RESPONSE.format(response=record["response"]))
    if template == "chat":
        messages = [dict(m) for m in record["messages"]]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix of the "
                             "conversation; use template: plain")
        response = full[len(prompt):]
        if not include_eos:  # cut the template's end-of-turn tokens after the text
            end = response.rfind(messages[-1]["content"])
            if end < 0:
                raise ValueError("the chat template does not render the response's text as is; "
                                 "use include_eos: true or template: plain")
            response = response[:end + len(messages[-1]["content"])]
        return prompt, response
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def encode(record: dict, tokenizer, template: str = "plain", max_length: int = 2048,
           include_eos: bool = True, turns: str = "all") -> Encoded:
    if turns not in TURNS:
        raise ValueError(f"turns: {turns!r}, expected one of {TURNS}")
    if template == "chat" and turns == "all" and assistant_turns(record) > 1:
        return _encode_turns(record, tokenizer, max_length, include_eos)
    if template == "plain" and assistant_turns(record) > 1:
        _warn_plain_multi_turn()
    prompt_text, response_text = split_text(record, tokenizer, template, include_eos)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if template == "plain":
        bos = tokenizer.bos_token_id
        if bos is not None and getattr(tokenizer, "add_bos_token", False):
            prompt_ids = [bos] + prompt_ids
        if include_eos and tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
    return truncate(prompt_ids, response_ids, max_length)


_warned_plain = False


def _warn_plain_multi_turn() -> None:
    global _warned_plain
    if not _warned_plain:
        _warned_plain = True
        log.warning("template plain is single-turn: a multi-turn conversation is scored and trained "
                    "on its last assistant turn only, its earlier turns are the prompt; use template: "
                    "chat for the loss on every assistant turn")


def _encode_turns(record: dict, tokenizer, max_length: int, include_eos: bool) -> Encoded:
    """Chat template over the whole conversation, a loss span per assistant turn."""
    messages = [dict(m) for m in record["messages"]]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    ids: list[int] = []
    spans = []
    done = 0  # characters of `full` already tokenized
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) >= done):
            raise ValueError("the chat template does not render each turn as a prefix of the "
                             "conversation; use turns: last or template: plain")
        turn = through[len(before):]
        if not include_eos:
            end = turn.rfind(m["content"])
            if end < 0:
                raise ValueError("the chat template does not render the response's text as is; "
                                 "use include_eos: true or template: plain")
            turn = turn[:end + len(m["content"])]
        ids += tokenizer(full[done:len(before)], add_special_tokens=False)["input_ids"]
        turn_ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
        spans.append((len(ids), len(ids) + len(turn_ids)))
        ids += turn_ids
        done = len(before) + len(turn)
    prompt_len = spans[-1][0]
    return truncate(ids[:prompt_len], ids[prompt_len:], max_length, spans=tuple(spans))


def truncate(prompt_ids: list[int], response_ids: list[int], max_length: int,
             spans: tuple[tuple[int, int], ...] = ()) -> Encoded:
    """`spans`: loss ranges over prompt + response, the last one the response's; they are
    shifted and clipped with the tokens (a range left empty is dropped)."""
    if not prompt_ids:
        raise ValueError("empty prompt: the first response token would have no context")
    if len(prompt_ids) + len(response_ids) <= max_length:
        return Encoded(prompt_ids + response_ids, len(prompt_ids), False, spans)
    # at least one prompt token, even in a window of one: the first token cannot carry the
    # loss (see below), so there the response is cut off entirely rather than unreachable
    keep_prompt = max(min(len(prompt_ids), max(max_length // 2, 1)), max_length - len(response_ids))
    keep_prompt = min(keep_prompt, len(prompt_ids))
    drop = len(prompt_ids) - keep_prompt
    prompt_ids = prompt_ids[drop:]
    response_ids = response_ids[: max_length - keep_prompt]
    end = len(prompt_ids) + len(response_ids)
    # the first token has nothing before it to predict it from
    clipped = tuple((max(a - drop, 1), min(b - drop, end)) for a, b in spans)
    return Encoded(prompt_ids + response_ids, len(prompt_ids), True,
                   tuple((a, b) for a, b in clipped if a < b))
