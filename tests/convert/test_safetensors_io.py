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
