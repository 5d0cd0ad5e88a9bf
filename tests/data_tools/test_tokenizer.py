import json

import pytest

from data_tools.build_tiny_tokenizer import build
from data_tools.tokenizer import (
    BOS_TOKEN,
    DEEPSEEK_V2_CHAT_TEMPLATE,
    EOS_TOKEN,
    TINY_TOKENIZER_DIR,
    load_tokenizer,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Thanks ✓"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_tiny_special_tokens_and_template(tok):
    assert tok.bos_token == BOS_TOKEN == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    assert tok.eos_token == EOS_TOKEN == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok.chat_template == DEEPSEEK_V2_CHAT_TEMPLATE
    assert 512 <= len(tok) <= 1024
    assert tok("hello there")["input_ids"][0] != tok.bos_token_id
    assert tok.encode(BOS_TOKEN + "hi", add_special_tokens=False)[0] == tok.bos_token_id


def test_tiny_digits_are_single_tokens(tok):
    ids = tok.encode("x = 1234567890 + 98", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("123456789098")
    assert tok.decode(ids) == "x = 1234567890 + 98"


def test_tiny_roundtrips_text(tok):
    for text in ["  leading and trailing  ", "a\n\nb\tc", "héllo wörld ✓ 你好", "def f(x):\n    return x"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_assets_are_small_and_reproducible(tmp_path):
    sizes = {p.name: p.stat().st_size for p in TINY_TOKENIZER_DIR.iterdir()}
    assert set(sizes) == {"tokenizer.json", "tokenizer_config.json"}
    assert sum(sizes.values()) < 200_000
    build(tmp_path)
    for name in sizes:
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name
    config = json.loads((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is False and config["chat_template"] == DEEPSEEK_V2_CHAT_TEMPLATE


@pytest.mark.parametrize("jinja", [True, False])
def test_save_pretrained_roundtrip(tok, tmp_path, jinja):
    tok.save_pretrained(str(tmp_path), save_jinja_files=jinja)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == DEEPSEEK_V2_CHAT_TEMPLATE
    for generation in (False, True):
        kwargs = {"add_generation_prompt": generation, "return_dict": False}
        assert loaded.apply_chat_template(CHAT, **kwargs) == tok.apply_chat_template(CHAT, **kwargs)
    text = "User: 7 * 6 = 42 ✓"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.bos_token_id, loaded.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)


def test_tiny_by_name():
    assert load_tokenizer("tiny").name_or_path == load_tokenizer(None).name_or_path


def test_missing_directory(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer.*does not exist"):
        load_tokenizer(str(missing))


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files.*tokenizer\.json"):
        load_tokenizer(str(tmp_path))


def test_missing_chat_template_and_override(tok, tmp_path):
    plain = load_tokenizer()
    plain.chat_template = None
    plain.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no chat_template"):
        load_tokenizer(str(tmp_path))
    fixed = load_tokenizer(str(tmp_path), chat_template=DEEPSEEK_V2_CHAT_TEMPLATE)
    expected = tok.apply_chat_template(CHAT, return_dict=False)
    assert fixed.apply_chat_template(CHAT, return_dict=False) == expected
