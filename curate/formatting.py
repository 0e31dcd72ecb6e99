"""Turn an example into token ids with the response span marked.

One place for this so a score, a training loss and a trajectory all mean the same
thing: scorers, the trainer and every selector that needs a loss call `encode`.

Templates
- "plain" (GRAPE's paper template, the default): `Question: {prompt}\nAnswer: {response}`
- "chat": the tokenizer's own chat template over `messages`.

Prompt and response are tokenized separately and concatenated, so the response span is
exact (no boundary token shared between the two), and the tokenizer's EOS closes the
response: a model trained on these learns to stop, and a score includes stopping.
`include_eos=False` leaves the end out (plain: no EOS; chat: the template's tokens after
the response's text), for comparing with implementations that score the text alone.

Truncation policy (counted by `Encoded.truncated`): when prompt + response exceed
`max_length`, drop prompt tokens from the left, but keep at least
`min(prompt length, max_length // 2)` of them; then cut the response on the right.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAIN_PROMPT = "Question: {prompt}\nAnswer:"
PLAIN_RESPONSE = " {response}"
TEMPLATES = ("plain", "chat")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    prompt_len: int  # response tokens are input_ids[prompt_len:]
    truncated: bool

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.prompt_len


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
           include_eos: bool = True) -> Encoded:
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


def truncate(prompt_ids: list[int], response_ids: list[int], max_length: int) -> Encoded:
    if not prompt_ids:
        raise ValueError("empty prompt: the first response token would have no context")
    if len(prompt_ids) + len(response_ids) <= max_length:
        return Encoded(prompt_ids + response_ids, len(prompt_ids), False)
    keep_prompt = max(min(len(prompt_ids), max_length // 2), max_length - len(response_ids))
    keep_prompt = min(keep_prompt, len(prompt_ids))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
    response_ids = response_ids[: max_length - keep_prompt]
    return Encoded(prompt_ids + response_ids, len(prompt_ids), True)
