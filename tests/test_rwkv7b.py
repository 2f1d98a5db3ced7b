"""RWKV-7b (x070 + DeepEmbed attention, ``blocks.N.qkv.*``) against an independent reference.

No pip runtime runs RWKV-7b, so ``Reference`` below re-implements the forward of RWKV-LM's
``RWKV-v7/rwkv_v7b_demo.py`` (its loader: transposes, squeezes, the ln0-normed embedding and the three
folded DeepEmbed tables; its forward_seq with the token-id context and 32-wide k/v caches, keys and
values recomputed over the whole context each call; the time mix with the demo's CUDA-free WKV loop),
in fp32 on the stored values. The files are tests/released_layouts.py's ``x070b_*`` layouts.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import lm_steps, load_pth, logits, stored, tokens
from released_layouts import X070B_LAYOUTS, key_shapes, write_checkpoint

from rwkv_peft.decoder import Decoder
from rwkv_peft.merge import merge_adapter
from rwkv_peft.merge.verify import verify_tolerance
from rwkv_peft.model import load_model
from rwkv_peft.peft import adapter_config, apply_peft, parse_peft_config, trainable_state_dict
from rwkv_peft.runtime import load_runtime
from rwkv_peft.scoring import greedy_generate
from rwkv_peft.tools.init_model import main as init_model_main

TOL = 1e-4  # fp32 on both sides
BF16_LOGITS = 0.1  # the smallest adapter effect the merge checks must see (10x this)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRANSPOSED = ("key.weight", "value.weight", "receptance.weight", "output.weight", "head.weight", "qq.weight")

pytestmark = pytest.mark.usefixtures("one_thread")


class Reference:
    """rwkv_v7b_demo.py's RWKV_x070, re-implemented in fp32 on CPU (``forward(ids, state)`` as its forward)."""

    def __init__(self, path: Path):
        z = {}
        for k, v in torch.load(path, weights_only=True).items():
            v = v.float()
            v = (v.t() if any(n in k for n in TRANSPOSED) else v).squeeze()
            z[k] = v.flatten() if k.endswith("att.r_k") else v
        self.n_head, self.head_size = torch.load(path, weights_only=True)["blocks.0.att.r_k"].shape
        self.n_layer = 1 + max(int(k.split(".")[1]) for k in z if k.startswith("blocks."))
        self.n_embd = z["emb.weight"].shape[1]
        emb = F.layer_norm(z["emb.weight"], (self.n_embd,), z["blocks.0.ln0.weight"], z["blocks.0.ln0.bias"])
        z["emb.weight"] = emb
        for i in range(self.n_layer):  # merge emb residual
            for e in ("ffn.s_emb", "qkv.k_emb", "qkv.v_emb"):
                z[f"blocks.{i}.{e}.weight"] = z[f"blocks.{i}.{e}.weight"] + emb @ z[f"blocks.{i}.{e}_x.weight"].t()
        self.z = z

    def zero_state(self, wkv: list[torch.Tensor] | None = None) -> dict:
        C, H, N, L = self.n_embd, self.n_head, self.head_size, self.n_layer
        q_width, k_width = self.z["blocks.0.qkv.qq.weight"].shape[1], self.z["blocks.0.qkv.k1"].shape[1]
        return {"x_att": [torch.zeros(C) for _ in range(L)], "ffn": [torch.zeros(C) for _ in range(L)],
                "wkv": [torch.zeros(H, N, N) if wkv is None else wkv[i].float().clone() for i in range(L)],
                "ctx": torch.zeros(0, dtype=torch.long), "kc": [torch.zeros(0, k_width) for _ in range(L)],
                "vc": [torch.zeros(0, k_width) for _ in range(L)], "q": [torch.zeros(q_width) for _ in range(L)]}

    @torch.no_grad()
    def forward(self, idx: list[int], state: dict) -> torch.Tensor:
        """Logits (T, V) of every new token; ``state`` is updated in place."""
        z, C = self.z, self.n_embd
        x = z["emb.weight"][idx]
        state["ctx"] = torch.cat([state["ctx"], torch.tensor(idx)])
        ctx, T = state["ctx"], len(idx)
        v_first = None
        for i in range(self.n_layer):
            p = f"blocks.{i}.qkv."
            q = x @ z[p + "qq.weight"]
            state["kc"][i] = torch.cat([state["kc"][i], x @ z[p + "k1"]])
            k = (state["kc"][i] @ z[p + "k2"]) * z[p + "k_emb.weight"][ctx]
            state["vc"][i] = torch.cat([state["vc"][i], x @ z[p + "v1"]])
            v = torch.tanh(state["vc"][i] @ z[p + "v2"]) * z[p + "v_emb.weight"][ctx]
            qq = torch.cat([state["q"][i][None], q[:-1]])
            state["q"][i] = q[-1]
            q = q + (qq - q) * z[p + "x_q"]
            k = k + (F.pad(k, (0, 0, 1, -1)) - k) * z[p + "x_k"]
            v = v + (F.pad(v, (0, 0, 1, -1)) - v) * z[p + "x_v"]
            q = F.layer_norm(q, q.shape[-1:], z[p + "lnq.weight"], z[p + "lnq.bias"])
            k = F.layer_norm(k, k.shape[-1:], z[p + "lnk.weight"], z[p + "lnk.bias"])
            v = F.layer_norm(v, (C,), z[p + "lnv.weight"], z[p + "lnv.bias"])
            scores = 64 * torch.tanh((q @ k.mT) * (1.0 / 1024.0))
            if T > 1:
                mask = ~torch.tril(torch.ones(len(ctx), len(ctx), dtype=torch.bool))[-T:, :]
                scores = scores.masked_fill(mask, float("-inf"))
            qkv = scores.softmax(dim=-1) @ v

            xx = F.layer_norm(x, (C,), z[f"blocks.{i}.ln1.weight"], z[f"blocks.{i}.ln1.bias"])
            xx, v_first = self.tmix(i, xx, state, v_first)
            x = x + xx + qkv
            xx = F.layer_norm(x, (C,), z[f"blocks.{i}.ln2.weight"], z[f"blocks.{i}.ln2.bias"])
            x = x + self.cmix(i, xx, state, idx)
        x = F.layer_norm(x, (C,), z["ln_out.weight"], z["ln_out.bias"])
        return x @ z["head.weight"]

    def tmix(self, i: int, x: torch.Tensor, state: dict, v_first: torch.Tensor | None):
        z, H, N = self.z, self.n_head, self.head_size
        a_ = lambda n: z[f"blocks.{i}.att.{n}"]  # noqa: E731
        T, C = x.shape
        xx = torch.cat([state["x_att"][i][None], x[:-1]]) - x
        state["x_att"][i] = x[-1]
        xr, xw, xk, xv, xa, xg = (x + xx * a_(f"x_{c}") for c in "rwkvag")
        r, k, v = xr @ a_("receptance.weight"), xk @ a_("key.weight"), xv @ a_("value.weight")
        w = torch.tanh(xw @ a_("w1")) @ a_("w2")
        a = torch.sigmoid(a_("a0") + (xa @ a_("a1")) @ a_("a2"))
        g = torch.sigmoid(xg @ a_("g1")) @ a_("g2")
        kk = F.normalize((k * a_("k_k")).view(T, H, N), dim=-1, p=2.0).view(T, C)
        k = k * (1 + (a - 1) * a_("k_a"))
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(a_("v0") + (xv @ a_("v1")) @ a_("v2"))
        w = torch.exp(-0.606531 * torch.sigmoid(a_("w0") + w))  # 0.606531 = exp(-0.5)
        s, out = state["wkv"][i], torch.empty(T, C)
        for t in range(T):
            vk = v[t].view(H, N, 1) @ k[t].view(H, 1, N)
            ab = (-kk[t]).view(H, N, 1) @ (kk[t] * a[t]).view(H, 1, N)
            s = s * w[t].view(H, 1, N) + s @ ab + vk
            out[t] = (s @ r[t].view(H, N, 1)).view(C)
        state["wkv"][i] = s
        out = F.group_norm(out, H, a_("ln_x.weight"), a_("ln_x.bias"), eps=64e-5)
        out = out + ((r * k * a_("r_k")).view(T, H, N).sum(-1, keepdim=True) * v.view(T, H, N)).view(T, C)
        return (out * g) @ a_("output.weight"), v_first

    def cmix(self, i: int, x: torch.Tensor, state: dict, idx: list[int]) -> torch.Tensor:
        f_ = lambda n: self.z[f"blocks.{i}.ffn.{n}"]  # noqa: E731
        T, D = x.shape[0], f_("s1").shape[1]
        xx = torch.cat([state["ffn"][i][None], x[:-1]]) - x
        state["ffn"][i] = x[-1]
        k = torch.relu((x + xx * f_("x_k")) @ f_("key.weight")) ** 2
        ss = (x @ f_("s1")).view(T, 1, D) @ f_("s_emb.weight")[idx].view(T, D, D)
        return (k * ((ss.view(T, D) @ f_("s2")) + f_("s0"))) @ f_("value.weight")

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        state = self.zero_state()
        out, new = self.forward(prompt, state)[-1], []
        for _ in range(n):
            new.append(int(out.argmax()))
            out = self.forward([new[-1]], state)[-1]
        return new


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("rwkv7b")
    out = {}
    for name, layout in X070B_LAYOUTS.items():
        for dt, dtype in DTYPES.items():
            out[name, dt] = d / f"{name}_{dt}.pth"
            write_checkpoint(layout, out[name, dt], dtype)
    return out


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", X070B_LAYOUTS)
def test_reference_parity_rnn_chunks_and_greedy(name: str, dt: str, files: dict) -> None:
    path, dims = files[name, dt], X070B_LAYOUTS[name][2]
    model = load_model(path, op="torch")
    assert (model.cfg.deepembed, model.cfg.dea_q, model.cfg.dea_k) == (32, 256, 32)
    assert {n for n, _ in model.named_parameters()} == set(key_shapes(X070B_LAYOUTS[name]))
    toks = tokens(dims["V"])
    ours = logits(model, toks)
    ref = Reference(path)
    seq = ref.forward(toks, ref.zero_state())
    state = ref.zero_state()
    rnn = torch.cat([ref.forward([t], state) for t in toks])
    print(f"{name} {dt}: |ours - rwkv_v7b_demo reference| seq {(ours - seq).abs().max():.2e}, "
          f"rnn {(ours - rnn).abs().max():.2e}")
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(ours, seq, atol=TOL, rtol=0)
    torch.testing.assert_close(ours, rnn, atol=TOL, rtol=0)

    plain = load_model({k: v for k, v in load_pth(path).items() if ".qkv." not in k}, op="torch")
    assert (logits(plain, toks) - ours).abs().max() > 0.5  # the attention is live in this file

    with torch.no_grad():  # a prompt read in pieces (infctx, generate): the caches carry the context
        first, state = model.forward_state(torch.tensor([toks[:10]]), None)
        second, _ = model.forward_state(torch.tensor([toks[10:]]), state)
    torch.testing.assert_close(torch.cat([first[0], second[0]]), ours, atol=TOL, rtol=0)

    want = ref.greedy(toks[:8], 32)
    assert len(set(want)) > 3, want
    dec = Decoder(model.eval())
    dec.feed(toks[:8])
    assert [t for (t,) in islice(dec.steps(lambda lg: lg.argmax(-1).tolist()), 32)] == want
    # a batch of prompts of different lengths (held-out samples, GRPO): caches stacked left-padded, masked
    prompts = [toks[:3], toks[:8], toks[5:11]]
    assert greedy_generate(model, prompts, 12, stop_token=-1) == [ref.greedy(p, 12) for p in prompts]


@pytest.mark.parametrize(
    "name, dt, method, config",
    [
        ("x070b_dea", "fp32", "miss", {"r": 32, "mode": "balance"}),
        ("x070b_n32", "bf16", "lora", {"r": 8, "alpha": 16, "train_parts": ["deepembed"]}),
    ],
)
def test_adapters_train_and_merge(name: str, dt: str, method: str, config: dict, files: dict, tmp_path: Path) -> None:
    base = files[name, dt]
    model = load_model(base, op="torch")
    cfg = parse_peft_config(method, json.dumps(config))
    torch.manual_seed(0)  # LoRA's A: the same start whatever ran before
    apply_peft(model, method, cfg)
    de = {k for k in load_pth(base) if ".qkv." in k or ".ffn.s" in k}
    asked = "deepembed" in config.get("train_parts", ())
    assert de & {n for n, p in model.named_parameters() if p.requires_grad} == (de if asked else set())
    model.grad_cp = True
    losses = lm_steps(model, 3)
    assert losses[-1] < losses[0], losses

    out = tmp_path / "run"
    out.mkdir()
    torch.save(trainable_state_dict(model), out / "rwkv-final.pth")
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(model, method, cfg)))
    merged = merge_adapter(base, out / "rwkv-final.pth", tmp_path / "merged.pth")
    assert stored(merged) == stored(base)
    m, adapter = load_pth(merged), load_pth(out / "rwkv-final.pth")
    assert (de <= set(adapter)) == asked
    assert all(torch.equal(m[k], adapter[k].to(m[k].dtype)) for k in de & set(adapter))

    toks = tokens(X070B_LAYOUTS[name][2]["V"])
    want = logits(model.eval(), toks)
    ref = Reference(merged)
    theirs = ref.forward(toks, ref.zero_state())
    effect = (want - logits(load_model(base, op="torch"), toks)).abs().max()
    diff = (theirs - want).abs().max()
    print(f"{name} {dt} {method}: adapter moves logits by {effect:.3f}; merged file in the reference vs "
          f"adapted model {diff:.2e}")
    assert effect > 10 * BF16_LOGITS
    # bf16: every merged weight (and here the trained DeepEmbed tables) rounded once; --verify's bound
    assert diff <= verify_tolerance(DTYPES[dt], float(want.abs().max()))
    torch.testing.assert_close(logits(load_model(merged, op="torch"), toks), theirs, atol=TOL, rtol=0)


def test_state_tuning_start_state_matches_the_reference(files: dict) -> None:
    path = files["x070b_dea", "fp32"]
    model = load_model(path, op="torch")
    apply_peft(model, "state")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in model.blocks:
            block.att.time_state.copy_(torch.randn(block.att.time_state.shape, generator=g) * 0.5)
    toks = tokens(300)
    ours = logits(model, toks)
    ref = Reference(path)
    theirs = ref.forward(toks, ref.zero_state([b.att.time_state.detach() for b in model.blocks]))
    torch.testing.assert_close(theirs, ours, atol=TOL, rtol=0)
    assert (ref.forward(toks, ref.zero_state()) - ours).abs().max() > 100 * TOL


def test_rwkv7b_errors(files: dict, tmp_path: Path) -> None:
    path = files["x070b_dea", "fp32"]
    with pytest.raises(ValueError, match=r"x070b_dea_fp32\.pth: an RWKV-7b file .*the rwkv runtime does not run"):
        load_runtime(path)
    sd = {k: v for k, v in load_pth(path).items() if k != "blocks.1.qkv.v2"}
    torch.save(sd, tmp_path / "no_v2.pth")
    with pytest.raises(ValueError, match=r"no_v2\.pth.*missing: blocks\.1\.qkv\.v2$"):
        load_model(tmp_path / "no_v2.pth")


def test_init_model_dea_writes_the_7b_layout(tmp_path: Path) -> None:
    path = tmp_path / "init.pth"
    init_model_main(["--dea", "--n_layer", "2", "--n_embd", "128", "--vocab_size", "300", "--dtype", "fp32",
                     "--output_std", "0.02", "--out", str(path)])
    _, block, dims, _ = X070B_LAYOUTS["x070b_dea"]
    want = key_shapes(("x070", block, {**dims, "W": 32, "A": 32, "M": 32, "G": 64}, False))  # init's widths at 128
    assert {k: s for k, s, _ in stored(path)} == want
    toks = tokens(300)
    ref = Reference(path)
    torch.testing.assert_close(logits(load_model(path, op="torch"), toks), ref.forward(toks, ref.zero_state()),
                               atol=TOL, rtol=0)
