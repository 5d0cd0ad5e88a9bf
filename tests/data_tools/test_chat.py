import pytest

from data_tools.chat import (
    IGNORE_INDEX,
    render_prompt,
    tokenize_conversation,
    tokenize_prompt_completion,
    tokenize_row,
    validate_messages,
)
from data_tools.tokenizer import BOS_TOKEN, EOS_TOKEN, load_tokenizer

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "What is 17 + 25?"},
        {"role": "assistant", "content": "17 + 25 = 42. The answer is 42."},
        {"role": "user", "content": "And 42 * 3?"},
        {"role": "assistant", "content": "126"},
    ],
    [
        {"role": "user", "content": "  padded question  "},
        {"role": "assistant", "content": "  padded reply with trailing spaces   "},
        {"role": "user", "content": "multi\nline\n\ninput"},
        {"role": "assistant", "content": "line one\nline two\n\n"},
    ],
    [
        {"role": "user", "content": "Übersetze: ça va? 你好 ✓ 🙂"},
        {"role": "assistant", "content": "Ça va bien, merci! 你好 🙂"},
    ],
    [
        {"role": "system", "content": "Answer with code."},
        {"role": "user", "content": "Write add."},
        {"role": "assistant", "content": ":def add(a, b):\n    return a + b"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Thanks"},
    ],
    [
        {"role": "user", "content": "0123456789"},
        {"role": "assistant", "content": "9876543210"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ".!?"},
    ],
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def spans(labels: list[int]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


def test_template_renders_expected_string(tok):
    messages = CONVERSATIONS[0][:4]
    expected = (
        f"{BOS_TOKEN}You are a careful math tutor.\n\n"
        "User: What is 17 + 25?\n\n"
        f"Assistant: 17 + 25 = 42. The answer is 42.{EOS_TOKEN}"
        "User: And 42 * 3?\n\n"
        "Assistant:"
    )
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tok.encode(expected, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.eos_token_id) == 1
    assert render_prompt(tok, messages) == ids


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_assistant_mask_is_exactly_the_replies(tok, messages):
    ids, labels = tokenize_conversation(tok, messages)
    assert len(ids) == len(labels)
    assert ids == tok.apply_chat_template(messages, return_dict=False)
    replies = [(i, m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]
    found = spans(labels)
    assert len(found) == len(replies)
    for (start, end), (i, reply) in zip(found, replies, strict=True):
        prompt = render_prompt(tok, messages[:i])
        assert ids[: len(prompt)] == prompt and start == len(prompt)
        assert labels[start:end] == ids[start:end]
        assert ids[end - 1] == tok.eos_token_id
        assert tok.decode(ids[start:end]) == " " + reply + EOS_TOKEN
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == "".join(" " + r + EOS_TOKEN for _, r in replies)
    assert "Assistant:" not in tok.decode(trained)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_train_on_all_skips_only_bos(tok, messages):
    ids, labels = tokenize_conversation(tok, messages, train_on="all")
    assert ids[0] == tok.bos_token_id
    assert labels == [IGNORE_INDEX] + ids[1:]


def test_prefix_breaking_template_is_rejected():
    bad = load_tokenizer(
        "tiny",
        chat_template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError, match=r"row 3: .*not a prefix"):
        tokenize_conversation(bad, messages, where="row 3")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("User: hi", "row 7: expected a list of messages, got str"),
        ([], "row 7: the conversation is empty"),
        ([["user", "hi"]], "row 7: message 0 must be a dict"),
        ([{"role": "user"}], "row 7: message 0 has no 'content' field"),
        ([{"content": "hi"}], "row 7: message 0 has no 'role' field"),
        (
            [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}],
            "row 7: message 1 field 'role' is 'bot'; expected one of system, user, assistant",
        ),
        ([{"role": "user", "content": ["hi"]}], "row 7: message 0 field 'content' must be a string"),
    ],
)
def test_bad_messages_name_row_and_field(messages, match):
    with pytest.raises(ValueError, match=match):
        validate_messages(messages, where="row 7")


def test_bad_conversations_for_training(tok):
    with pytest.raises(ValueError, match="row 2: no assistant message"):
        tokenize_conversation(tok, [{"role": "user", "content": "hi"}], where="row 2")
    with pytest.raises(ValueError, match="row 2: message 0 is an assistant reply"):
        tokenize_conversation(tok, [{"role": "assistant", "content": "hi"}], where="row 2")
    with pytest.raises(ValueError, match="train_on is 'prompt'"):
        tokenize_conversation(tok, CONVERSATIONS[0], train_on="prompt")


def test_conversational_prompt_completion(tok):
    messages = CONVERSATIONS[0]
    ids, labels = tokenize_prompt_completion(tok, messages[:-1], messages[-1:])
    assert ids == tokenize_conversation(tok, messages)[0]
    prompt = render_prompt(tok, messages[:-1])
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert tok.decode(labels[len(prompt) :]) == " 126" + EOS_TOKEN
    assert tokenize_prompt_completion(tok, messages[:-1], messages[-1:], train_on="all")[1][1:] == ids[1:]


def test_text_prompt_completion(tok):
    ids, labels = tokenize_prompt_completion(tok, "Q: 2 + 3 =", " 5")
    prompt = render_prompt(tok, "Q: 2 + 3 =")
    assert prompt[0] == tok.bos_token_id and ids[: len(prompt)] == prompt
    assert tok.decode(ids) == BOS_TOKEN + "Q: 2 + 3 = 5" + EOS_TOKEN
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == " 5" + EOS_TOKEN
    assert tokenize_prompt_completion(tok, "Q: 2 + 3 =", " 5" + EOS_TOKEN) == (ids, labels)


def test_bad_prompt_completion(tok):
    with pytest.raises(ValueError, match="row 4: 'prompt' and 'completion' must both be"):
        tokenize_prompt_completion(tok, "hi", [{"role": "assistant", "content": "x"}], where="row 4")
    with pytest.raises(ValueError, match="row 4: 'completion' must hold exactly one assistant message"):
        tokenize_prompt_completion(tok, CONVERSATIONS[0][:2], CONVERSATIONS[0][1:3], where="row 4")
    with pytest.raises(ValueError, match=r"row 4 'prompt': message 0 field 'role'"):
        tokenize_prompt_completion(
            tok, [{"role": "human", "content": "x"}], [{"role": "assistant", "content": "y"}], where="row 4"
        )
    with pytest.raises(ValueError, match="row 4: the tokens of the prompt are not a prefix"):
        tokenize_prompt_completion(tok, "The answ", "er is", where="row 4")


def test_tokenize_row_dispatch(tok):
    messages = CONVERSATIONS[2]
    assert tokenize_row(tok, {"messages": messages}) == tokenize_conversation(tok, messages)
    pc = {"prompt": messages[:1], "completion": messages[1:]}
    assert tokenize_row(tok, pc) == tokenize_conversation(tok, messages)
    assert tokenize_row(tok, pc, train_on="all") == tokenize_conversation(tok, messages, train_on="all")
    ids, labels = tokenize_row(tok, {"text": "1 + 1 = 2"})
    assert tok.decode(ids) == BOS_TOKEN + "1 + 1 = 2" + EOS_TOKEN and labels == [IGNORE_INDEX] + ids[1:]
    with pytest.raises(ValueError, match=r"row 9: expected a 'messages' column.*\['question'\]"):
        tokenize_row(tok, {"question": "x"}, where="row 9")
