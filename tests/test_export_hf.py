"""Hugging Face folders out and in, checked against what others wrote: `rwkv7_hf` (pure-PyTorch HF RWKV-7)
and the `rwkv` runtime for logits, fla's documented key layout, and the released .pth layouts."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import perturbed_model
from released_layouts import LAYOUTS, write_checkpoint
from safetensors.torch import save_file

from rwkv_peft.export.hf import blinkdl_module_name, hf_module_name, write_folder
from rwkv_peft.model import load_model, save_model
from rwkv_peft.model.checkpoint import open_checkpoint, read_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layout", ["x070_released", "x070_layer0_v", "x060_world", "x052_world"])
@pytest.mark.parametrize("hf_layout", [None, "native"])
def test_roundtrip_is_bit_identical(tmp_path, layout, hf_layout):
    """.pth -> HF -> .pth gives the released file back: keys, order, dtypes, bytes (fla leaves out the
    unused layer-0 v0/v1/v2, and says so)."""
    if hf_layout == "native" and not layout.startswith("x070"):
        pytest.skip("the native rwkv7. layout holds RWKV-7 only")
    write_checkpoint(LAYOUTS[layout], tmp_path / "m.pth", torch.bfloat16)
    sd = read_state_dict(tmp_path / "m.pth")
    dropped = write_folder(open_checkpoint(tmp_path / "m.pth"), tmp_path / "hf", layout=hf_layout)
    if layout == "x070_layer0_v" and hf_layout is None:
        assert dropped == ["blocks.0.att.v1", "blocks.0.att.v2", "blocks.0.att.v0"]
    else:
        assert dropped == []
    back = read_state_dict(tmp_path / "hf")
    assert list(back) == [k for k in sd if k not in dropped]
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and v.shape == sd[k].shape and torch.equal(v, sd[k]), k
    save_model(back, tmp_path / "back.pth")
    assert read_state_dict(tmp_path / "back.pth").keys() == back.keys()


@torch.no_grad()
def test_rwkv7_hf_loads_the_export_with_runtime_logits(tmp_path):
    """`rwkv7_hf.RWKV7ForCausalLM.from_pretrained` on our fla-layout export gives the `rwkv` runtime's logits,
    in one pass and continuing from its recurrent cache."""
    from rwkv7_hf import RWKV7ForCausalLM

    from rwkv_peft.runtime import load_runtime, runtime_logits

    save_model(perturbed_model(n_layer=2, n_embd=128, vocab=300), tmp_path / "m.pth")
    write_folder(open_checkpoint(tmp_path / "m.pth"), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["RWKV7ForCausalLM"] and cfg["model_type"] == "rwkv7"
    assert (tmp_path / "hf" / "rwkv_vocab_v20230424.txt").is_file()
    tokens = [5, 17, 200, 3, 99, 42, 7, 250, 1, 0, 299]
    want = runtime_logits(load_runtime(tmp_path / "m.pth"), tokens)
    hf = RWKV7ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    full = hf(torch.tensor([tokens]), use_cache=False).logits[0]
    first = hf(torch.tensor([tokens[:6]]), use_cache=True)
    rest = hf(torch.tensor([tokens[6:]]), past_key_values=first.past_key_values, use_cache=True)
    stepped = torch.cat([first.logits[0], rest.logits[0]])
    assert want.abs().max() > 1
    assert (full - want).abs().max() <= 1e-4
    assert (stepped - want).abs().max() <= 1e-4


def fla_folder_from_docs(sd: dict[str, torch.Tensor], folder) -> None:
    """An fla-layout folder written from fla's documented conversion (utils/convert_from_rwkv7.py): names
    translated block part by block part, w/a/v/g 1 and 2 transposed into lora.0 / lora.2 weights, w0/a0/v0
    into lora.2 biases, (1, 1, C) vectors squeezed except the attention's x_* mixes, layer-0 v0/v1/v2 left
    out. Written here, independently of rwkv_peft.export.hf."""
    part = {"att": "attn", "ffn": "ffn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
    proj = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
    outer = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
             "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
    out = {}
    for name, t in sd.items():
        if name in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            continue
        if name in outer:
            out[outer[name]] = t.clone()
            continue
        _, i, p, leaf, *rest = name.split(".")
        if len(leaf) == 2 and leaf[0] in "wvag" and leaf[1] in "012":
            leaf = f"{leaf[0]}_lora.lora." + {"0": "2.bias", "1": "0.weight", "2": "2.weight"}[leaf[1]]
            t = t.t() if name[-1] in "12" else t
        elif p == "att" and leaf in proj:
            leaf = proj[leaf]
        if t.dim() == 3 and not (p == "att" and leaf.startswith("x_")):
            t = t.squeeze()
        out[".".join(["model.layers", i, part[p], leaf, *rest])] = t.contiguous().clone()
    folder.mkdir()
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"]}))


def test_fla_folder_from_the_documented_layout_loads(tmp_path):
    """A folder in fla's layout written by the test (not by the project) loads as the model it came from."""
    model = perturbed_model(n_layer=2, n_embd=128, vocab=300)
    save_model(model, tmp_path / "m.pth")
    sd = read_state_dict(tmp_path / "m.pth")
    fla_folder_from_docs(sd, tmp_path / "fla")
    back = read_state_dict(tmp_path / "fla")
    assert set(back) == set(sd)
    for k in back:
        assert torch.equal(back[k], sd[k]), k
    idx = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "fla", op="torch")(idx), model(idx), rtol=0, atol=0)


def test_module_names_both_ways():
    assert hf_module_name("blocks.3.att.receptance") == "model.layers.3.attn.r_proj"
    assert hf_module_name("blocks.0.ffn.value") == "model.layers.0.ffn.value"
    assert hf_module_name("blocks.2.att.output", "rwkv") == "rwkv.blocks.2.attention.output"
    assert blinkdl_module_name("model.layers.3.attn.k_proj") == "blocks.3.att.key"
    with pytest.raises(ValueError, match="no linear"):
        hf_module_name("blocks.0.att.w1")


def test_unknown_folder_is_one_error(tmp_path):
    (tmp_path / "x").mkdir()
    save_file({"transformer.h.0.attn.weight": torch.zeros(2)}, tmp_path / "x" / "model.safetensors")
    with pytest.raises(ValueError, match="not an RWKV Hugging Face folder in a known layout"):
        read_state_dict(tmp_path / "x")
    (tmp_path / "y").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        read_state_dict(tmp_path / "y")


def test_hf_folders_train_merge_and_export_back(tmp_path):
    """Our export of a base equals the folder written from fla's documented layout; training from that folder,
    merging into it (a folder of the same layout, files and key set comes out) and exporting the merge back
    to .pth give exactly what the same steps give from the .pth base."""
    from helpers import tiny_run_files, train_flags

    from rwkv_peft.export.model import main as export
    from rwkv_peft.merge.cli import main as merge
    from rwkv_peft.train import main as train

    files = tiny_run_files(tmp_path, n_tokens=600)
    base = read_state_dict(files["base"])
    assert export(["--model", files["base"], "--format", "hf", "--output", str(tmp_path / "ours")]) == 0
    fla_folder_from_docs(base, tmp_path / "fla")
    ours, docs = read_state_dict(tmp_path / "ours"), read_state_dict(tmp_path / "fla")
    assert list(ours) == list(docs) and all(torch.equal(ours[k], docs[k]) for k in ours)

    for name, load in (("pth", files["base"]), ("hf", str(tmp_path / "fla"))):
        train(train_flags({**files, "base": load}, tmp_path / f"run_{name}", epoch_count=1, epoch_steps=2,
                          train_parts="ln"))
    adapters = [read_state_dict(tmp_path / f"run_{n}" / "rwkv-final.pth") for n in ("pth", "hf")]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])

    adapter = str(tmp_path / "run_hf" / "rwkv-final.pth")
    merge(["--base_model", files["base"], "--peft_checkpoint", adapter, "--output", str(tmp_path / "m.pth"), "--quiet"])
    merge(["--base_model", str(tmp_path / "fla"), "--peft_checkpoint", adapter, "--output", str(tmp_path / "m_hf"),
           "--quiet"])
    assert sorted(p.name for p in (tmp_path / "m_hf").iterdir()) == sorted(p.name for p in (tmp_path / "fla").iterdir())
    assert json.loads((tmp_path / "m_hf" / "config.json").read_text()) == json.loads(
        (tmp_path / "fla" / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(tmp_path / "m_hf" / "model.safetensors", "pt") as a, safe_open(
            tmp_path / "fla" / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
    assert export(["--model", str(tmp_path / "m_hf"), "--format", "pth", "--output", str(tmp_path / "back.pth")]) == 0
    # base + adapter, merged on the way by the export, from the .pth and from the folder
    for src, fmt, out in ((files["base"], "pth", "e.pth"), (str(tmp_path / "fla"), "hf", "e_hf")):
        assert export(["--model", src, "--adapter", adapter, "--format", fmt, "--output", str(tmp_path / out)]) == 0
    want = read_state_dict(tmp_path / "m.pth")
    assert any(not torch.equal(want[k], base[k]) for k in want)
    for other in ("back.pth", "e.pth", "e_hf"):
        got = read_state_dict(tmp_path / other)
        assert set(got) == set(want), other
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (other, k)


def test_sharded_folder_reads_back(tmp_path):
    """Above --shard_size the weights go to model-0000i-of-0000n.safetensors with an index, as HF writes them."""
    write_checkpoint(LAYOUTS["x070_released"], tmp_path / "m.pth", torch.float32)
    write_folder(open_checkpoint(tmp_path / "m.pth"), tmp_path / "hf", shard_bytes=100_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    sd, back = read_state_dict(tmp_path / "m.pth"), read_state_dict(tmp_path / "hf")
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_export_errors_are_one_line(tmp_path):
    from rwkv_peft.export.model import main as export

    save_model(perturbed_model(n_layer=1, n_embd=64, vocab=300, head_size=32), tmp_path / "m.pth")
    m = str(tmp_path / "m.pth")
    cases = [
        (["--model", m, "--format", "gguf", "--output", str(tmp_path / "x.pth")], "--format gguf writes a .gguf file"),
        (["--model", m, "--format", "pth", "--output", m], "an output must not replace an input"),
        (["--model", str(tmp_path / "nope"), "--format", "hf", "--output", str(tmp_path / "o")], "not found"),
        (["--model", m, "--format", "hf", "--output", str(tmp_path / "o"), "--dtype", "q8_0"], "--dtype q8_0"),
        (["--model", m, "--format", "hf", "--output", str(tmp_path / "o"), "--layout", "rwkv"], "has no rwkv layout"),
    ]
    for argv, says in cases:
        with pytest.raises(SystemExit) as e:
            export(argv)
        assert str(e.value).startswith("error: ") and says in str(e.value) and "\n" not in str(e.value), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]
