"""Rollout post-training (issue 16): train --init-from CKPT --rollout-p P, against drift."""
import pytest
import torch

from codicodec_flow.checkpoint import load_bundle, load_checkpoint
from codicodec_flow.config import ModelConfig, SampleConfig, TrainConfig
from codicodec_flow.errors import FlowError
from codicodec_flow.generate import StreamGenerator
from codicodec_flow.latents import LatentStats
from codicodec_flow.model import FlowDiT
from codicodec_flow.rollout import RolloutConfig, rollout_context
from codicodec_flow.train import run_train, setup
from conftest import ar_latents, randomised_model, write_latent_dir
from test_train import tiny_run

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, cond_dim=48, context_chunks=4)


def test_rollout_steps_resume_bit_exact(ar_data, tmp_path):
    """Rollouts (free and anchored) are drawn from the step's generator: a run with them resumes to the same weights."""
    stage = dict(rollout_p=0.5, rollout_nfe=2, rollout_start=0.0, rollout_anchor_p=0.5)  # free and anchored ones
    run_train(tiny_run(ar_data, tmp_path / "straight", **stage))
    run_train(tiny_run(ar_data, tmp_path / "split", **stage), stop_at=3)
    run_train(tiny_run(ar_data, tmp_path / "split", resume=True, **stage))
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    plain = load_checkpoint(run_train(tiny_run(ar_data, tmp_path / "plain", rollout_p=0.0)) and tmp_path / "plain" / "last.pt")
    assert any(not torch.equal(a["model"][k], plain["model"][k]) for k in plain["model"])  # the rollouts changed it


def test_rollout_start_makes_rollouts_a_closing_stage_of_the_same_run(ar_data, tmp_path):
    """--rollout-start 0.5: the first half of the steps are a plain run's, bit for bit; the second half are rollout
    steps, and a resume across the border lands on the same weights as the run straight through."""
    stage = dict(rollout_p=1.0, rollout_nfe=2, rollout_start=0.5)
    run_train(tiny_run(ar_data, tmp_path / "plain_half", rollout_p=0.0), stop_at=3)
    run_train(tiny_run(ar_data, tmp_path / "staged", **stage), stop_at=3)
    half_plain, half_staged = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("plain_half", "staged"))
    assert all(torch.equal(half_plain[k], half_staged[k]) for k in half_plain)  # steps 0-2: no rollout, no extra draw
    run_train(tiny_run(ar_data, tmp_path / "staged", resume=True, **stage))
    run_train(tiny_run(ar_data, tmp_path / "straight", **stage))
    run_train(tiny_run(ar_data, tmp_path / "plain", rollout_p=0.0))
    staged, straight, plain = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("staged", "straight", "plain"))
    assert all(torch.equal(staged[k], straight[k]) for k in staged)
    assert any(not torch.equal(staged[k], plain[k]) for k in plain)  # steps 3-5 were rollout steps


@pytest.mark.parametrize("over, said", [({"rollout_p": 1.5}, "rollout-p"), ({"rollout_solver": "magic"}, "unknown solver"),
                                        ({"rollout_nfe": 0}, "rollout-nfe"), ({"rollout_start": 1.0}, "rollout-start"),
                                        ({"rollout_start": -0.1}, "rollout-start"),
                                        ({"rollout_anchor_p": 1.5}, "rollout-anchor-p"),
                                        ({"rollout_anchor_t": 0.0}, "rollout-anchor-t"),
                                        ({"rollout_context_noise": 1.0}, "rollout-context-noise"),
                                        ({"rollout_max_t": 0.0}, "rollout-max-t"),
                                        ({"rollout_max_t": 1.5}, "rollout-max-t")])
def test_bad_rollout_settings_are_refused_at_setup(ar_data, tmp_path, over, said):
    with pytest.raises(FlowError, match=said):
        setup(tiny_run(ar_data, tmp_path / "run", **over))


def rollout_spread(ckpt, chunks: int = 60, streams: int = 8) -> float:
    """Spread (std) of the last 20 chunks of `streams` live-default rollouts, in normalised units."""
    bundle = load_bundle(ckpt)
    g = StreamGenerator(bundle.model, bundle.stats, SampleConfig(solver="midpoint", nfe=4, num_samples=streams,
                                                                 seed=1), "cpu")
    g.prefill(ar_latents(4, rho=0.9, seed=99))
    z = g.generate(chunks)[:, -20:]  # raw latents, (streams, 20, 8, 64)
    return float(((z - bundle.stats.mean) / bundle.stats.std).std())


def test_rollout_post_training_holds_the_spread_that_teacher_forcing_lets_drift(tmp_path):
    """On an AR(1) process (spread 1), a tiny model trained by teacher forcing drifts wide in its own rollouts.
    The same number of further steps with rollouts brings the spread back toward 1; plain steps do not. The rollouts'
    self-continued chunks train at every noise level here: this drift is in the chunks' levels, decided above the
    default --rollout-max-t of 0.8 (there they brought it from 1.12 to 1.11 only)."""
    data = write_latent_dir(tmp_path / "lat", {f"f{i}.wav": ar_latents(400, rho=0.9, seed=i) for i in range(4)})
    common = dict(batch_size=8, crop_tokens=64, val_every=0, log_every=100, ema_decay=0.5, val_fraction=0.0,
                  noisy_share=1.0)  # every chunk a target, as when this case was calibrated
    run_train(tiny_run(data, tmp_path / "base", flow={"t_dist": "logit_normal"}, max_steps=200, lr=2e-3,
                       warmup_steps=10, rollout_p=0.0, **common))  # the fine-tunes keep its logit-normal times
    base = rollout_spread(tmp_path / "base" / "ema.pt")
    for name, rollout_p in (("plain", 0.0), ("rollout", 1.0)):
        run_train(tiny_run(data, tmp_path / name, init_from=tmp_path / "base" / "ema.pt", max_steps=40, lr=5e-4,
                           warmup_steps=1, rollout_p=rollout_p, rollout_start=0.0, rollout_max_t=1.0, **common))
    plain, rolled = rollout_spread(tmp_path / "plain" / "ema.pt"), rollout_spread(tmp_path / "rollout" / "ema.pt")
    assert base > 1.08 and plain > 1.08, (base, plain)  # teacher forcing: drifted wide, and stays so
    assert abs(rolled - 1) < 0.5 * min(abs(base - 1), abs(plain - 1)), (base, plain, rolled)


def test_the_rollout_stage_is_on_by_default_and_off_for_a_student_unless_asked(ar_data, tmp_path):
    """The closing stage is on by default, at every noise level, and brings the own-chunk mark with it: to a new run,
    and to --init-from weights without one; --no-mark-own or --rollout-p 0 leave it out, a student keeps its
    teacher's, and a fine-tune cannot take a mark away."""
    run = tiny_run(ar_data, tmp_path / "plain")
    assert (run.train.rollout_p, run.train.rollout_start, run.train.rollout_max_t, run.flow.t_dist) == (0.25, 0.8, 1.0,
                                                                                                       "uniform")
    assert run.model.mark_own
    assert not tiny_run(ar_data, tmp_path / "plain", rollout_p=0.0).model.mark_own
    assert not tiny_run(ar_data, tmp_path / "plain", model={"mark_own": False}).model.mark_own
    run_train(tiny_run(ar_data, tmp_path / "teacher", max_steps=1, rollout_p=0.0))
    teacher = str(tmp_path / "teacher" / "ema.pt")
    student = tiny_run(ar_data, tmp_path / "student", distill_from=teacher)
    assert student.train.rollout_p == 0.0 and not student.model.mark_own
    assert tiny_run(ar_data, tmp_path / "student", distill_from=teacher, rollout_p=0.25).train.rollout_p == 0.25
    assert tiny_run(ar_data, tmp_path / "fine", init_from=teacher).model.mark_own  # its own closing stage
    assert not tiny_run(ar_data, tmp_path / "fine", init_from=teacher, rollout_p=0.0).model.mark_own
    run_train(tiny_run(ar_data, tmp_path / "marked", max_steps=1))
    marked = str(tmp_path / "marked" / "ema.pt")
    assert tiny_run(ar_data, tmp_path / "student", distill_from=marked).model.mark_own
    with pytest.raises(FlowError, match="cannot take away"):
        tiny_run(ar_data, tmp_path / "fine", init_from=marked, model={"mark_own": False})


def test_a_run_saved_before_the_rollout_stage_resumes_as_it_was_trained(ar_data, tmp_path):
    """Checkpoints written before --rollout-p (or --rollout-start, --rollout-anchor-p, --rollout-max-t) existed lack
    the keys: their runs go on without rollouts (or with rollouts from the first step, as --rollout-p then meant, with
    free rollouts only, or with self-continued chunks at every noise level), not with today's defaults."""
    every = ("rollout_p", "rollout_start", "rollout_anchor_p", "rollout_max_t")
    for missing, expected in ((every, (0.0, 0.0, 0.0, 1.0)),
                              (("rollout_start", "rollout_anchor_p", "rollout_max_t"), (0.5, 0.0, 0.0, 1.0)),
                              (("rollout_anchor_p", "rollout_max_t"), (0.5, 0.8, 0.0, 1.0)),
                              (("rollout_max_t",), (0.5, 0.8, 0.5, 1.0))):
        out = tmp_path / "_".join(missing)
        run_train(tiny_run(ar_data, out, rollout_p=0.5, rollout_start=0.8, rollout_anchor_p=0.5, rollout_max_t=0.6),
                  stop_at=2)
        ckpt = torch.load(out / "last.pt", weights_only=True)
        for key in missing:
            del ckpt["config"]["train"][key]
        torch.save(ckpt, out / "last.pt")
        run = tiny_run(ar_data, out, resume=True)
        t = run.train
        assert (t.rollout_p, t.rollout_start, t.rollout_anchor_p, t.rollout_max_t) == expected


def test_anchored_rollouts_keep_the_real_music_near_and_free_ones_do_not():
    """An anchored rollout finishes each chunk from its real one noised to anchor_t: at a small anchor_t the rolled-out
    context stays near the real crop, at 1 it is as far as a free rollout's; the prompt is the real one either way,
    and the same generator state draws the same rollout."""
    model, x = randomised_model(CFG, seed=3), torch.randn(2, 6 * CFG.chunk_tokens, CFG.latent_dim)

    def rolled(**kw):
        ctx, P = rollout_context(model, x, RolloutConfig(p=1.0, nfe=2, **kw), 0.02, torch.Generator().manual_seed(4))
        return ctx, P, (ctx - x)[:, P * CFG.chunk_tokens:].pow(2).mean().item()

    near_ctx, P, near = rolled(anchor_p=1.0, anchor_t=0.05)
    assert torch.equal(near_ctx[:, :P * CFG.chunk_tokens], x[:, :P * CFG.chunk_tokens]) and P < 6
    _, _, fresh = rolled(anchor_p=1.0, anchor_t=1.0)
    _, _, free = rolled()
    assert near < 0.05 * free and fresh > 0.5 * free, (near, fresh, free)
    assert torch.equal(rolled(anchor_p=1.0, anchor_t=0.05)[0], near_ctx)


def test_a_chunk_finished_from_full_noise_is_a_fresh_chunk():
    """next_chunk_from(anything, t=1) draws the same noise and runs the same steps as next_chunk: one code path."""
    model, prompt = randomised_model(CFG, seed=5), ar_latents(3, seed=1)
    sample = SampleConfig(solver="heun", nfe=4, num_samples=2, seed=7)
    streams = [StreamGenerator(model, LatentStats.identity(), sample, "cpu") for _ in range(2)]
    for g in streams:
        g.prefill(prompt)
    assert torch.equal(streams[0].next_chunk(), streams[1].next_chunk_from(torch.full((2, 8, 64), 9.0), 1.0))
    assert torch.equal(streams[0].next_chunk(), streams[1].next_chunk())  # and the streams stay in step


def test_rollouts_use_the_context_noise_they_are_given(ar_data, tmp_path, monkeypatch):
    """--rollout-context-noise reaches the rollouts (match it to the --context-noise you generate with); its default
    is generation's default."""
    import codicodec_flow.train as train_module
    assert TrainConfig(data_dir="", out_dir="").rollout_context_noise == SampleConfig().context_noise
    seen, real = [], train_module.rollout_context

    def spy(model, x, cfg, context_noise, g):
        seen.append(context_noise)
        return real(model, x, cfg, context_noise, g)

    monkeypatch.setattr(train_module, "rollout_context", spy)
    run_train(tiny_run(ar_data, tmp_path / "run", max_steps=2, rollout_p=1.0, rollout_start=0.0, rollout_nfe=1,
                       rollout_context_noise=0.0, val_every=99))
    assert seen == [0.0, 0.0]


def test_rollout_steps_train_self_continued_chunks_below_max_t(ar_data, tmp_path, monkeypatch):
    """With --rollout-max-t, a rollout step's chunks after the real opening (whose past holds the model's own chunks)
    draw their noise level below the cap; the others, and teacher-forced steps, draw from the whole range."""
    import codicodec_flow.train as train_mod
    seen = []

    def spy(*args, **kw):
        batch = real(*args, **kw)
        seen.append((args[8], batch))
        return batch
    real = train_mod.training_batch
    monkeypatch.setattr(train_mod, "training_batch", spy)
    run_train(tiny_run(ar_data, tmp_path / "run", rollout_p=0.5, rollout_nfe=2, rollout_start=0.0,
                       rollout_max_t=0.3, noisy_share=1.0, max_steps=8))
    capped = [(caps, b) for caps, b in seen if caps is not None]
    assert capped and len(capped) < len(seen)  # rollout steps and teacher-forced ones
    assert any((caps < 1).any() for caps, _ in capped)
    for caps, b in capped:
        low = caps < 1
        assert caps[0] == 1.0 and torch.allclose(caps[low], torch.tensor(0.3))
        assert (b.t[:, low] <= 0.3 + 1e-6).all()


def test_mark_own_trains_the_mark_and_a_fine_tune_can_add_it(ar_data, tmp_path):
    """train --mark-own: the rollout steps train the own-chunk mark off zero (teacher-forced steps never show it) and
    the run resumes bit-exact; --init-from adds it to a model without it, at zero, so the fine-tune starts from the
    same function; --resume cannot add it to a run that has none."""
    from codicodec_flow.errors import CheckpointError

    def marked_run(out, **over):
        return tiny_run(ar_data, out, model={"mark_own": True}, rollout_p=0.5, rollout_nfe=2, rollout_start=0.0,
                        **over)
    run_train(marked_run(tmp_path / "straight"))
    run_train(marked_run(tmp_path / "split"), stop_at=3)
    run_train(marked_run(tmp_path / "split", resume=True))
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["config"]["model"]["mark_own"] and a["model"]["own_mark"].abs().max() > 0
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert load_checkpoint(tmp_path / "straight" / "ema.pt")["model"]["own_mark"].abs().max() > 0
    run_train(tiny_run(ar_data, tmp_path / "plain", rollout_p=0.0))
    with pytest.raises(CheckpointError, match="mark_own"):
        run_train(marked_run(tmp_path / "plain", resume=True))
    fine = marked_run(tmp_path / "fine", init_from=tmp_path / "plain" / "ema.pt", max_steps=2)
    source = fine.init_from
    assert fine.model.mark_own and not source.model_cfg.mark_own
    start = FlowDiT(fine.model)
    source.load_into(start)  # as the fine-tune starts: the source's weights, the mark at zero
    assert torch.equal(start.own_mark, torch.zeros_like(start.own_mark))
    assert all(torch.equal(p, source.state[k]) for k, p in start.state_dict().items() if k != "own_mark")
    run_train(fine)
    assert load_checkpoint(tmp_path / "fine" / "ema.pt")["config"]["model"]["mark_own"]
