"""The streamed checkpoint writer: files that torch.load, zipfile and safetensors read back exactly,
with tensors copied from other files as bytes (zip64 included), and corrupt inputs not laundered."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rwkv_peft.integrity import check_crc
from rwkv_peft.model import stream
from rwkv_peft.model.stream import _ZipWriter, tensor_spans, write_pth, write_safetensors


def _sources(tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path, Path]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 5, generator=g)
    sd = {
        "w": torch.randn(64, 48, generator=g).bfloat16(),
        "whole": big,  # shares its storage with "view", but covers all of it: copyable
        "view": big[2:],  # offset into a storage: written from memory
        "t": torch.randn(4, 3, generator=g).t(),  # not contiguous: written from memory
        "i": torch.arange(7),
        "b": torch.tensor([True, False, True]),
        "s": torch.tensor(2.5),
    }
    torch.save(sd, tmp_path / "in.pth")
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, tmp_path / "in.safetensors")
    return sd, tmp_path / "in.pth", tmp_path / "in.safetensors"


def test_spans_are_whole_contiguous_records(tmp_path: Path) -> None:
    sd, pth, st = _sources(tmp_path)
    assert sorted(tensor_spans(pth)) == ["b", "i", "s", "w", "whole"]
    assert sorted(tensor_spans(st)) == sorted(sd)
    for path in (pth, st):
        raw = path.read_bytes()
        for k, span in tensor_spans(path).items():
            want = sd[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            assert raw[span.offset : span.offset + span.nbytes] == want
    assert tensor_spans(tmp_path / "missing.pth") == {}
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert tensor_spans(tmp_path / "legacy.pth") == {}  # not a zip: the caller writes every tensor itself


@pytest.mark.parametrize("zip64", [False, True])
@pytest.mark.parametrize("source", ["pth", "safetensors"])
def test_written_files_read_back_exactly(
    source: str, zip64: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans (with and without a known CRC) and computed tensors mixed; zip64 forced by a lowered limit."""
    if zip64:
        monkeypatch.setattr(_ZipWriter, "limit", 200)  # every offset past 200 bytes takes the zip64 fields
    sd, pth, st = _sources(tmp_path)
    spans = tensor_spans(pth if source == "pth" else st)
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    pieces = [spans.get(k, v) for k, v in sd.items()]
    with open(tmp_path / "out.pth", "wb") as f:
        write_pth(f, specs, pieces)
    with open(tmp_path / "out.safetensors", "wb") as f:
        write_safetensors(f, specs, pieces)
    with zipfile.ZipFile(tmp_path / "out.pth") as z:
        assert z.testzip() is None  # every CRC-32 right, read by another zip reader
    loads = [torch.load(tmp_path / "out.pth", weights_only=True),
             torch.load(tmp_path / "out.pth", weights_only=True, mmap=True),
             load_file(tmp_path / "out.safetensors")]
    for got in loads:
        assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in sd.items())
    meta = torch.load(tmp_path / "out.pth", weights_only=True, map_location="meta")
    assert {k: tuple(v.shape) for k, v in meta.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert sorted(tensor_spans(tmp_path / "out.pth")) == sorted(sd)  # our own output: every tensor copyable


def test_computed_tensors_are_cast_to_the_stored_dtype_chunk_by_chunk(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge hands fp32 results to the writer, which casts them a chunk at a time (no stored-dtype copy of
    the whole tensor): the file holds exactly what one whole cast gives, in every dtype and both formats."""
    monkeypatch.setattr(stream, "CHUNK", 96)  # many chunks, the last one partial
    x = torch.randn(37, 29, generator=torch.Generator().manual_seed(1)) * 300
    dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    specs = [(str(d), d, (37, 29)) for d in dtypes]
    with open(tmp_path / "out.pth", "wb") as f:
        write_pth(f, specs, [x] * len(specs))
    with open(tmp_path / "out.safetensors", "wb") as f:
        write_safetensors(f, specs, [x] * len(specs))
    with zipfile.ZipFile(tmp_path / "out.pth") as z:
        assert z.testzip() is None  # the CRC-32 continued over the chunks is the record's
    for got in (torch.load(tmp_path / "out.pth", weights_only=True), load_file(tmp_path / "out.safetensors")):
        assert all(got[str(d)].dtype == d and torch.equal(got[str(d)], x.to(d)) for d in dtypes)


def test_corrupt_input_is_not_laundered(tmp_path: Path) -> None:
    """A flipped byte in a copied record: ``check_crc`` (what the merge runs beside the kernel copy) names
    file and key; the output keeps the input's CRC-32, so the corruption stays detectable there too."""
    sd, pth, _ = _sources(tmp_path)
    span = tensor_spans(pth)["w"]
    raw = bytearray(pth.read_bytes())
    raw[span.offset + 100] ^= 0xFF
    pth.write_bytes(raw)
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    pieces = [tensor_spans(pth).get(k, v) for k, v in sd.items()]
    bad = rf"{pth}: corrupt: CRC-32 mismatch in w"
    with pytest.raises(ValueError, match=bad):
        check_crc(tensor_spans(pth)["w"], "w")
    with open(tmp_path / "out.pth", "wb") as f:
        write_pth(f, specs, pieces)
    with zipfile.ZipFile(tmp_path / "out.pth") as z:
        assert z.testzip() == "archive/data/0"


def test_truncated_input_is_an_error(tmp_path: Path) -> None:
    sd, _, st = _sources(tmp_path)
    spans = tensor_spans(st)
    st.write_bytes(st.read_bytes()[: spans["w"].offset + 10])
    with open(tmp_path / "out.safetensors", "wb") as f, pytest.raises(ValueError, match=f"{st}: truncated"):
        write_safetensors(f, [("w", torch.bfloat16, (64, 48))], [spans["w"]])


def test_read_float_in_chunks_checks_the_crc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed tensor is read chunk by chunk into fp32 (chunks smaller than the tensor here) and
    CRC-checked: a flipped byte is an error naming the file, not a silently wrong merge."""
    from rwkv_peft.model import stream

    monkeypatch.setattr(stream, "CHUNK", 256)
    sd, pth, _ = _sources(tmp_path)
    span = tensor_spans(pth)["w"]
    got = stream.read_float(span, torch.bfloat16, (64, 48))
    assert got.dtype == torch.float32 and torch.equal(got, sd["w"].float())
    raw = bytearray(pth.read_bytes())
    raw[span.offset + 3000] ^= 0x01
    pth.write_bytes(raw)
    with pytest.raises(ValueError, match=f"{pth}: corrupt: CRC-32 mismatch in the tensor"):
        stream.read_float(span, torch.bfloat16, (64, 48))


@pytest.mark.parametrize("key, dtype", [("w", torch.bfloat16), ("whole", torch.float32)])
def test_read_float_through_a_mapping(key: str, dtype: torch.dtype, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Big tensors are read through a private mapping (every tensor here, MAP_MIN lowered): the same fp32
    values as the chunked reads, the CRC checked; a file truncated under the mapping raises SIGBUS on
    the pages past its end, which comes back as the one-line error of a short read."""
    from rwkv_peft.integrity import read_mapped

    sd, pth, _ = _sources(tmp_path)
    span, shape = tensor_spans(pth)[key], tuple(sd[key].shape)
    out = torch.empty(shape)
    assert read_mapped(span, dtype.itemsize, out)  # the mapped reader builds and runs here
    monkeypatch.setattr(stream, "MAP_MIN", 1 << 62)
    chunked = stream.read_float(span, dtype, shape)
    monkeypatch.setattr(stream, "MAP_MIN", 0)
    assert torch.equal(stream.read_float(span, dtype, shape), chunked) and torch.equal(out, chunked)
    assert torch.equal(chunked, sd[key].float())
    raw = bytearray(pth.read_bytes())
    raw[span.offset + span.nbytes // 2] ^= 0x01
    pth.write_bytes(raw)
    with pytest.raises(ValueError, match=f"{pth}: corrupt: CRC-32 mismatch in the tensor"):
        stream.read_float(span, dtype, shape)
    big = tmp_path / "big.pth"
    torch.save({"x": torch.randn(3, 4096)}, big)  # 48 KiB: pages wholly past a cut near its start
    span = tensor_spans(big)["x"]
    with open(big, "r+b") as f:
        f.truncate(span.offset + 16)
    with pytest.raises(ValueError, match=f"{big}: truncated"):
        stream.read_float(span, torch.float32, (3, 4096))
