import pytest
import torch

from codicodec_flow.data.dataset import (LatentFile, load_latents, random_crops, split_files, step_generator,
                                 validation_crops)
from codicodec_flow.errors import DataError
from codicodec_flow.data.shards import build_manifest, save_shard
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
