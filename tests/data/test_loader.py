"""The loader end to end: every format, mixing/shuffling/sharding, resume exactness, V2PE positions,
and each bad-input reason counted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from v2pe_megatron.config import load_recipe
from v2pe_megatron.data.formats import JsonlDataset, MixedIndex, load_meta
from v2pe_megatron.data.loader import build_train_loader
from v2pe_megatron.data.skips import NoUsableSamplesError
from v2pe_megatron.data.synthetic import draw_image, encode_image, write_synthetic
from v2pe_megatron.v2pe import compute_position_ids

NIT = 4  # tokens per tile of the tiny preset (56 px, patch 14, pixel shuffle 0.5)


def _recipe(meta: str = "", *extra: str):
    # no system turn: InternVL's (the template's default) is 162 tokens in the tiny tokenizer
    return load_recipe(None, ["model.preset=tiny", "data.seq_length=1024", "data.system_prompt=''",
                              "data.max_dynamic_patch=4", "data.micro_batch_size=2", "data.global_batch_size=2",
                              "data.max_tiles_per_pack=32", "data.synthetic_num_samples=24",
                              "data.dali_device=cpu", *([f"data.meta_path={meta}"] if meta else []), *extra])


def _take(loader, n):
    out = []
    for _ in range(n):
        out.append(next(loader))
    return out


def _check_batch(batch, tok_ids=(5, 6, 7)):
    """Invariants of the contract, checked row by row from the batch alone."""
    start, end, ctx = tok_ids
    B, S = batch.tokens.shape
    tiles_seen = 0
    img_seen = 0
    for r in range(B):
        toks = batch.tokens[r].numpy()
        labels = batch.labels[r].numpy()
        lm = batch.loss_mask[r].numpy()
        pos = batch.position_ids[r].numpy()
        lens = batch.seq_lens[r].numpy()
        assert lens.sum() == S
        n_img = int(np.count_nonzero(toks == start))
        row_tiles = batch.num_tiles[img_seen: img_seen + n_img].numpy()
        row_deltas = batch.deltas[img_seen: img_seen + n_img].numpy()
        assert np.count_nonzero(toks == ctx) == NIT * row_tiles.sum()
        off, k = 0, 0
        for L in lens:
            seg = slice(off, off + L)
            t = toks[seg]
            np.testing.assert_array_equal(labels[off: off + L - 1], t[1:])
            assert lm[off + L - 1] == 0
            assert not lm[seg][np.isin(labels[seg], (start, end, ctx))].any()  # images never trained
            m = np.count_nonzero(t == start)
            # padding continues a sub-sample's positions (+1 per token), the tail restarts at 0: both
            # are what the V2PE rule gives for the whole segment
            want = compute_position_ids(t, img_start_id=start, img_end_id=end, img_context_id=ctx,
                                        delta=row_deltas[k: k + m] if m else 1.0)
            np.testing.assert_array_equal(pos[seg], want)
            k += m
            off += L
        assert k == n_img
        img_seen += n_img
        tiles_seen += row_tiles.sum()
    assert batch.pixel_values.shape[0] == tiles_seen
    assert img_seen == batch.num_images


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    meta = write_synthetic(d / "jsonl", 30, seed=3, min_side=20, max_side=120, haystack_words=30)
    meta_wds = write_synthetic(d / "wds", 30, seed=3, fmt="webdataset", shard_size=8, min_side=20,
                               max_side=120, haystack_words=30)
    return meta, meta_wds


def test_jsonl_and_webdataset_give_the_same_batches(synth_dir):
    meta, meta_wds = synth_dir
    assert len(load_meta(meta_wds)[0]) == 30 and len(load_meta(meta_wds)[0].shards) == 4
    a = build_train_loader(_recipe(str(meta), "v2pe.policy=random", "data.seq_length=512"), dp_rank=0, dp_size=1,
                           max_epochs=1)
    b = build_train_loader(_recipe(str(meta_wds), "v2pe.policy=random", "data.seq_length=512"), dp_rank=0,
                           dp_size=1, max_epochs=1)
    ba, bb = list(a), list(b)
    assert len(ba) == len(bb) > 2
    for x, y in zip(ba, bb):
        _check_batch(x)
        for k in ("tokens", "labels", "loss_mask", "position_ids", "pixel_values", "num_tiles", "deltas"):
            np.testing.assert_array_equal(getattr(x, k).numpy(), getattr(y, k).numpy(), err_msg=k)
    assert a.stats["samples"] == 30 and sum(a.skips.values()) == 0
    assert a.stats["tiles"] > 30  # multi-tile images are there
    # positions really are V2PE (some delta < 1 drawn)
    assert any((x.deltas < 1).any() for x in ba)


def test_mixing_shuffling_sharding(tmp_path):
    for name, n in (("a", 10), ("b", 20)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"id": f"{name}{i}", "text": "x"}) + "\n" for i in range(n)) + "\n\n")
    (tmp_path / "meta.json").write_text(json.dumps({
        "A": {"root": "", "annotation": "a.jsonl", "repeat_time": 2},
        "B": {"root": "", "annotation": "b.jsonl", "repeat_time": 0.5, "max_dynamic_patch": 2}}))
    ds = load_meta(tmp_path / "meta.json")
    assert [len(d) for d in ds] == [10, 20] and ds[1].max_dynamic_patch == 2
    idx = MixedIndex(ds, seed=5)
    assert len(idx) == 2 * 10 + 10
    assert np.bincount(idx.line[idx.ds == 0]).tolist() == [2] * 10
    b_lines = idx.line[idx.ds == 1]
    assert len(set(b_lines.tolist())) == 10 and b_lines.max() < 20
    assert (MixedIndex(ds, seed=5).line == idx.line).all()
    orders = [idx.rank_order(0, r, 3) for r in range(3)]
    assert all(o.size == 10 for o in orders)
    assert sorted(np.concatenate(orders).tolist()) == list(range(30))
    assert (idx.rank_order(0, 1, 3) == orders[1]).all()
    assert not (idx.rank_order(1, 1, 3) == orders[1]).all()


def _same_batch(x, y, msg=""):
    for k in ("tokens", "labels", "loss_mask", "position_ids", "pixel_values", "deltas"):
        np.testing.assert_array_equal(getattr(x, k).numpy(), getattr(y, k).numpy(), err_msg=f"{msg}: {k}")
    assert [a.tolist() for a in x.seq_lens] == [a.tolist() for a in y.seq_lens], msg
    assert [a.tolist() for a in x.sample_ids] == [a.tolist() for a in y.sample_ids], msg


def test_dp_ranks_deal_one_global_stream_of_micro_batches():
    """The contract (changed on purpose from sharding samples by rank): the stream of packed
    micro-batches is the same at every DP size, and DP rank r of dp gets micro-batches r, r+dp, ...
    so a step's global batch holds the same samples in the same order whatever dp is."""
    r = _recipe("", "data.seq_length=256")
    one = list(build_train_loader(r, dp_rank=0, dp_size=1, max_epochs=1, prefetch=0))
    ids = [s for b in one for row in b.sample_ids for s in row.tolist()]
    assert sorted(ids) == list(range(24)) and len(one) >= 6
    for dp in (2, 3):
        for rank in range(dp):
            loader = build_train_loader(r, dp_rank=rank, dp_size=dp, max_epochs=1, prefetch=0)
            mine = list(loader)
            assert len(mine) == len(one[rank::dp])
            for k, (x, y) in enumerate(zip(one[rank::dp], mine)):
                _same_batch(x, y, f"dp {dp} rank {rank} micro-batch {k}")
            assert loader.stats["micro_batches"] == len(mine)  # it decoded only its own


def test_resume_at_another_dp_size(tmp_path):
    """A state saved at a step boundary under dp=2 (both ranks agree on it) resumes under dp=1 and
    dp=3 with the micro-batches the uninterrupted dp=1 stream has from there; the skip counters of the
    saved ranks add up on the new rank 0."""
    meta = write_synthetic(tmp_path / "d", 14, seed=9, min_side=20, max_side=100, haystack_words=20)
    with open(tmp_path / "d" / "data.jsonl", "a") as f:
        f.write("not json\n")
    r = _recipe(str(meta), "v2pe.policy=random", "data.seq_length=512", "data.micro_batch_size=1")
    ref_loader = build_train_loader(r, dp_rank=0, dp_size=1, prefetch=0)
    ref = _take(ref_loader, 12)
    steps = 3  # per dp=2 rank: micro-batches 0..5 of the global stream
    saved, skips = [], []
    for rank in range(2):
        ld = build_train_loader(r, dp_rank=rank, dp_size=2)
        _take(ld, steps)
        saved.append(json.loads(json.dumps(ld.state_dict())))
        skips.append(ld.skips)
        ld.close()
    assert (saved[0]["epoch"], saved[0]["pos"]) == (saved[1]["epoch"], saved[1]["pos"])
    for dp in (1, 3):
        got = []
        for rank in range(dp):
            ld = build_train_loader(r, dp_rank=rank, dp_size=dp, prefetch=0)
            ld.load_state_dict(saved)
            if rank == 0:
                assert ld.skips == {k: skips[0][k] + skips[1][k] for k in skips[0]}
            else:
                assert not any(ld.skips.values())
            got.append(_take(ld, (12 - 2 * steps) // dp))
        for k, x in enumerate(ref[2 * steps:]):
            _same_batch(x, got[k % dp][k // dp], f"resumed at dp {dp}, micro-batch {2 * steps + k}")


def test_resume_replays_exactly(tmp_path):
    meta = write_synthetic(tmp_path / "d", 14, seed=9, min_side=20, max_side=100, haystack_words=20)
    # add bad lines so that skip counters must also resume exactly
    with open(tmp_path / "d" / "data.jsonl", "a") as f:
        f.write('{"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>"},'
                ' {"from": "gpt", "value": "x"}]}\n')
        f.write("not json\n")
    r = _recipe(str(meta), "v2pe.policy=random", "data.seq_length=512", "parallel.cp=2")
    ref_loader = build_train_loader(r, dp_rank=0, dp_size=1)
    ref = _take(ref_loader, 9)  # spans several epochs of 16 samples
    assert ref_loader.state_dict()["epoch"] >= 1
    for cut in (1, 4, 7):
        first = build_train_loader(r, dp_rank=0, dp_size=1)
        _take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # checkpoints store plain data
        skips_at_cut = first.skips
        first.close()
        resumed = build_train_loader(r, dp_rank=0, dp_size=1, prefetch=0)
        resumed.load_state_dict(state)
        assert resumed.skips == skips_at_cut
        rest = _take(resumed, 9 - cut)
        for x, y in zip(ref[cut:], rest):
            for k in ("tokens", "labels", "loss_mask", "position_ids", "pixel_values", "deltas"):
                np.testing.assert_array_equal(getattr(x, k).numpy(), getattr(y, k).numpy(), err_msg=f"cut {cut}: {k}")
            assert [a.tolist() for a in x.seq_lens] == [a.tolist() for a in y.seq_lens], f"cut {cut}"
        assert resumed.skips == ref_loader.skips
    for b in ref:
        _check_batch(b)
        # cp=2: every sub-sample is padded to a multiple of 2*cp
        for lens in b.seq_lens:
            assert (lens.numpy() % 4 == 0).all()
    assert ref_loader.skips["missing_image"] >= 1 and ref_loader.skips["bad_json"] >= 1
    with pytest.raises(ValueError, match="different data settings"):
        build_train_loader(_recipe(str(meta), "data.seq_length=256"), dp_rank=0, dp_size=1).load_state_dict(state)


def _jpeg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def _bad_input_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = tmp_path / "img"
    img.mkdir()
    (img / "ok.png").write_bytes(encode_image(draw_image(rng, 40, 40, "red", "circle"), "png"))
    (img / "wide.png").write_bytes(encode_image(draw_image(rng, 200, 50, "blue", "square"), "png"))
    full = _jpeg(draw_image(rng, 60, 60, "green", "square", noisy=True))
    (img / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (img / "garbage.jpg").write_bytes(b"definitely not a jpeg" * 10)

    def conv(q, a="Fine."):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]

    lines = [
        json.dumps({"id": "good1", "image": "ok.png", "conversations": conv("<image>\nWhat?", "A red circle.")}),
        json.dumps({"id": "good2", "conversations": conv("Hello?")}),
        json.dumps({"id": "good3", "text": "plain text sample"}),
        b'{"id": "utf", "text": "\xff\xfe broken"}',
        "{not json",
        json.dumps({"id": "rec", "conversations": "should be a list"}),
        json.dumps({"id": "empty", "conversations": []}),
        json.dumps({"id": "mismatch", "image": ["ok.png", "ok.png"], "conversations": conv("<image> only one")}),
        json.dumps({"id": "missing", "image": "nope.jpg", "conversations": conv("<image>")}),
        json.dumps({"id": "trunc", "image": "truncated.jpg", "conversations": conv("<image>")}),
        json.dumps({"id": "garbage", "image": "garbage.jpg", "conversations": conv("<image>")}),
        json.dumps({"id": "markup", "conversations": conv("look: <img></img>")}),
        json.dumps({"id": "long", "conversations": conv("word " * 400 + "?")}),
        json.dumps({"id": "tiles", "image": "wide.png", "conversations": conv("<image>")}),
    ]
    with open(tmp_path / "data.jsonl", "wb") as f:
        for ln in lines:
            f.write((ln if isinstance(ln, bytes) else ln.encode()) + b"\n")
    (tmp_path / "meta.json").write_text(json.dumps({"bad": {"root": "img", "annotation": "data.jsonl"}}))
    return tmp_path / "meta.json"


def test_each_bad_input_reason_is_counted(tmp_path):
    meta = _bad_input_dir(tmp_path)
    assert len(JsonlDataset(tmp_path / "data.jsonl")) == 14
    base = ("data.seq_length=256", "data.max_tiles_per_pack=4", "data.micro_batch_size=1",
            "data.global_batch_size=1")
    loader = build_train_loader(_recipe(str(meta), *base, "data.overlong=skip"), dp_rank=0, dp_size=1,
                                max_epochs=1)
    batches = list(loader)
    for b in batches:
        _check_batch(b)
    got = {k: v for k, v in loader.skips.items() if v}
    assert got == {"bad_utf8": 1, "bad_json": 1, "bad_record": 1, "empty_conversation": 1,
                   "image_count_mismatch": 1, "missing_image": 1, "corrupt_image": 2, "bad_markup": 1,
                   "too_long": 1, "too_many_tiles": 1}
    assert loader.stats["samples"] == 3
    assert sorted(int(s) for b in batches for row in b.sample_ids for s in row) == [0, 1, 2]
    # truncate mode: the long prompt is cut before its answer, leaving nothing to train on
    loader = build_train_loader(_recipe(str(meta), *base, "data.overlong=truncate"), dp_rank=0, dp_size=1,
                                max_epochs=1)
    list(loader)
    assert loader.skips["no_loss_tokens"] == 1 and loader.skips["too_long"] == 0


def test_truncation_keeps_whole_images(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "a.png").write_bytes(encode_image(draw_image(rng, 112, 56, "red", "square"), "png"))
    q = "<image> " + "word " * 20 + "<image> " + "word " * 20
    rec = {"id": "x", "image": ["a.png", "a.png"], "text": q + " the end"}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": ".", "annotation": "d.jsonl"}}))
    for limit in (24, 40, 60):
        loader = build_train_loader(_recipe(str(tmp_path / "meta.json"), f"data.seq_length={limit}",
                                            "data.micro_batch_size=1", "data.global_batch_size=1"),
                                    dp_rank=0, dp_size=1, max_epochs=1)
        (b,) = list(loader)
        _check_batch(b)
        toks = b.tokens[0].numpy()
        assert np.count_nonzero(toks == 5) == np.count_nonzero(toks == 6) == b.num_tiles.numel()


def test_everything_bad_is_a_clear_error(tmp_path):
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": i, "image": "gone.png", "conversations": conv})
                                              + "\n" for i in range(5)))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"annotation": "d.jsonl"}}))
    loader = build_train_loader(_recipe(str(tmp_path / "meta.json")), dp_rank=0, dp_size=1)
    with pytest.raises(NoUsableSamplesError, match="missing_image=5"):
        next(loader)


def test_tokenizer_must_match_model_ids():
    from v2pe_megatron.data.tokenizer import tiny_tokenizer

    r = load_recipe(None, ["data.dali_device=cpu"])  # InternVL2-2B ids, tiny tokenizer
    with pytest.raises(ValueError, match="img_context_token_id"):
        build_train_loader(r, dp_rank=0, dp_size=1, tokenizer=tiny_tokenizer())


def test_webdataset_text_members_and_missing_member(tmp_path):
    import tarfile

    from v2pe_megatron.data.formats import TarDataset
    from v2pe_megatron.data.skips import SampleError

    png = encode_image(draw_image(np.random.default_rng(0), 30, 30, "red", "square"), "png")
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "red"}]
    members = [("a.txt", b"just text"), ("b.json", json.dumps({"conversations": conv}).encode()), ("b.png", png),
               ("c.json", json.dumps({"image": "0.jpg", "conversations": conv}).encode())]
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    ds = TarDataset([tmp_path / "s.tar"])
    assert len(ds) == 3
    a, b, c = (ds.read(i) for i in range(3))
    assert a.text == "just text" and a.id == "a"
    assert [im.name for im in b.images] == ["b.png"] and b.images[0].load() == png
    with pytest.raises(SampleError) as e:
        c.images[0].load()
    assert e.value.reason == "missing_image"


def test_loader_without_dali_tiles_with_pillow(monkeypatch, caplog):
    from v2pe_megatron.data import tiling

    with_dali = build_train_loader(_recipe(), dp_rank=0, dp_size=1, prefetch=0)
    assert isinstance(with_dali.tiler, tiling.DaliTiler)
    want = _take(with_dali, 3)
    monkeypatch.setitem(__import__("sys").modules, "nvidia.dali", None)  # "import nvidia.dali" now fails
    monkeypatch.setattr(tiling, "_fallback_logged", False)
    loaders = [build_train_loader(_recipe(), dp_rank=0, dp_size=1) for _ in range(2)]
    assert all(isinstance(ld.tiler, tiling.PillowTiler) for ld in loaders)
    assert len([r for r in caplog.records if "nvidia-dali cannot be imported" in r.getMessage()]) == 1
    got = _take(loaders[0], 3)
    for w, g in zip(want, got):
        _check_batch(g)
        for k in ("tokens", "labels", "position_ids", "num_tiles"):
            np.testing.assert_array_equal(np.asarray(getattr(g, k)), np.asarray(getattr(w, k)), err_msg=k)
        assert [r.tolist() for r in g.sample_ids] == [r.tolist() for r in w.sample_ids]
        assert g.pixel_values.shape == w.pixel_values.shape
        assert (g.pixel_values - w.pixel_values).abs().mean() < 0.01  # normalised units (~0.5 of a pixel level)
    for ld in loaders:
        ld.close()
