"""batchllm.tokenizer: encode/decode, chat template, incremental detokenization, stop strings."""
from __future__ import annotations

import pytest

from batchllm.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError, find_stop_string

TEXT = "Hello the world,\n\n  héllo 日本語 🎉 end"


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    return Tokenizer.load(tiny_model_dir)


def test_encode_decode_round_trip_with_bos(tok):
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_token_id == 1
    assert tok.encode(TEXT, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + TEXT
    assert tok.eos_token_id == 2
    assert tok.vocab_size == 6 + 256 + 12  # specials + bytes + merges of tests/tiny_models.py


def test_chat_template_formats_the_conversation(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS, not a second one from encode
    no_prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert tok.decode(no_prompt, skip_special_tokens=False).endswith("hi<|im_end|>\n")


def test_system_prompt_is_added_once(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], system_prompt="Be brief.")
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n")
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}]
    text = tok.decode(tok.apply_chat_template(own, system_prompt="Be brief."), skip_special_tokens=False)
    assert "Mine." in text and "Be brief." not in text


def test_missing_chat_template_is_a_clear_error(tiny_model_dir):
    bare = Tokenizer.load(tiny_model_dir)
    bare.hf.chat_template = None
    with pytest.raises(TokenizerError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_incremental_text_equals_full_decode_one_token_at_a_time(tok):
    prompt = tok.encode("Say: é")
    out = tok.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.append([t]) for t in out]
    assert "".join(deltas) == tok.decode(out)
    assert not any("\ufffd" in d for d in deltas)


def test_a_character_split_across_tokens_is_emitted_whole(tok):
    out = tok.encode(" 日", add_special_tokens=False)
    assert len(out) == 4  # space + three UTF-8 bytes, one token each in the byte-level vocab
    detok = IncrementalDetokenizer(tok, tok.encode("x"))
    assert [detok.append([t]) for t in out] == [" ", "", "", "日"]


def test_special_tokens_are_skipped_unless_asked(tok):
    out = tok.encode("ok", add_special_tokens=False) + [tok.eos_token_id]
    skip = IncrementalDetokenizer(tok, [1])
    keep = IncrementalDetokenizer(tok, [1], skip_special_tokens=False)
    assert "".join(skip.append([t]) for t in out) == "ok"
    assert "".join(keep.append([t]) for t in out) == "ok</s>"


def test_flush_returns_a_trailing_incomplete_character(tok):
    detok = IncrementalDetokenizer(tok, [1])
    first_byte = tok.encode("日", add_special_tokens=False)[0]
    assert detok.append([first_byte]) == ""
    assert detok.flush() == tok.decode([first_byte]) == "\ufffd"


@pytest.mark.parametrize("text, stop, include, expected", [
    ("Hello world. Bye", ["."], False, ("Hello world", ".")),
    ("Hello world. Bye", ["."], True, ("Hello world.", ".")),
    ("a STOP b END c", ["END", "STOP"], False, ("a ", "STOP")),  # earliest match wins
    ("no match here", ["xyz"], False, ("no match here", None)),
    ("anything", [], False, ("anything", None)),
])
def test_find_stop_string(text, stop, include, expected):
    assert find_stop_string(text, stop, include_stop_str_in_output=include) == expected


def test_stop_string_split_across_deltas_is_found_with_new_text_len():
    # "</answer>" arrives as "...</ans" then "wer> tail": the match straddles the two deltas
    text = "result: 42</answer> tail"
    assert find_stop_string(text, ["</answer>"], new_text_len=len("wer> tail")) == ("result: 42", "</answer>")
    # a match that lies wholly in text checked before is not reported again
    assert find_stop_string("a.b" + "c" * 20, ["."], new_text_len=5) == ("a.b" + "c" * 20, None)


@pytest.mark.slow
def test_smollm2_tokenizer_chat_and_detokenization(smollm2_dir):
    tok = Tokenizer.load(smollm2_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    out = tok.encode("Paris — 日本語 🎉  spaced", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, ids)
    assert "".join(detok.append([t]) for t in out) == tok.decode(out)
