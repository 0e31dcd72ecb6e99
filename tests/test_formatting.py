from curate.formatting import encode, truncate


def test_plain_template_masks_exactly_the_prompt(tiny_lm):
    _, tok = tiny_lm
    rec = {"prompt": "What is two plus two?", "response": "Four.",
           "messages": [{"role": "user", "content": "What is two plus two?"},
                        {"role": "assistant", "content": "Four."}]}
    enc = encode(rec, tok, "plain")
    assert tok.decode(enc.input_ids[:enc.prompt_len]) == "Question: What is two plus two?\nAnswer:"
    assert tok.decode(enc.input_ids[enc.prompt_len:]) == " Four.<|endoftext|>"
    assert not enc.truncated


def test_chat_template_response_span(tiny_lm):
    _, tok = tiny_lm
    rec = {"prompt": "Hi", "response": "Hello",
           "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    enc = encode(rec, tok, "chat")
    assert tok.decode(enc.input_ids[:enc.prompt_len]).endswith("<|assistant|>")
    assert tok.decode(enc.input_ids[enc.prompt_len:]).startswith("<|assistant|>Hello") is False
    assert "Hello" in tok.decode(enc.input_ids[enc.prompt_len:])


def test_truncation_policy():
    # fits: untouched
    e = truncate([1, 2, 3], [4, 5], 8)
    assert (e.input_ids, e.prompt_len, e.truncated) == ([1, 2, 3, 4, 5], 3, False)
    # long prompt: cut from the left, keeping room for the whole response
    e = truncate(list(range(10)), [100, 101], 6)
    assert e.input_ids == [6, 7, 8, 9, 100, 101] and e.prompt_len == 4 and e.truncated
    # long response: the prompt keeps half the window, the response is cut on the right
    e = truncate([1, 2, 3, 4], list(range(100, 110)), 6)
    assert e.input_ids == [2, 3, 4, 100, 101, 102] and e.prompt_len == 3
    # a window of one token: the prompt's last token, no response token (a response token
    # first in the window would be counted in the loss, which nothing can predict it from)
    e = truncate([1, 2, 3], [4, 5], 1)
    assert e.input_ids == [3] and e.prompt_len == 1 and e.n_response == 0 and e.targets == []
