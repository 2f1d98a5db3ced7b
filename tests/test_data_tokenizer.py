"""World tokenizer == the `rwkv` package's TRIE_TOKENIZER; the HF tokenizer.json path."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from rwkv_peft.data.tokenizer import WorldTokenizer, get_tokenizer, world_vocab_path

MIXED = [
    "The quick brown fox jumps over the lazy dog. It's 3.14159!",
    "中文分词测试：我们今天去北京天安门。日本語もテストします。한국어도요.",
    "emoji 🤗🚀👨‍👩‍👧‍👦 flags 🇫🇷 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥² ≤ ∞",
    "def f(x):\n\treturn {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "    \t\t  \n\n\n\n    trailing   \r\n\r\n" + " " * 40 + "\t" * 9,
    "mixed: café Ñandú — “quotes” «guillemets» \x00\x01\x7f control",
    "",
    " ",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" * 3,
]


@pytest.fixture(scope="module")
def reference():
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    return rwkv_tokenizer.TRIE_TOKENIZER(world_vocab_path())


def test_world_equals_rwkv_on_mixed_text(reference):
    tok = get_tokenizer("world")
    assert tok.compiled, "the C trie should build here (cc is available)"
    assert tok.vocab_size == 65536
    for text in MIXED + ["\n\n".join(MIXED)]:
        want = reference.encode(text)
        assert tok.encode(text) == want, text
        assert tok.encode_array(text).tolist() == want
        assert tok.decode(want) == text
    ids, sizes = tok.encode_documents(MIXED, eod=0)
    want = [i for t in MIXED for i in reference.encode(t) + [0]]
    assert ids.tolist() == want and sizes.tolist() == [len(reference.encode(t)) + 1 for t in MIXED]


def test_python_fallback_equals_rwkv(reference):
    """The no-compiler path gives the same tokens (used where cc is missing)."""
    tok = WorldTokenizer(use_c=False)
    assert not tok.compiled
    text = "\n\n".join(MIXED)
    assert tok.encode(text) == reference.encode(text)
    ids, sizes = tok.encode_documents(MIXED[:3])
    assert sizes.sum() == len(ids) and ids[sizes[0] - 1] == 0


def test_world_tokenizer_pickles():
    tok = pickle.loads(pickle.dumps(get_tokenizer("world")))
    assert tok.compiled
    assert tok.encode("hello world") == get_tokenizer("world").encode("hello world")


def test_vocab_file_errors(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("1 'a' 1\n2 'bc' 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.txt:2: expected"):
        WorldTokenizer(str(bad))


def hf_tokenizer_json(path) -> str:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "foo": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_json(tmp_path):
    tok = get_tokenizer(hf_tokenizer_json(tmp_path / "tokenizer.json"))
    assert tok.vocab_size == 4
    assert tok.encode("hello foo world bar") == [1, 3, 2, 0]
    ids, sizes = tok.encode_documents(["hello", "world foo"], eod=0)
    assert ids.tolist() == [1, 0, 2, 3, 0] and sizes.tolist() == [2, 3]
    assert np.array_equal(pickle.loads(pickle.dumps(tok)).encode_array("foo"), [3])
    with pytest.raises(FileNotFoundError, match="nope.json: tokenizer file not found"):
        get_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a Hugging Face tokenizer.json"):
        get_tokenizer(str(tmp_path / "bad.json"))
