"""Hugging Face peft adapter folders in and out, with ``peft`` itself as the reference.

peft's own code loads the folders we write onto our model (inject_adapter_in_model +
set_peft_model_state_dict), and folders peft writes (get_peft_model + save_pretrained) merge with our
streamed merge into what peft's merge_and_unload() computes, which the `rwkv` runtime then runs.
Tolerances: logits of two fp32 computations of the same function 1e-5 (summation order); merged
weights within one unit in the last place of the stored dtype; the runtime 1e-4, as in test_merge.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import perturbed, perturbed_model
from peft import LoraConfig, MissConfig, PeftConfig, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from rwkv_peft.decoder import load_for_generation
from rwkv_peft.export.adapter import export_adapter
from rwkv_peft.export.adapter import main as export_main
from rwkv_peft.merge import main as merge_main
from rwkv_peft.merge import merge_adapter
from rwkv_peft.model import load_model, read_state_dict, save_model
from rwkv_peft.peft import MissConfig as OurMissConfig
from rwkv_peft.peft.folder import read_peft_folder
from rwkv_peft.peft.inject import adapter_config, apply_peft, parse_peft_config, trainable_state_dict
from rwkv_peft.runtime import load_runtime, runtime_logits

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = [3, 17, 250, 9, 42, 1, 77, 128]
OURS = {  # case: (method, config JSON) of an adapter this project trains
    "balance": ("miss", '{"r": 16}'),
    "mini": ("miss", '{"r": 16, "mode": "mini", "mini_r": 4}'),
    "bat_row": ("miss", '{"r": 16, "mode": "bat_row"}'),
    "lora": ("lora", '{"r": 8, "alpha": 16}'),
    "dora": ("dora", '{"r": 8, "alpha": 16}'),
}
TARGETS = ["receptance", "key", "value", "output"]  # what RWKV-PEFT passes: also matches ffn.key / ffn.value
THEIRS = {  # case: peft's config of the same kind of adapter
    "balance": lambda: MissConfig(r=16, target_modules=TARGETS),
    "mini": lambda: MissConfig(r=16, init_weights="mini", mini_r=4, target_modules=TARGETS),
    "bat_row": lambda: MissConfig(r=16, init_weights="bat", target_modules=TARGETS),
    "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
    "rslora": lambda: LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=r".*\.(att|ffn)\.(key|value)"),
    "dora": lambda: LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=TARGETS),
}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.tensor([TOKENS]))[0]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "base.pth"
    save_model(perturbed_model(), path)
    return path


@pytest.fixture(scope="module")
def base_logits(base_file: Path) -> torch.Tensor:
    return _logits(load_model(base_file, op="torch"))


@pytest.fixture(scope="module")
def ours(base_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.Tensor]]:
    """Per case: rwkv-1.pth + adapter_config.json as the trainer writes them, and the adapted logits."""
    out = {}
    for case, (method, text) in OURS.items():
        d = tmp_path_factory.mktemp(case)
        model = load_model(base_file, op="torch")
        cfg = parse_peft_config(method, text)
        apply_peft(model, method, cfg)
        _perturb(model, 1)
        torch.save(trainable_state_dict(model), d / "rwkv-1.pth")
        (d / "adapter_config.json").write_text(json.dumps(adapter_config(model, method, cfg)))
        out[case] = d / "rwkv-1.pth", _logits(model)
    return out


@pytest.mark.parametrize("case", list(OURS))
def test_peft_loads_our_folder_onto_our_model(case: str, base_file: Path, base_logits: torch.Tensor, ours: dict,
                                              tmp_path: Path) -> None:
    adapter, want = ours[case]
    folder = export_adapter(adapter, tmp_path / "peft")
    model = inject_adapter_in_model(PeftConfig.from_pretrained(str(folder)), load_model(base_file, op="torch"))
    result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k or "miss_" in k]
    got = _logits(model)
    assert (want - base_logits).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def hf_base(base_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base as a Hugging Face RWKV-7 folder, converted by rwkv7-hf's own converter."""
    from rwkv7_hf.converter import main as convert

    out = tmp_path_factory.mktemp("hf") / "model"
    convert(["--input", str(base_file), "--output", str(out), "--precision", "fp32"])
    return out


@pytest.mark.parametrize("case", ["bat_row", "dora"])
def test_peft_loads_our_hf_named_folder_onto_the_hugging_face_model(case: str, hf_base: Path, ours: dict,
                                                                   tmp_path: Path) -> None:
    from peft import PeftModel
    from rwkv7_hf import RWKV7ForCausalLM

    adapter, want = ours[case]
    folder = export_adapter(adapter, tmp_path / "peft", "hf")
    model = PeftModel.from_pretrained(RWKV7ForCausalLM.from_pretrained(str(hf_base)), str(folder)).eval()
    with torch.no_grad():
        got = model(torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def _peft_folder(base_file: Path, case: str, folder: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    """peft's model of our base with a perturbed adapter of ``case``, saved by save_pretrained, and its logits."""
    model = get_peft_model(load_model(base_file, op="torch"), THEIRS[case]())
    _perturb(model, 2)
    model.save_pretrained(str(folder))
    return model, _logits(model)


def _within_one_ulp(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> bool:
    """|got - want| <= one unit in the last place, in ``want``'s dtype, of the larger of the result and the base
    weight (the result is a rounded sum whose terms are that large)."""
    scale = torch.maximum(want.float().abs(), base.float().abs()).clamp_min(torch.finfo(want.dtype).tiny)
    ulp = torch.finfo(want.dtype).eps * torch.exp2(torch.floor(torch.log2(scale)))
    return bool(((got.float() - want.float()).abs() <= ulp).all())


@pytest.mark.parametrize("case", list(THEIRS))
def test_a_folder_peft_wrote_merges_as_merge_and_unload(case: str, base_file: Path, tmp_path: Path) -> None:
    model, want_logits = _peft_folder(base_file, case, tmp_path / "peft")
    merged = merge_adapter(base_file, tmp_path / "peft", tmp_path / "merged.pth")
    theirs = model.merge_and_unload().state_dict()
    base, got = read_state_dict(base_file), read_state_dict(merged)
    assert list(got) == list(base)
    changed = [k for k in base if not torch.equal(got[k], base[k])]
    assert changed and all(k.endswith(".weight") and (".att." in k or ".ffn." in k) for k in changed)
    for k in base:
        assert got[k].dtype == base[k].dtype and _within_one_ulp(got[k], theirs[k], base[k]), k
    runtime = runtime_logits(load_runtime(merged), TOKENS, "seq")
    torch.testing.assert_close(runtime, want_logits, rtol=0, atol=1e-4)


def test_verify_and_unmerge_take_a_peft_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base_file = tmp_path / "base.pth"  # World vocab, so --verify's prompt tokenizes
    save_model(perturbed_model(n_layer=1, n_embd=64, vocab=65536), base_file)
    _peft_folder(base_file, "bat_row", tmp_path / "peft")
    merge_main(["--base_model", str(base_file), "--peft_checkpoint", str(tmp_path / "peft"), "--output",
                str(tmp_path / "merged.pth"), "--verify", "--quiet", "--n_tokens", "2"])
    assert "max |logit diff|" in capsys.readouterr().out
    merge_adapter(tmp_path / "merged.pth", tmp_path / "peft", tmp_path / "unmerged.pth", unmerge=True)
    unmerged = read_state_dict(tmp_path / "unmerged.pth")
    for k, v in read_state_dict(base_file).items():
        torch.testing.assert_close(unmerged[k], v, rtol=0, atol=1e-5)


def _write_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("init", [True, "bat"])
def test_an_old_bone_folder_merges_as_miss(init: bool | str, base_file: Path, tmp_path: Path) -> None:
    """peft before the Bone -> MiSS rename: "peft_type": "BONE", ``bone_block`` keys; True is balance, "bat" Bat
    with one block per row group (bat_row), as MiSS's."""
    base = read_state_dict(base_file)
    g = torch.Generator().manual_seed(3)
    blocks = {}
    for k, w in base.items():
        if re.fullmatch(r"blocks\.\d+\.(att|ffn)\.(receptance|key|value|output)\.weight", k):
            shape = (w.shape[0] // 16, 16, 16) if init == "bat" else (16, w.shape[0])
            blocks[f"base_model.model.{k.removesuffix('.weight')}"] = torch.randn(shape, generator=g) * 0.02
    for kind, suffix in (("BONE", "bone_block"), ("MISS", "miss_block")):
        folder = _write_folder(tmp_path / kind, {"peft_type": kind, "r": 16, "init_weights": init,
                                                 "target_modules": TARGETS},
                               {f"{k}.{suffix}": t for k, t in blocks.items()})
        merge_adapter(base_file, folder, tmp_path / f"{kind}.pth")
    bone, miss = read_state_dict(tmp_path / "BONE.pth"), read_state_dict(tmp_path / "MISS.pth")
    assert all(torch.equal(bone[k], miss[k]) for k in miss)
    assert sum(not torch.equal(miss[k], base[k]) for k in base) == len(blocks) == 12


@pytest.mark.parametrize("names", ["blinkdl", "hf"])
@pytest.mark.parametrize("case", list(OURS))
def test_round_trip_gives_identical_tensors(case: str, names: str, ours: dict, tmp_path: Path) -> None:
    adapter, _ = ours[case]
    sd = {k: v.to(torch.bfloat16) if case == "lora" else v for k, v in read_state_dict(adapter).items()}
    torch.save(sd, tmp_path / "rwkv-1.pth")
    (tmp_path / "adapter_config.json").write_text((adapter.parent / "adapter_config.json").read_text())
    folder = export_adapter(tmp_path / "rwkv-1.pth", tmp_path / "peft", names)
    keys = list(load_file(str(folder / "adapter_model.safetensors")))
    assert all(k.startswith("base_model.model.model.layers." if names == "hf" else "base_model.model.blocks.")
               for k in keys)
    back, cfg = read_peft_folder(folder)
    assert sorted(back) == sorted(sd)
    assert all(back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]) for k in sd)
    again, _ = read_peft_folder(export_adapter(folder, tmp_path / "renamed", "hf" if names == "blinkdl" else "blinkdl"))
    assert sorted(again) == sorted(sd) and all(torch.equal(again[k], sd[k]) for k in sd)  # a folder in, too
    want = json.loads((adapter.parent / "adapter_config.json").read_text())
    assert cfg["method"] == want["method"]
    assert all(cfg[k] == want[k] for k in ("mode", "r", "mini_r", "alpha") if cfg.get(k) is not None)


def test_generate_and_load_take_a_peft_folder(base_file: Path, ours: dict, tmp_path: Path) -> None:
    adapter, want = ours["bat_row"]
    folder = export_adapter(adapter, tmp_path / "peft", "hf")
    torch.testing.assert_close(_logits(load_for_generation(str(base_file), str(folder), op="torch")), want,
                               rtol=0, atol=1e-5)
    model = load_model(base_file, op="torch")
    apply_peft(model, "miss", OurMissConfig(r=16, mode="bat_row", load=str(folder)))
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="mode 'bat_row' .*says 'bat_col'"):  # same shapes on square weights
        apply_peft(load_model(base_file, op="torch"), "miss", OurMissConfig(r=16, mode="bat_col", load=str(folder)))


def _error(capsys: pytest.CaptureFixture, run, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        run(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


@pytest.mark.parametrize("case", ["type", "targets", "base_lacks", "field"])
def test_unsupported_folders_are_one_line_errors(case: str, base_file: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    lora = {"base_model.model.blocks.0.att.key.lora_A.weight": torch.zeros(8, 128),
            "base_model.model.blocks.0.att.key.lora_B.weight": torch.zeros(128, 8)}
    config, tensors, expect = {
        "type": ({"peft_type": "IA3"}, lora, "peft_type 'IA3' is not supported"),
        "targets": ({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "up_proj"]},
                    {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 128)},
                    "target_modules ['q_proj', 'up_proj'] name no linear"),
        "base_lacks": ({"peft_type": "MISS", "r": 16, "target_modules": ["gate"]},  # RWKV-6's, not in an x070 base
                       {"base_model.model.blocks.0.att.gate.miss_block": torch.zeros(16, 128)}, "blocks.0.att.gate"),
        "field": ({"peft_type": "LORA", "r": 8, "modules_to_save": ["head"]}, lora, "modules_to_save"),
    }[case]
    folder = _write_folder(tmp_path / "peft", config, tensors)
    msg = _error(capsys, merge_main, ["--base_model", str(base_file), "--peft_checkpoint", str(folder),
                                      "--output", str(tmp_path / "merged.pth")])
    assert expect in msg and not (tmp_path / "merged.pth").exists()


def test_what_peft_cannot_hold_is_refused(base_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = load_model(base_file, op="torch")
    apply_peft(model, "miss", parse_peft_config("miss", '{"r": 16, "mode": "bat_col"}'))
    torch.save(trainable_state_dict(model), tmp_path / "rwkv-1.pth")
    msg = _error(capsys, export_main, ["--adapter", str(tmp_path / "rwkv-1.pth"), "--mode", "bat_col",
                                       "--output", str(tmp_path / "peft")])
    assert "bat_col" in msg and "bat_row" in msg and not (tmp_path / "peft" / "adapter_model.safetensors").exists()


def test_rwkv6_adapters_take_the_hugging_face_rwkv6_names(tmp_path: Path) -> None:
    """x060 has its own HF layout (RWKV/v6-Finch-*-HF: rwkv.blocks.N.attention.receptance): written and read back,
    a folder with those names merges exactly as the .pth it came from."""
    save_model(perturbed("x060", n_layer=1, n_embd=64, head_size=32), tmp_path / "base.pth")
    model = load_model(tmp_path / "base.pth", op="torch")
    cfg = parse_peft_config("miss", '{"r": 16}')
    apply_peft(model, "miss", cfg)
    _perturb(model, 4)
    torch.save(trainable_state_dict(model), tmp_path / "rwkv-1.pth")
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config(model, "miss", cfg)))
    folder = export_adapter(tmp_path / "rwkv-1.pth", tmp_path / "peft", "hf")
    keys = list(load_file(str(folder / "adapter_model.safetensors")))
    assert "base_model.model.rwkv.blocks.0.attention.gate.miss_block" in keys and len(keys) == 8
    for name in ("rwkv-1.pth", "peft"):
        merge_adapter(tmp_path / "base.pth", tmp_path / name, tmp_path / f"{name}.merged.pth")
    a, b = read_state_dict(tmp_path / "rwkv-1.pth.merged.pth"), read_state_dict(tmp_path / "peft.merged.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_saved_without_safetensors_merges_the_same(base_file: Path, tmp_path: Path) -> None:
    """save_pretrained(safe_serialization=False) writes adapter_model.bin (a torch zip, read weights_only)."""
    model = get_peft_model(load_model(base_file, op="torch"), THEIRS["lora"]())
    _perturb(model, 5)
    model.save_pretrained(str(tmp_path / "st"))
    model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    for name in ("st", "bin"):
        merge_adapter(base_file, tmp_path / name, tmp_path / f"{name}.pth")
    a, b = read_state_dict(tmp_path / "st.pth"), read_state_dict(tmp_path / "bin.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
