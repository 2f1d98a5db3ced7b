"""Samplers (get / pad / sft), loss masks, determinism, ranks, jsonl handling, demo set."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch
from helpers import write_jsonl

from rwkv_peft.data import DEFAULT_SFT_TEMPLATE, build_dataset, get_tokenizer, render_sft
from rwkv_peft.data.binidx import BinIdx, BinIdxWriter
from rwkv_peft.data.dataset import is_magic_prime, largest_magic_prime, permute
from rwkv_peft.data.demo import generate, write_demo
from rwkv_peft.data.make_binidx import main as make_binidx_main

V = 65536


def samples(ds, n=None) -> list[list[int]]:
    return [ds[i]["input_ids"].tolist() for i in range(n or len(ds))]


@pytest.fixture
def stream_prefix(tmp_path) -> str:
    """binidx of 40 documents of 2..11 tokens; every token encodes (doc, position)."""
    prefix = str(tmp_path / "s")
    with BinIdxWriter(prefix) as w:
        for d in range(40):
            w.add_document([d * 100 + j + 1 for j in range(d % 10 + 1)] + [0])
    return prefix


def test_permute_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 1025):
        assert sorted(permute(i, n, 12345) for i in range(n)) == list(range(n))
    assert [permute(i, 1000, 1) for i in range(20)] != [permute(i, 1000, 2) for i in range(20)]


def test_get_windows_deterministic_and_rank_distinct(stream_prefix):
    kw = dict(data_type="binidx", dataload="get", ctx_len=8, vocab_size=V,
              samples_per_epoch=16, seed=3)
    r0 = build_dataset(stream_prefix, rank=0, world_size=2, **kw)
    r1 = build_dataset(stream_prefix + ".bin", rank=1, world_size=2, **kw)
    assert len(r0) == 16
    s = r0[5]
    assert s["input_ids"].dtype == torch.long and s["mask"].dtype == torch.float32
    assert s["input_ids"].shape == s["targets"].shape == s["mask"].shape == (8,)
    assert torch.equal(s["input_ids"][1:], s["targets"][:-1]) and s["mask"].sum() == 8
    tokens = BinIdx(stream_prefix).tokens
    st = r0.start_of(5)
    assert s["input_ids"].tolist() == tokens[st : st + 8].tolist()
    assert samples(r0) != samples(r1)
    # resume: a fresh data set at the same (epoch, index) gives the same sample
    again = build_dataset(stream_prefix, rank=0, world_size=2, **kw)
    r0.set_epoch(2)
    again.set_epoch(2)
    assert samples(r0, 4) == samples(again, 4)
    again.set_epoch(0)
    assert samples(r0, 4) != samples(again, 4)
    # DataLoader workers get the data set pickled: by path, not by content
    blob = pickle.dumps(r0)
    assert len(blob) < 2000 and samples(pickle.loads(blob), 4) == samples(r0, 4)


def test_get_magic_prime_covers_every_window(stream_prefix):
    n_tok = BinIdx(stream_prefix).num_tokens  # 260
    p = 23  # prime, 23 % 3 == 2, 23 * 10 + 1 <= 260
    assert is_magic_prime(p) and not is_magic_prime(19) and not is_magic_prime(25)
    starts = []
    for rank in range(2):
        ds = build_dataset(stream_prefix, "binidx", "get", ctx_len=10, vocab_size=V,
                           samples_per_epoch=12, seed=0, rank=rank, world_size=2,
                           magic_prime=p)
        starts += [ds.start_of(i) for i in range(12)]
    # 24 global samples: ii = 1..24 covers every residue mod 23 once, plus ii = 23 -> 0
    assert sorted(set(starts)) == [k * 10 for k in range(p)]
    assert largest_magic_prime(n_tok, 10) == p
    with pytest.raises(ValueError, match=r"--magic_prime 19: expected a prime p with p % 3 == 2 "
                                         r"\(for .*s\.bin: 23\)"):
        build_dataset(stream_prefix, "binidx", "get", ctx_len=10, vocab_size=V,
                      samples_per_epoch=4, seed=0, magic_prime=19)
    with pytest.raises(ValueError, match=r"--magic_prime 29: too large .* <= 260; use 23"):
        build_dataset(stream_prefix, "binidx", "get", ctx_len=10, vocab_size=V,
                      samples_per_epoch=4, seed=0, magic_prime=29)
    assert n_tok == 260


def test_get_ctx_len_longer_than_data(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}, {"text": "yo"}])
    with pytest.raises(ValueError, match=r"t\.jsonl: 4 tokens in all, longest document 2; "
                                         r"dataload 'get' needs at least ctx_len\+1 = 65"):
        build_dataset(path, "jsonl", "get", ctx_len=64, vocab_size=V, samples_per_epoch=4,
                      seed=0)


def test_pad_masks_padding_and_covers_documents(stream_prefix):
    kw = dict(data_type="binidx", dataload="pad", ctx_len=6, vocab_size=V,
              samples_per_epoch=20, seed=1, world_size=2)
    ranks = [build_dataset(stream_prefix, rank=r, **kw) for r in range(2)]
    reader = BinIdx(stream_prefix)
    seen = []
    for ds in ranks:
        for i in range(len(ds)):
            d = ds.doc_of(i)
            seen.append(d)
            doc = reader[d].tolist()[:7]
            s = ds[i]
            n = len(doc) - 1
            assert s["input_ids"][:n].tolist() == doc[:-1]
            assert s["targets"][:n].tolist() == doc[1:]
            assert s["mask"].tolist() == [1.0] * n + [0.0] * (6 - n)  # padding carries no loss
            assert s["input_ids"][n:].eq(0).all() and s["targets"][n:].eq(0).all()
    # 2 ranks x 20 samples = one pass over the 40 documents, each exactly once
    assert sorted(seen) == list(range(40))
    assert samples(ranks[0]) != samples(ranks[1])


def test_jsonl_bad_lines_skipped_counted_or_strict(tmp_path, capsys):
    rows = [{"text": "good one"}, "not json {", {"txt": "wrong field"}, {"text": ""},
            {"text": 5}, "[1, 2]", "", {"text": "good two"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = build_dataset(path, "jsonl", "pad", ctx_len=16, vocab_size=V, samples_per_epoch=4,
                       seed=0)
    assert len(ds.docs) == 2
    summary = capsys.readouterr().err
    for part in ["2 documents", "skipped 5 lines", "1 not JSON (first at line 2)",
                 "1 missing field 'text' (first at line 3)", "1 empty document (first at line 4)",
                 "1 field 'text' not a string (first at line 5)", "1 not a JSON object"]:
        assert part in summary, summary
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not JSON"):
        build_dataset(path, "jsonl", "pad", ctx_len=16, vocab_size=V, samples_per_epoch=4,
                      seed=0, strict=True)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, "oops"])
    with pytest.raises(ValueError, match=r"e\.jsonl: no usable documents .* 1 empty document"):
        build_dataset(empty, "jsonl", "get", ctx_len=4, vocab_size=V, samples_per_epoch=4,
                      seed=0)
    with pytest.raises(FileNotFoundError, match="missing.jsonl: jsonl file not found"):
        build_dataset(str(tmp_path / "missing.jsonl"), "jsonl", "pad", ctx_len=4,
                      vocab_size=V, samples_per_epoch=4, seed=0)


def test_jsonl_token_id_outside_vocab(tmp_path):
    path = write_jsonl(tmp_path / "v.jsonl", [{"text": "a"}, {"text": "中文 🤗"}])
    with pytest.raises(ValueError, match=r"v\.jsonl:2: token id \d+ >= model vocab_size 1000"):
        build_dataset(path, "jsonl", "pad", ctx_len=8, vocab_size=1000, samples_per_epoch=2,
                      seed=0)


def test_bad_flags(tmp_path, stream_prefix):
    kw = dict(ctx_len=8, vocab_size=V, samples_per_epoch=2, seed=0)
    with pytest.raises(ValueError, match="--data_type 'csv'"):
        build_dataset(stream_prefix, "csv", "get", **kw)
    with pytest.raises(ValueError, match="--dataload 'sft'"):
        build_dataset(stream_prefix, "binidx", "sft", **kw)
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        build_dataset(stream_prefix, "binidx", "get", rank=2, world_size=2, **kw)


def test_sft_loss_only_on_response_and_end_token(tmp_path):
    tok = get_tokenizer("world")
    rows = [{"q": "What is 2+3?", "a": "2+3 = 5.\n#### 5"},
            {"q": "Name a color.", "a": "Blue"},
            {"q": "x" * 300, "a": "too long prompt"},
            {"q": "Only prompt", "a": ""}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    kw = dict(ctx_len=24, vocab_size=V, samples_per_epoch=2, seed=0, sft_field=("q", "a"),
              sft_template="Q: {q}\nA: {a}")
    ds = build_dataset(path, "sft", "pad", **kw)  # data_type sft implies dataload sft
    assert len(ds.docs) == 2
    assert "1 prompt longer than ctx_len 24" in ds.summary and "1 empty document" in ds.summary
    for i in range(2):
        s = ds[i]
        row = rows[ds.doc_of(i)]
        learned = s["targets"][s["mask"].bool()].tolist()
        assert learned[-1] == 0  # the end token carries loss
        assert tok.decode(learned[:-1]) == " " + row["a"]  # " " + response: the joint token
        full = tok.encode(f"Q: {row['q']}\nA: {row['a']}") + [0]
        n = len(full) - 1
        assert s["input_ids"][:n].tolist() == full[:-1]
        assert s["mask"][n:].eq(0).all()  # padding
        first = int(s["mask"].nonzero()[0])
        assert tok.decode(s["input_ids"][: first + 1].tolist()) == f"Q: {row['q']}\nA:"
    # the default template uses question/answer and RWKV chat style
    path2 = write_jsonl(tmp_path / "g.jsonl", [{"question": "Hi?", "answer": "Hello."}])
    s = build_dataset(path2, "sft", "sft", ctx_len=32, vocab_size=V, samples_per_epoch=1,
                      seed=0)[0]
    first = int(s["mask"].nonzero()[0])
    assert tok.decode(s["input_ids"][: first + 1].tolist()) == "User: Hi?\n\nAssistant:"
    # the inference prompt render_sft gives tokenizes exactly like the unmasked prefix
    prompt = render_sft(DEFAULT_SFT_TEMPLATE, ("question", "answer"), "Hi?", "")[0]
    assert tok.encode(prompt) == s["input_ids"][: first + 1].tolist()
    assert tok.decode(s["targets"][s["mask"].bool()].tolist()) == " Hello."
    with pytest.raises(ValueError, match="needs exactly one"):
        build_dataset(path, "sft", "sft", **{**kw, "sft_template": "Q: {q}"})
    with pytest.raises(ValueError, match=r"s\.jsonl:1: missing field 'question'"):
        build_dataset(path, "sft", "sft", ctx_len=24, vocab_size=V, samples_per_epoch=2,
                      seed=0, strict=True)


def test_sft_ranks_differ(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", generate(50, seed=1))
    r = [build_dataset(path, "sft", "sft", ctx_len=64, vocab_size=V, samples_per_epoch=10,
                       seed=0, rank=k, world_size=2) for k in range(2)]
    assert not {r[0].doc_of(i) for i in range(10)} & {r[1].doc_of(i) for i in range(10)}
    assert samples(r[0]) != samples(r[1])


def test_demo_set(tmp_path):
    rows = generate(200, seed=0)
    assert rows == generate(200, seed=0) and rows != generate(200, seed=1)
    for r in rows:
        assert set(r) == {"question", "answer"}
        m = re.search(r"\n#### (\d+)$", r["answer"])
        assert m, r["answer"]
        calcs = re.findall(r"<<(\d+)([-+*/])(\d+)=(\d+)>>", r["answer"])
        a, op, b, c = calcs[-1]
        ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
        assert ops[op](int(a), int(b)) == int(c) == int(m.group(1))
    out = tmp_path / "demo.jsonl"
    write_demo(str(out), 30, seed=0)
    assert [json.loads(x) for x in out.read_text().splitlines()] == generate(30, 0)


def test_make_binidx_cli(tmp_path, capsys):
    tok = get_tokenizer("world")
    texts = ["Hello world.", "中文 and emoji 🤗", "def f():\n    return 1\n"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts] + ["bad", {"x": 1}])
    raw = (tmp_path / "in.jsonl").read_bytes()
    (tmp_path / "in.jsonl").write_bytes(b"\xef\xbb\xbf" + raw)  # a UTF-8 BOM is tolerated
    make_binidx_main(["--input", src, "--output", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert "3 documents" in out and "1 not JSON (first at line 4)" in out
    assert "1 missing field 'text' (first at line 5)" in out
    r = BinIdx(str(tmp_path / "out"))
    assert r.dtype == np.uint16
    assert [r[i].tolist() for i in range(3)] == [tok.encode(t) + [0] for t in texts]
    with pytest.raises(SystemExit, match=r"in\.jsonl:4: not JSON"):
        make_binidx_main(["--input", src, "--output", str(tmp_path / "o2"), "--strict",
                          "--quiet"])
    bad = write_jsonl(tmp_path / "bad.jsonl", ["nope", {"text": ""}])
    with pytest.raises(SystemExit, match=r"bad\.jsonl: no usable documents"):
        make_binidx_main(["--input", bad, "--output", str(tmp_path / "o3"), "--quiet"])
    assert not list(tmp_path.glob("o2*")) and not list(tmp_path.glob("o3*"))  # nothing half-written
