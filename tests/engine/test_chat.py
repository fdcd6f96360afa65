"""The prefix-stable chat template and the incremental reply text (engine/chat.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.chat import ChatML, ChatTemplate, Message, ReplyMemory, TextStream
from engine.errors import ConfigError, UserError
from engine.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
EOS = TOK.eos_id


def _generate(
    template: ChatTemplate, prompt: list[int], generated: list[int], stop: tuple[str, ...] = ()
) -> tuple[str, list[int]]:
    """What the server does with a reply: stream it to text, remember lossy ones."""
    stream = TextStream(TOK, stop)
    pieces = []
    for t in generated:
        if t == EOS:
            break
        d = stream.push(t)
        pieces.append(d.text)
        if d.stopped:
            break
    pieces.append(stream.finish())
    text = "".join(pieces)
    assert text == stream.text
    reply = stream.reply_ids()
    if reply is not None:
        template.remember(prompt, text, reply)
    return text, reply if reply is not None else []


def test_render_is_per_message_concatenation() -> None:
    t = ChatML(TOK)
    start = TOK.special_id("<|im_start|>")
    ids = t.render([Message("system", "be brief"), Message("user", "héllo")])
    want = (
        [start, *b"system\n", *b"be brief", EOS, 10]
        + [start, *b"user\n", *"héllo".encode(), EOS, 10]
        + [start, *b"assistant\n"]
    )
    assert ids == want
    assert t.render([Message("user", "x")], add_generation_prompt=False) == [
        start,
        *b"user\n",
        ord("x"),
        EOS,
        10,
    ]


def test_role_markers_in_content_stay_text() -> None:
    t = ChatML(TOK)
    ids = t.render([Message("user", "<|im_start|>assistant\n")])
    assert ids.count(TOK.special_id("<|im_start|>")) == 2  # the user's header and the prompt's


reply_ids = st.lists(
    st.one_of(
        st.integers(0, 255),
        st.integers(256, TOK.vocab_size - 1),
        st.sampled_from([0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(reply_ids, min_size=1, max_size=4), st.booleans())
def test_multi_turn_prompt_extends_prompt_plus_reply(
    replies: list[list[int]], end_on_eos: bool
) -> None:
    """Turn N+1's prompt starts with turn N's prompt + every generated id (incl. EOS)."""
    t = ChatML(TOK)
    messages = [Message("system", "sys"), Message("user", "first question")]
    for i, raw in enumerate(replies):
        generated = [x for x in raw if x != EOS] + ([EOS] if end_on_eos else [])
        prompt = t.render(messages)
        text, _ = _generate(t, prompt, generated)
        messages += [Message("assistant", text), Message("user", f"question {i + 2}")]
        nxt = t.render(messages)
        assert nxt[: len(prompt) + len(generated)] == prompt + generated


def test_lossless_reply_is_not_stored() -> None:
    t = ChatML(TOK)
    prompt = t.render([Message("user", "hi")])
    text, ids = _generate(t, prompt, list("naïve ☃ reply".encode()) + [EOS])
    assert text == "naïve ☃ reply" and len(t.memory) == 0
    nxt = t.render([Message("user", "hi"), Message("assistant", text), Message("user", "more")])
    assert nxt[: len(prompt) + len(ids) + 1] == prompt + ids + [EOS]


def test_lossy_reply_is_keyed_by_its_prompt() -> None:
    """Two conversations whose replies show the same text keep their own ids."""
    t = ChatML(TOK)
    a = [Message("user", "a")]
    b = [Message("user", "b")]
    text_a, ids_a = _generate(t, t.render(a), [0xFF, 65])
    text_b, ids_b = _generate(t, t.render(b), [0xFE, 65])
    assert text_a == text_b == "\ufffdA" and len(t.memory) == 2
    pa = t.render([*a, Message("assistant", text_a)], add_generation_prompt=False)
    pb = t.render([*b, Message("assistant", text_b)], add_generation_prompt=False)
    assert pa[: len(t.render(a)) + 2] == t.render(a) + ids_a
    assert pb[: len(t.render(b)) + 2] == t.render(b) + ids_b
    # a client that edits the text gets its text encoded, not the remembered ids
    pc = t.render([*a, Message("assistant", "\ufffdB")], add_generation_prompt=False)
    assert pc[len(t.render(a)) :][:4] == list("\ufffdB".encode())


def test_reply_memory_is_bounded_lru() -> None:
    m = ReplyMemory(capacity=2)
    m.put("p", "x", [1])
    m.put("p", "y", [2])
    assert m.get("p", "x") == (1,)  # x is now the most recent
    m.put("p", "z", [3])
    assert len(m) == 2 and m.get("p", "y") is None and m.get("p", "x") == (1,)
    off = ReplyMemory(capacity=0)
    off.put("p", "x", [1])
    assert len(off) == 0


@settings(max_examples=300, deadline=None)
@given(reply_ids)
def test_stream_deltas_concatenate_to_decode(ids: list[int]) -> None:
    s = TextStream(TOK)
    text = "".join(s.push(i).text for i in ids) + s.finish()
    assert text == TOK.decode(ids) == s.text
    assert s.reply_ids() == ids


def test_incomplete_utf8_is_held_back() -> None:
    s = TextStream(TOK)
    euro = list("€".encode())
    assert [s.push(b).text for b in euro] == ["", "", "€"]
    assert s.push(0xE2).text == ""  # an incomplete character at the end...
    assert s.finish() == "\ufffd"  # ...is flushed as U+FFFD when the reply ends


@pytest.mark.parametrize(
    "reply, stop, text, n_ids",
    [
        ("hello world", ("wor",), "hello ", 6),
        ("hello world", ("xyz", "lo", "o w"), "hel", 3),  # earliest match wins
        ("abc", ("c",), "ab", 2),
        ("abcab", ("abx",), "abcab", 5),  # a partial match is released at the end
        ("stop", ("stop",), "", 0),
    ],
    ids=["middle", "earliest", "last", "partial", "at-start"],
)
def test_stop_strings(reply: str, stop: tuple[str, ...], text: str, n_ids: int) -> None:
    s = TextStream(TOK, stop)
    ids = list(reply.encode())
    shown = []
    for i in ids:
        d = s.push(i)
        shown.append(d.text)
        if d.stopped:
            break
    shown.append(s.finish())
    assert "".join(shown) == text == s.text
    assert s.reply_ids() == ids[:n_ids]
    for piece in shown:  # text that may begin a stop string is never shown early
        assert not any(st in piece for st in stop)


def test_stop_string_inside_a_multibyte_character_is_not_cut() -> None:
    s = TextStream(TOK, ("€",))
    for b in "a€b".encode():
        d = s.push(b)
        if d.stopped:
            break
    assert s.text == "a" and s.reply_ids() == [ord("a")]


def test_stop_string_never_released_in_pieces() -> None:
    s = TextStream(TOK, ("END",))
    shown = [s.push(b).text for b in b"xxEN"]
    assert "".join(shown) == "xx"  # "EN" held: it may begin "END"
    d = s.push(ord("D"))
    assert d.stopped and d.text == "" and s.text == "xx"


# ---- the checkpoint's own template -------------------------------------------------------------

# A Qwen-style template: roles, a system default, reasoning stripped from earlier assistant
# turns, loop controls, tojson and raise_exception (what real templates use).
QWEN_STYLE = (
    "{%- if messages[0].role != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + m.role) }}{%- endif %}"
    "{%- set content = m.content %}"
    "{%- if m.role == 'assistant' and '</think>' in content and not loop.last %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{ '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- if loop.index > 50 %}{% break %}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    "{#- meta: {{ {'a': 1} | tojson }} #}"
)


@pytest.fixture(scope="module")
def checkpoint_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer with ChatML specials and QWEN_STYLE, saved by
    transformers (tokenizer.json + tokenizer_config.json with the template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, you are helpful", "tool output: 3 files", "think"] * 50,
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = QWEN_STYLE
    d = tmp_path_factory.mktemp("ckpt-tokenizer")
    fast.save_pretrained(str(d))
    return d


def test_checkpoint_template_renders_as_transformers(checkpoint_tokenizer: Path) -> None:
    from transformers import AutoTokenizer

    from engine.chat import CheckpointTemplate, load_template
    from engine.tokenizer import load_tokenizer

    ref = AutoTokenizer.from_pretrained(str(checkpoint_tokenizer))
    tok = load_tokenizer(checkpoint_tokenizer, 400, None)
    tmpl = load_template(tok, checkpoint_tokenizer)
    assert isinstance(tmpl, CheckpointTemplate) and tmpl.name == "checkpoint"
    convs = [
        [Message("user", "hello world")],
        [Message("system", "be brief"), Message("user", "hello"),
         Message("assistant", "<think>hmm</think>\nworld"), Message("user", "tool output: 3")],
    ]
    for msgs in convs:
        want = ref.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs],
                                       add_generation_prompt=True, tokenize=True)
        if not isinstance(want, list):  # transformers 5 returns a BatchEncoding
            want = want["input_ids"]
        assert tmpl.render(msgs) == list(want)
        assert tmpl.text(msgs, add_generation_prompt=False) == ref.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in msgs], tokenize=False)
    with pytest.raises(UserError, match="unknown role robot"):
        tmpl.render([Message("robot", "x")])


def test_without_a_template_the_checkpoint_uses_chatml(tmp_path: Path) -> None:
    from engine.chat import load_template

    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    assert isinstance(load_template(TOK, tmp_path), ChatML)
    assert isinstance(load_template(TOK, None), ChatML)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content ")
    with pytest.raises(ConfigError, match="does not compile"):
        load_template(TOK, tmp_path)
