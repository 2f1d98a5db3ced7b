"""Chat data: the RWKV template, exact loss masks, bad lines, too-long, get/pad/infctx, make_binidx --chat."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import perturbed_model, write_jsonl

from rwkv_peft.data import ChatTemplate, build_dataset, get_tokenizer, load_chat
from rwkv_peft.data.chat import encode_chat
from rwkv_peft.data.make_binidx import main as make_binidx_main
from rwkv_peft.train import masked_loss
from rwkv_peft.train.loss import infctx_loss

V = 65536
THREE_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?\n\nquick"},
    {"role": "assistant", "content": "<think>add</think> 4"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "Bye."},
]


def test_three_turn_conversation_trains_exactly_the_assistant_tokens():
    tok = get_tokenizer("world")
    tpl = ChatTemplate.load()
    ids, flags = encode_chat(tok, tpl.render(THREE_TURNS))
    text = ("System: Be brief.\n\nUser: Hi!\n\nAssistant: Hello.\n\nUser: 2+2?\nquick\n\n"
            "Assistant: <think>add</think> 4\n\nUser: Thanks\n\nAssistant: Bye.")
    assert ids.tolist() == tok.encode(text) + [0]  # tokenized whole, as at inference; "\n\n" in content -> "\n"
    pieces = [tok.decode([int(i)]) if i else "<0>" for i in ids]
    trained = np.flatnonzero(flags).tolist()
    assert trained == [14, 15, 16, 29, 30, 31, 32, 33, 34, 35, 36, 37, 45, 46, 47, 48]
    assert [pieces[i] for i in trained] == [
        " Hello", ".", "\n\n",  # turn 1: text and its end-of-turn separator
        " <", "think", ">", "add", "</", "think", ">", " 4", "\n\n",  # turn 2: <think> kept as target
        " By", "e", ".", "<0>",  # last turn ends with the end-of-document token
    ]
    untrained = "".join(p for i, p in enumerate(pieces) if i not in trained)
    assert untrained == ("System: Be brief.\n\nUser: Hi!\n\nAssistant:User: 2+2?\nquick\n\nAssistant:"
                         "User: Thanks\n\nAssistant:")  # role labels, system and user text only
    # the rendered-text form of the same conversation gives the same tokens and flags
    ids2, flags2 = encode_chat(tok, tpl.split_text(text))
    assert ids2.tolist() == ids.tolist() and flags2.tolist() == flags.tolist()
    # the generation prompt is exactly the untrained prefix before an assistant turn
    prompt = tpl.prompt(THREE_TURNS[:2])
    assert tok.encode(prompt) == ids[:14].tolist() and tpl.stop == "\n\nUser:"


def test_text_form_keeps_paragraphs_and_custom_template(tmp_path):
    tok = get_tokenizer("world")
    tpl = ChatTemplate.load()
    ids, flags = encode_chat(tok, tpl.split_text("Intro.\n\nUser: q\n\nAssistant: a\n\nb\n\nUser: r"))
    learned = tok.decode(ids[flags.astype(bool)].tolist())
    assert learned == " a\n\nb\n\n"  # a chunk without a role label continues the assistant turn
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"user": "Q: {content}", "assistant": "A: {content}", "separator": "\n",
                                "separator_in_content": " "}))
    custom = ChatTemplate.load(str(path))
    ids, flags = encode_chat(tok, custom.render([{"role": "user", "content": "x\ny"},
                                                 {"role": "assistant", "content": "z"}]))
    assert tok.decode(ids[:-1].tolist()) == "Q: x y\nA: z"  # the separator inside content is rewritten
    assert tok.decode(ids[flags.astype(bool)].tolist()) == " z" and flags[-1] == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"user": "no placeholder"}))
    with pytest.raises(ValueError, match=r"--chat_template .*bad\.json: 'user' must be a string with exactly one"):
        ChatTemplate.load(str(bad))


def test_bad_lines_too_long_and_strict(tmp_path):
    words = "word " * 80
    long = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": words}, {"role": "assistant", "content": "fine"}]}
    late = {"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": "late"}]}
    rows = [{"messages": THREE_TURNS}, "not json", {"messages": [{"role": "bot", "content": "x"}]},
            {"messages": [{"role": "user", "content": "no answer"}]}, {"text": ""}, long, late,
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    _, _, stats = load_chat(path, V, ctx_len=60)
    s = stats.summary()
    assert stats.documents == 2 and "1 not JSON (first at line 2)" in s
    assert "message role 'bot' not system|user|assistant (first at line 3)" in s
    assert "1 no assistant turn (first at line 4)" in s and "1 empty document (first at line 5)" in s
    assert "1 truncated to ctx_len+1 = 61 tokens" in s  # line 6: its first answer is inside the window
    assert "1 no assistant token within ctx_len (first at line 7)" in s  # its answer lies past it
    assert "message content not a string (first at line 8)" in s
    _, _, stats = load_chat(path, V, ctx_len=60, too_long="drop")
    assert stats.documents == 1 and "2 longer than ctx_len+1 = 61 tokens (--too_long drop)" in stats.summary()
    _, _, stats = load_chat(path, V, ctx_len=60, padded=False)  # get: windows, nothing cut
    assert stats.documents == 3 and "truncated" not in stats.summary()
    with pytest.raises(ValueError, match=r"c\.jsonl:2: not JSON \(expected \{\"messages\""):
        load_chat(path, V, ctx_len=60, strict=True)


def test_get_pad_infctx_and_make_binidx_agree(tmp_path, capsys):
    tok = get_tokenizer("world")
    convs = [[{"role": "user", "content": f"What is {a} plus {b}?"},
              {"role": "assistant", "content": f"{a + b}."},
              {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]
             for a, b in [(1, 2), (30, 4), (5, 600)]]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs])
    docs, flags, _ = load_chat(path, V, ctx_len=64)
    kw = dict(ctx_len=32, vocab_size=V, samples_per_epoch=6, seed=0)
    pad = build_dataset(path, "chat", "pad", **kw)
    for i in range(6):
        s, d = pad[i], pad.doc_of(i)
        n = len(docs[d]) - 1
        assert s["input_ids"][:n].tolist() == docs[d][:-1].tolist()
        assert s["mask"][:n].tolist() == flags[d][1:].tolist() and not s["mask"][n:].any()
    get = build_dataset(path, "chat", "get", **kw)
    stream, flag_stream = np.concatenate(docs), np.concatenate(flags)
    for i in range(6):
        s, at = get[i], get.start_of(i)
        assert s["input_ids"].tolist() == stream[at:at + 32].tolist()
        assert s["mask"].tolist() == flag_stream[at + 1:at + 33].tolist()
    learned = tok.decode(s["targets"][s["mask"].bool()].tolist())
    assert "Thanks" not in learned and "plus" not in learned

    make_binidx_main(["--input", path, "--output", str(tmp_path / "pre"), "--chat", "--quiet"])
    assert "3 documents" in capsys.readouterr().out
    for mode, ref in (("pad", pad), ("get", get)):
        pre = build_dataset(str(tmp_path / "pre"), "chat", mode, **kw)
        for i in range(6):
            assert all(torch.equal(pre[i][k], ref[i][k]) for k in ("input_ids", "targets", "mask"))
    (tmp_path / "pre.mask.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"pre\.mask\.idx: missing"):
        build_dataset(str(tmp_path / "pre"), "chat", "pad", **kw)

    # infctx: the chunked loss over a chat batch equals the whole-context masked loss
    # (ids folded into a small vocab to keep the model tiny; the masks are the chat ones)
    model = perturbed_model(n_layer=1, n_embd=64, vocab=256, head_size=32, seed=5)
    batch = {k: torch.stack([pad[i][k] for i in range(2)]) for k in ("input_ids", "targets", "mask")}
    batch["input_ids"], batch["targets"] = batch["input_ids"] % 256, batch["targets"] % 256
    whole = masked_loss(model, batch["input_ids"], batch["targets"], batch["mask"], head_chunk=0)
    chunked = infctx_loss(model, batch["input_ids"], batch["targets"], batch["mask"], 7)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
