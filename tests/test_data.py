import pytest
import torch

from codicodec_flow.data.dataset import (LatentFile, StoredFile, load_latents, random_crops, split_files,
                                         step_generator, validation_crops)
from codicodec_flow.errors import DataError
from codicodec_flow.data.shards import (build_manifest, convert_folder, find_shards, load_shard, save_shard,
                                        shard_storage)
from codicodec_flow.latents import LatentStats
from conftest import ar_latents, write_latent_dir

STATS = LatentStats(torch.zeros(64), torch.ones(64), 1)


def test_segments_of_one_file_are_joined_in_order(tmp_path):
    z = ar_latents(10)
    for seg, (a, b) in enumerate([(0, 4), (4, 8), (8, 10)]):
        save_shard(tmp_path / f"x.wav.{seg:04d}.pt", z[a:b], {"source": "x.wav", "segment": seg, "codec": "spectral",
                                                              "codec_version": "1"})
    build_manifest(tmp_path)
    d = load_latents(tmp_path, val_fraction=0)
    assert len(d.train) == 1 and torch.equal(d.train[0].latents, z)


def test_split_is_by_file_deterministic_and_disjoint():
    files = [LatentFile(f"song{i}.wav", torch.zeros(5, 8, 64)) for i in range(20)]
    train, val, _ = split_files(files, 0.1)
    train2, val2, _ = split_files(list(reversed(files)), 0.1)
    assert [f.source for f in val] == [f.source for f in val2] and len(val) == 2
    assert {f.source for f in train}.isdisjoint(f.source for f in val) and len(train) + len(val) == 20


def test_single_file_holds_out_its_tail():
    z = ar_latents(30)
    train, val, note = split_files([LatentFile("only.wav", z)], 0.1)
    assert "one file" in note and torch.equal(torch.cat([train[0].latents, val[0].latents]), z)


def test_crops_are_chunk_aligned_slices_and_short_files_are_padded():
    long, short = ar_latents(20, seed=1), ar_latents(3, seed=2)
    files = [LatentFile("long", long), LatentFile("short", short)]
    x, valid = random_crops(files, STATS, 64, 6, step_generator(0, 0, 0))
    assert x.shape == (64, 48, 64) and valid.shape == (64, 6)
    seen_short = False
    for b in range(64):
        crop = x[b].view(6, 8, 64)
        if valid[b].sum() == 3:  # the short file, used whole and padded
            seen_short = True
            assert torch.equal(crop[:3], short) and (crop[3:] == 0).all()
        else:
            starts = [s for s in range(15) if torch.equal(long[s:s + 6], crop)]
            assert starts, "crop is not a chunk-aligned slice of the file"
    assert seen_short


def test_crops_are_a_function_of_seed_rank_and_step():
    files = [LatentFile("a", ar_latents(30))]
    a = random_crops(files, STATS, 4, 5, step_generator(1, 0, 7))[0]
    b = random_crops(files, STATS, 4, 5, step_generator(1, 0, 7))[0]
    c = random_crops(files, STATS, 4, 5, step_generator(1, 1, 7))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_validation_crops_cover_files_deterministically():
    files = [LatentFile("a", ar_latents(13))]
    crops = validation_crops(files, STATS, 5)
    assert [int(v.sum()) for _, v in crops] == [5, 5, 3]
    assert torch.equal(crops[2][0].view(5, 8, 64)[:3], files[0].latents[10:])


def test_latent_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_latents(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json: missing"):
        load_latents(tmp_path / "empty")
    root = write_latent_dir(tmp_path / "lat", {"a.wav": ar_latents(4)})
    (root / "a.wav.0000.pt").unlink()
    with pytest.raises(DataError, match="listed in manifest.json but missing"):
        load_latents(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed manifest"):
        load_latents(root)


@pytest.mark.parametrize("bad", ["../other/x.wav.0000.pt", "/abs", "sub/../../other/x.wav.0000.pt",
                                 "link/x.wav.0000.pt", None])
def test_manifest_entries_must_stay_inside_the_latent_folder(tmp_path, bad):
    """A manifest that names `../x.pt`, an absolute path or a link out of the folder is refused, naming the entry;
    nothing outside --data-dir is read or trained on."""
    import json
    outside = write_latent_dir(tmp_path / "other", {"x.wav": ar_latents(4, seed=9)})
    root = write_latent_dir(tmp_path / "lat", {"a.wav": ar_latents(4)})
    (root / "link").symlink_to(outside)
    entry = {"path": bad if bad != "/abs" else str(outside / "x.wav.0000.pt"), "chunks": 4}  # each a real shard
    if bad is None:
        del entry["path"]
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"].append(entry)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="has no 'path'" if bad is None else "points outside") as exc:
        load_latents(root)
    assert "manifest.json" in str(exc.value) and "--finalize" in str(exc.value)
    if bad is not None:
        assert repr(entry["path"]) in str(exc.value)


# ---- array shards read from disk (issue 15: data beyond memory) ----

def long_sources() -> dict[str, torch.Tensor]:
    """Sources of varied length, one shorter than a crop, for folders cut into segments of 3 chunks."""
    return {f"s{i}.wav": ar_latents(n, seed=i) for i, n in enumerate([17, 11, 9, 4, 2, 23, 14, 6])}


def test_disk_backed_crops_equal_the_in_memory_crops(tmp_path):
    """For the same seed, rank and step, float32 array shards read from disk give exactly the crops (and validation
    crops, and split) that .pt shards held in memory give, including crops across segment borders of one source."""
    sources = long_sources()
    mem = load_latents(write_latent_dir(tmp_path / "pt", sources, "pt", segment=3), val_fraction=0.25)
    disk = load_latents(write_latent_dir(tmp_path / "f32", sources, "float32", segment=3), val_fraction=0.25)
    assert mem.in_memory and not disk.in_memory and disk.storage == "float32"
    assert all(isinstance(f, StoredFile) and len(f.paths) == -(-f.chunks // 3) for f in disk.train + disk.val)
    assert [f.source for f in mem.train] == [f.source for f in disk.train]
    assert [f.source for f in mem.val] == [f.source for f in disk.val] and mem.val
    for step in range(6):
        a = random_crops(mem.train, STATS, 8, 5, step_generator(3, 1, step))
        b = random_crops(disk.train, STATS, 8, 5, step_generator(3, 1, step))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for (xa, va), (xb, vb) in zip(validation_crops(mem.val, STATS, 5), validation_crops(disk.val, STATS, 5)):
        assert torch.equal(xa, xb) and torch.equal(va, vb)
    f = next(f for f in disk.train if f.source == "s0.wav")
    assert torch.equal(f.read(2, 7), sources["s0.wav"][2:7])  # segments 0, 1 and 2 of one source
    assert torch.equal(f.latents, sources["s0.wav"]) and f.read(15, 40).shape[0] == 2


def test_one_stored_file_holds_out_its_tail_without_reading_it(tmp_path):
    z = ar_latents(30)
    d = load_latents(write_latent_dir(tmp_path / "f", {"only.wav": z}, "float32", segment=7), val_fraction=0.1)
    (train,), (val,) = d.train, d.val
    assert isinstance(train, StoredFile) and isinstance(val, StoredFile) and val.source == "only.wav (tail)"
    assert torch.equal(torch.cat([train.latents, val.latents]), z) and val.chunks == 3
    assert torch.equal(val.read(1, 10), z[28:])


def test_float16_shards_round_trip_within_half_precision(tmp_path):
    """float16 keeps 11 significant bits: each value within 2**-11 of itself (relative; 2**-25 absolute near 0).
    On unit-Gaussian latents: mean error ~1.4e-4, largest ~2e-3 (the README's figures)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 8, 64, generator=g)
    z[0, 0, :4] = torch.tensor([0.0, 1e-7, -3e-5, 70.0])  # zero, below float16's normal range, large
    save_shard(tmp_path / "x.npy", z, {"source": "x"}, "float16")
    back = load_shard(tmp_path / "x.npy").latents
    assert back.dtype == torch.float32 and (tmp_path / "x.npy").stat().st_size < z.numel() * 2 + 256
    err = (back - z).abs()
    assert (err <= torch.clamp(z.abs() * 2.0 ** -11, min=2.0 ** -25)).all()
    assert err.mean() < 1.6e-4 and err[z.abs() < 4].max() <= 2.0 ** -10
    with pytest.raises(DataError, match="beyond float16's range.*--storage float32"):
        save_shard(tmp_path / "big.npy", z * 1e4, {"source": "big"}, "float16")
    assert not (tmp_path / "big.npy").exists()


def test_array_shards_are_safe_and_checked(tmp_path):
    """An .npy holding Python objects is refused, never unpickled; a shard re-written since the manifest, an array
    without its metadata and a manifest without chunk counts are errors that say what to do."""
    import json

    import numpy as np
    np.save(tmp_path / "evil.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "evil.json").write_text(json.dumps({"format": 2, "meta": {}}))
    with pytest.raises(DataError, match="evil.npy: not a readable latent array"):
        load_shard(tmp_path / "evil.npy")
    root = write_latent_dir(tmp_path / "lat", {"a.wav": ar_latents(6), "b.wav": ar_latents(5, seed=1)}, "float32")
    save_shard(root / "a.wav.0000.npy", ar_latents(4), {"source": "a.wav", "codec": "spectral", "codec_version": "1"})
    d = load_latents(root, val_fraction=0)
    with pytest.raises(DataError, match="holds 4 chunks, manifest.json says 6.*--finalize"):
        random_crops(d.train, STATS, 4, 3, step_generator(0, 0, 0))
    (root / "b.wav.0000.json").unlink()
    assert [p.name for p in find_shards(root)] == ["a.wav.0000.npy"]  # an array without metadata: unfinished
    with pytest.raises(DataError, match="listed in manifest.json but missing"):
        load_latents(root)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["shards"][0]["chunks"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="no chunk count.*--finalize"):
        load_latents(root)


def test_convert_a_folder_in_place_and_again(tmp_path):
    """pt -> float16 -> float32 in place: no re-encoding, one storage per folder, the manifest rebuilt; a folder
    left half way by a killed conversion (one shard in both storages) is refused by the manifest builder, with the
    fix, and converting again finishes it."""
    sources = long_sources()
    root = write_latent_dir(tmp_path / "lat", sources, "pt", segment=3)
    n = len(find_shards(root))
    r = convert_folder(root, "float16")
    assert (r.converted, r.kept) == (n, 0) and r.manifest["storage"] == "float16"
    assert not list(root.glob("*.pt")) and len(list(root.glob("*.npy"))) == n == len(list(root.glob("*.wav.*.json")))
    d = load_latents(root, val_fraction=0)
    for f in d.train:
        torch.testing.assert_close(f.latents, sources[f.source], atol=2e-3, rtol=2 ** -11)
    assert convert_folder(root, "float16").converted == 0  # already done: nothing rewritten
    # a conversion back to pt killed after writing the first shard's .pt, before removing its .npy
    a = root / "s0.wav.0000.npy"
    save_shard(a.with_suffix(".pt"), load_shard(a).latents, load_shard(a).meta)
    with pytest.raises(DataError, match=r"more than one storage \(31 float16, 1 pt\).*--convert"):
        build_manifest(root)
    r = convert_folder(root, "float32")
    assert r.manifest["storage"] == "float32" and not list(root.glob("*.pt")) and len(find_shards(root)) == n
    assert {shard_storage(p) for p in find_shards(root)} == {"float32"}


def test_background_workers_deliver_the_same_steps_in_order(tmp_path):
    """StepCrops item i is step first + i: drawn in the process or by 2 worker processes, from step 0 or resumed at
    step 3, the micro-batches and the generator state the training noise continues from are identical."""
    from codicodec_flow.data.loader import StepCrops, step_batches
    d = load_latents(write_latent_dir(tmp_path / "f", long_sources(), "float32", segment=3), val_fraction=0)
    crops = lambda first: StepCrops(d.train, STATS, 4, 5, 2, seed=7, rank=1, first=first, last=7)  # noqa: E731
    with step_batches(crops(0), 0) as batches:
        here = list(batches)
    with step_batches(crops(0), 2) as batches:
        workers = list(batches)
    with step_batches(crops(3), 2) as batches:
        resumed = list(batches)
    assert len(here) == len(workers) == 7 and len(resumed) == 4
    g = step_generator(7, 1, 5, 1)
    x, valid = random_crops(d.train, STATS, 4, 5, g)
    assert torch.equal(here[5][1].x, x) and torch.equal(here[5][1].valid, valid)
    assert torch.equal(here[5][1].generator().get_state(), g.get_state())
    for a, b in zip(here, workers):
        for ma, mb in zip(a, b):
            assert torch.equal(ma.x, mb.x) and torch.equal(ma.valid, mb.valid) and torch.equal(ma.rng, mb.rng)
    assert all(torch.equal(a[0].x, b[0].x) for a, b in zip(here[3:], resumed))
    assert not torch.equal(here[0][0].x, here[0][1].x)  # micro-batches differ
