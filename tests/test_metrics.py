import pytest
import torch

from codicodec_flow.evaluation.metrics import (SpreadBand, drift_report, fd_growth_quarters, frechet_distance,
                                               frechet_report, growth_intervals, memorisation, prompt_relatedness,
                                               spread_parts, spread_ratio)


def gauss(n, d=8, mu=0.0, scale=1.0, seed=0):
    return mu + scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_frechet_identical_sets_is_zero():
    x = gauss(500)
    assert abs(frechet_distance(x, x)) < 1e-8


def test_frechet_closed_forms():
    # same covariance, shifted means: FD = |delta mu|^2 (up to sampling noise)
    a, b = gauss(200_000, seed=1), gauss(200_000, mu=0.5, seed=2)
    assert abs(frechet_distance(a, b) - 8 * 0.25) < 0.05
    # N(0, I) vs N(0, s^2 I): FD = d (1 - s)^2
    c = gauss(200_000, scale=2.0, seed=3)
    assert abs(frechet_distance(a, c) - 8 * 1.0) < 0.1


def test_frechet_report_token_and_chunk():
    z = torch.randn(40, 8, 64)
    r = frechet_report(z, z)
    assert r["fd_token"] < 1e-6 and r["fd_chunk"] < 1e-6
    assert frechet_report(z + 1.0, z)["fd_chunk"] > 60


def test_memorisation_flags_copies():
    g = torch.Generator().manual_seed(0)  # the verdicts hold for any draw, but 50 samples near a threshold need one
    train = torch.randn(200, 8, 64, generator=g)
    real = torch.randn(50, 8, 64, generator=g)
    copies = train[:50] + 0.01 * torch.randn(50, 8, 64, generator=g)
    fresh = torch.randn(50, 8, 64, generator=g)
    assert memorisation(copies, real, train)["copied_fraction"] > 0.9
    m = memorisation(fresh, real, train)
    assert m["copied_fraction"] < 0.1 and 0.8 < m["nn_ratio"] < 1.2


def test_prompt_relatedness():
    prompts = 2 * torch.randn(10, 4, 8, 64)
    related = prompts.mean((1, 2), keepdim=True) + 0.1 * torch.randn(10, 6, 8, 64)
    unrelated = torch.randn(10, 6, 8, 64)
    assert prompt_relatedness(related, prompts)["ratio"] < 0.3
    assert prompt_relatedness(unrelated, prompts)["ratio"] > 0.7


def test_drift_verdicts():
    ref = torch.randn(400, 8, 64)
    stationary = torch.randn(1000, 8, 64)
    drifting = torch.randn(1000, 8, 64) + torch.linspace(0, 3, 1000)[:, None, None]
    exploding = torch.randn(1000, 8, 64) * torch.linspace(1, 5, 1000)[:, None, None]
    assert drift_report(stationary, ref)["verdict"] == "stable"
    d = drift_report(drifting, ref)
    assert d["drift"] and "means moved" in d["verdict"] and len(d["segments"]) == 20
    assert "too wide" in drift_report(exploding, ref)["verdict"]
    nan = stationary.clone()
    nan[500] = float("nan")
    assert "NaN" in drift_report(nan, ref)["verdict"]


def test_fd_growth_over_quarters_tells_a_trend_from_one_loud_segment():
    ref = torch.randn(400, 8, 64)
    stationary = drift_report(torch.randn(1000, 8, 64), ref)
    assert 0.9 < stationary["fd_growth_quarters"] < 1.1
    episode = torch.randn(1000, 8, 64)
    episode[950:] *= 3  # one loud last segment: the last-over-first figure jumps, the quarters' much less
    d = drift_report(episode, ref)
    assert d["fd_growth"] > 10 and d["fd_growth_quarters"] < 1.2
    trend = torch.randn(1000, 8, 64) * torch.linspace(1, 2, 1000)[:, None, None]  # spreading out all along
    assert drift_report(trend, ref)["fd_growth_quarters"] > 3
    assert fd_growth_quarters([2.0, 4.0]) == 2.0 and fd_growth_quarters([1.0]) is None
    assert fd_growth_quarters([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(7.5 / 1.5)


def test_growth_intervals_say_how_far_the_figures_move_over_streams():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 8, 64, generator=g)
    still = drift_report(torch.randn(16, 400, 8, 64, generator=g), ref)  # 16 stationary streams, 8 segments
    iv = still["growth_intervals"]
    for name in ("fd_growth", "fd_growth_quarters"):
        lo, hi = iv[f"{name}_interval"]
        assert 0.9 < lo <= still[name] <= hi < 1.1 and hi > lo and iv["interval_level"] == 0.9
    widening = torch.randn(16, 400, 8, 64, generator=g) * torch.linspace(1, 1.5, 400)[:, None, None]  # all drift
    assert drift_report(widening, ref)["growth_intervals"]["fd_growth_quarters_interval"][0] > 1.5
    assert drift_report(torch.randn(400, 8, 64), ref)["growth_intervals"] is None  # one stream: nothing to redraw
    # streams that agree leave nothing to redraw; one stream alone carrying the growth widens the interval
    same = growth_intervals(torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    assert same["fd_growth_interval"] == pytest.approx([2.0, 2.0])
    lo, hi = growth_intervals(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 5.0]]))["fd_growth_interval"]
    assert lo == pytest.approx(1.0) and hi > 2.0


def test_drift_reports_what_real_segments_score():
    ref = torch.randn(400, 8, 64)
    d = drift_report(torch.randn(200, 8, 64), ref, segment=50)
    # segments of the same distribution score like the reference's own segments
    assert d["real_segment_fd"] is not None and abs(d["segments"][0]["fd"] - d["real_segment_fd"]) < 0.5 * d["real_segment_fd"]
    assert drift_report(torch.randn(200, 8, 64), ref[:20], segment=50)["real_segment_fd"] is None


def test_spread_parts_tell_averaged_continuations_from_flat_ones():
    """Streams = a per-prompt level + their own dynamics; shrink one or the other and only that part drops."""
    g = torch.Generator().manual_seed(0)
    level, motion = torch.randn(400, 1, 1, 64, generator=g), torch.randn(400, 6, 8, 64, generator=g)
    real = level + motion
    same = spread_parts(torch.randn(400, 1, 1, 64, generator=g) + torch.randn(400, 6, 8, 64, generator=g), real)
    assert abs(same["within"] - 1) < 0.05 and abs(same["between"] - 1) < 0.1
    averaged = spread_parts(0.5 * level + torch.randn(400, 6, 8, 64, generator=g), real)  # toward the mean
    assert abs(averaged["within"] - 1) < 0.05 and averaged["between"] < 0.75
    flat = spread_parts(level + 0.5 * torch.randn(400, 6, 8, 64, generator=g), real)  # prompt kept, dull inside
    assert abs(flat["within"] - 0.5) < 0.03 and flat["between"] > 0.9


def test_spread_ratio_known_answers():
    real = torch.randn(500, 8, 64)
    assert abs(spread_ratio(torch.randn(500, 8, 64), real) - 1.0) < 0.03
    assert abs(spread_ratio(0.5 * torch.randn(500, 8, 64) + 3.0, real) - 0.5) < 0.02  # a shift does not count
    per_channel = torch.randn(500, 8, 64) * torch.linspace(0.5, 1.5, 64)  # channel c has std 0.5 + c / 63
    assert abs(spread_ratio(per_channel, real) - 1.0) < 0.03  # the mean over channels
    assert SpreadBand.verdict(0.58, SpreadBand().continuation) == "washed out"
    assert SpreadBand.verdict(1.0, SpreadBand().continuation) == "faithful"
    assert SpreadBand.verdict(1.3, SpreadBand().segment) == "too wide"


def test_a_spread_just_outside_the_band_never_prints_as_its_edge():
    band = SpreadBand().continuation  # (0.9, 1.1)
    assert [SpreadBand.show(v, band) for v in (0.897, 0.8951, 1.104, 0.9, 0.903, 0.58)] == \
        ["0.897", "0.895", "1.104", "0.90", "0.90", "0.58"]


def test_drift_flags_a_washed_out_rollout_and_not_a_faithful_one():
    """Real segments vary less than the whole collection: spread is judged against them, not the whole."""
    g = torch.Generator().manual_seed(0)
    # a collection of 'pieces': each 50-chunk stretch has its own mean, so a stretch is narrower than the whole
    ref = torch.randn(800, 8, 64, generator=g) + torch.randn(16, 1, 1, 64, generator=g).repeat_interleave(50, 0).flatten(0, 1)[:800]
    faithful = torch.randn(1000, 8, 64, generator=g) + torch.randn(20, 1, 1, 64, generator=g).repeat_interleave(50, 0).flatten(0, 1)
    d = drift_report(faithful, ref)
    assert d["verdict"] == "stable" and 0.85 <= d["spread_min"] <= d["spread_max"] <= 1.15
    assert d["real_segment_std_ratio"] < 0.9  # a real stretch is narrower than the whole collection
    washed = 0.5 * faithful  # averaged, under-dynamic: 0.5x the real spread in every segment
    w = drift_report(washed, ref)
    assert w["drift"] and "washed out" in w["verdict"] and w["spread_max"] < 0.6


def test_drift_averages_several_streams_like_several_pieces():
    """One stream is like one piece; 16 streams from different prompts average out what pieces differ in."""
    g = torch.Generator().manual_seed(1)
    piece_scale = lambda n: (0.5 + torch.rand(n, 1, 1, 1, generator=g))  # noqa: E731 pieces of 0.5-1.5x dynamics
    ref = (torch.randn(40, 50, 8, 64, generator=g) * piece_scale(40)).flatten(0, 1)  # 40 pieces of 50 chunks
    quiet_piece = 0.55 * torch.randn(1, 500, 8, 64, generator=g)  # a real-like but quiet piece: one stream alone
    assert "washed out" in drift_report(quiet_piece, ref)["verdict"]  # ... cannot tell the model from the piece
    streams = torch.randn(16, 500, 8, 64, generator=g) * piece_scale(16)  # 16 real-like streams
    d = drift_report(streams, ref)
    assert d["streams"] == 16 and d["verdict"] == "stable", d["verdict"]
    assert "washed out" in drift_report(0.6 * streams, ref)["verdict"]


def test_drift_holds_each_stream_to_its_own_piece():
    """Streams continuing quiet pieces are as dynamic as those pieces: faithful against their own pieces, though
    narrower than the collection's average stretch; a stream narrower than its own piece is still flagged."""
    g = torch.Generator().manual_seed(2)
    scales = [0.6, 0.6, 0.6, 1.4]  # three quiet pieces and a loud one
    pieces = [s * torch.randn(300, 8, 64, generator=g) for s in scales]
    quiet_streams = torch.stack([0.6 * torch.randn(500, 8, 64, generator=g) for _ in range(3)])  # continuing 0, 1, 2
    by_collection = drift_report(quiet_streams, pieces)
    assert by_collection["spread_reference"] == "the collection" and "washed out" in by_collection["verdict"]
    own = drift_report(quiet_streams, pieces, stream_pieces=[0, 1, 2])
    assert own["verdict"] == "stable" and 0.9 < own["spread_min"] <= own["spread_max"] < 1.1
    assert own["spread_reference"] == "each stream's own piece"
    assert "washed out" in drift_report(0.7 * quiet_streams, pieces, stream_pieces=[0, 1, 2])["verdict"]
    with pytest.raises(ValueError, match="3 streams"):
        drift_report(quiet_streams, pieces, stream_pieces=[0, 1])


def test_real_segments_never_cross_from_one_piece_into_the_next():
    """Two steady pieces far apart: a stretch across their border would look far wider than either piece."""
    a, b = torch.randn(75, 8, 64), torch.randn(75, 8, 64) + 4.0
    x = torch.randn(100, 8, 64)
    apart = drift_report(x, [a, b], segment=50)["real_segment_std_ratio"]  # stretches 0-49 of a and of b
    crossed = drift_report(x, torch.cat([a, b]), segment=50)["real_segment_std_ratio"]  # ... and one across
    assert 0.4 < apart < 0.5 and crossed > apart + 0.1  # a piece's std 1 against the collection's sqrt(5)
