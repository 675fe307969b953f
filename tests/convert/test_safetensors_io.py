"""Sharded safetensors: the writer's shards and index, the lazy reader, both native key spellings."""

from __future__ import annotations

import json

import pytest
import torch

from v2pe_megatron.convert.errors import HFCheckpointError
from v2pe_megatron.convert.safetensors_io import SafetensorsReader, ShardWriter, read_safetensors


def test_writer_shards_by_size_and_reader_reads_back(tmp_path):
    ts = {f"t{i}": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each
    w = ShardWriter(tmp_path, max_shard_bytes=900)
    for k, t in ts.items():
        w.add(k, t)
    names = w.close()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000 and index["weight_map"]["t4"] == names[2]
    r = SafetensorsReader(tmp_path)
    assert r.shape("t3") == (10, 10) and r.dtype("t3") == "F32"
    back = read_safetensors(tmp_path)
    assert all(torch.equal(back[k], ts[k]) for k in ts)
    with pytest.raises(HFCheckpointError, match="written twice"):
        w2 = ShardWriter(tmp_path / "x")
        w2.add("a", ts["t0"])
        w2.add("a", ts["t0"])


def test_reader_names_native_runtime_keys_and_missing_shards(tmp_path):
    from safetensors.torch import save_file

    save_file({"vision_tower.a": torch.zeros(1), "language_model.lm_head.weight": torch.zeros(1)},
              str(tmp_path / "model.safetensors"))
    assert sorted(SafetensorsReader(tmp_path, native=True).keys()) == ["lm_head.weight", "model.vision_tower.a"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(HFCheckpointError, match="gone.safetensors"):
        SafetensorsReader(tmp_path)
    with pytest.raises(HFCheckpointError, match="only safetensors"):
        SafetensorsReader(tmp_path / "nothing")


def test_reader_reads_every_dtype_bit_exactly_into_memory_of_its_own(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    ts = {"bf16": torch.randn(3, 5, generator=g).bfloat16(), "f16": torch.randn(7, generator=g).half(),
          "f32": torch.randn(2, 2, 2, generator=g), "f64": torch.randn(4, generator=g, dtype=torch.float64),
          "i64": torch.arange(-3, 6), "u8": torch.arange(9, dtype=torch.uint8), "b": torch.tensor([True, False]),
          "empty": torch.zeros(0, 4), "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn)}
    save_file(ts, str(tmp_path / "model.safetensors"))
    want, r = load_file(str(tmp_path / "model.safetensors")), SafetensorsReader(tmp_path)
    for k in ts:
        t = r.get(k)
        assert t.dtype == want[k].dtype and t.shape == want[k].shape, k
        assert torch.equal(t.view(torch.uint8), want[k].view(torch.uint8)), k  # bits, NaN-safe
        assert t.untyped_storage().nbytes() == t.nbytes  # owns its bytes: no shard mapping kept alive
