"""Few-step students (issue 16): train --distill-from TEACHER, reflow on the teacher's own samples."""
from dataclasses import replace

import pytest
import torch

from codicodec_flow.checkpoint import load_bundle, load_checkpoint
from codicodec_flow.config import MODEL_PRESETS, FlowConfig, SampleConfig
from codicodec_flow.distill import (DistillConfig, batch_noise, chunk_velocity, distill_batch, landing_batch,
                                   reflow_batch, teacher_samples)
from codicodec_flow.errors import CheckpointError, FlowError
from codicodec_flow.flow import flow_loss, make_batch, training_batch
from codicodec_flow.generate import StreamGenerator
from codicodec_flow.latents import LatentStats
from codicodec_flow.model import FlowDiT
from codicodec_flow.train import run_train, setup
from conftest import ar_latents, randomised_model
from test_train import tiny_run

CFG = replace(MODEL_PRESETS["tiny"], context_chunks=4)


def crops(n_chunks: int, batch: int, seed: int) -> torch.Tensor:
    """(batch, n * 8, 64) AR(1) crops."""
    return torch.stack([ar_latents(n_chunks, rho=0.9, seed=seed + b) for b in range(batch)]).flatten(1, 2)


def clean_batch(x: torch.Tensor, seed: int, uncond=None):
    """A two-stream batch with a noise-free context (as generation with context_noise 0 sees it)."""
    B, n = x.shape[0], x.shape[1] // 8
    g = torch.Generator().manual_seed(seed)
    return make_batch(x, torch.ones(B, n, dtype=torch.bool), torch.rand(B, n, generator=g), torch.zeros(B, n),
                      torch.zeros(B, n, dtype=torch.bool) if uncond is None else uncond, CFG.context_chunks, 8, g)


@pytest.mark.parametrize("solver, nfe, cfg_scale", [("heun", 4, 1.0), ("euler", 3, 1.0), ("midpoint", 4, 2.5)])
def test_teacher_samples_are_the_chunks_the_cached_generator_makes(solver, nfe, cfg_scale):
    """All noisy chunks at once, from the batch's noise, equal the cached generator's chunk after the same past
    and from the same noise, chunk by chunk: also past the window, and with guidance. (The past is streamed in
    chunk by chunk, as in a stream: a prefill would keep only the last W chunks of the prompt, so the oldest
    one would not see its own past.)"""
    model = randomised_model(CFG, seed=3, scale=0.1)
    x = crops(7, 2, seed=0)
    batch = clean_batch(x, seed=1)
    z = teacher_samples(model, batch, DistillConfig(solver, nfe, cfg_scale)).view(2, 7, 8, 64)
    eps = batch_noise(batch).view(2, 7, 8, 64)
    for i in (0, 2, 6):  # no past, a partial window, a window that has slid
        gen = StreamGenerator(model, LatentStats.identity(), SampleConfig(solver=solver, nfe=nfe, cfg_scale=cfg_scale,
                                                                          context_noise=0.0, num_samples=2), "cpu")
        for k in range(i):
            gen.add_context(x.view(2, 7, 8, 64)[:, k])
        gen._noise = lambda: eps[:, i]  # the batch's noise for chunk i
        torch.testing.assert_close(gen.next_chunk(), z[:, i], atol=2e-5, rtol=1e-4)


def test_reflow_batch_keeps_noise_times_and_context_and_swaps_the_data():
    x = crops(5, 3, seed=4)
    g = torch.Generator().manual_seed(0)
    batch = training_batch(x, torch.ones(3, 5, dtype=torch.bool), FlowConfig(), CFG.context_chunks, 8, g)
    same = reflow_batch(batch, x)  # the real chunks as "teacher samples": the batch itself
    torch.testing.assert_close(same.inputs, batch.inputs, atol=1e-6, rtol=0)
    torch.testing.assert_close(same.target, batch.target, atol=1e-6, rtol=0)
    z = torch.randn_like(x)
    other = reflow_batch(batch, z)
    L = x.shape[1]
    assert torch.equal(other.inputs[:, :L], batch.inputs[:, :L]) and torch.equal(other.times, batch.times)
    torch.testing.assert_close(batch_noise(other), batch_noise(batch), atol=1e-5, rtol=0)
    torch.testing.assert_close(other.target, batch_noise(batch) - z, atol=1e-5, rtol=0)


def test_landing_chunks_start_where_the_students_first_step_lands_and_head_for_the_teachers_chunk():
    """Picked chunks (t >= 1/4) sit where one Euler step of the student from the batch's noise lands at their t, and
    one more step from there to t = 0 lands on the teacher's chunk; the others are the ordinary reflow batch."""
    student = randomised_model(CFG, seed=7, scale=0.1)
    x = crops(6, 4, seed=2)
    g = torch.Generator().manual_seed(0)
    batch = training_batch(x, torch.ones(4, 6, dtype=torch.bool), FlowConfig(t_dist="uniform"), CFG.context_chunks, 8,
                           g)
    z = torch.randn_like(x)
    plain = reflow_batch(batch, z)
    none = landing_batch(student, batch, z, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(none.inputs, plain.inputs) and torch.equal(none.target, plain.target)
    out = landing_batch(student, batch, z, 1.0, torch.Generator().manual_seed(1))
    L = x.shape[1]
    eps = batch_noise(batch)
    with torch.no_grad():
        v1 = chunk_velocity(student.eval(), batch)(eps, torch.ones(eps.shape[:2]))
    t = batch.times[:, L:, None]
    picked = (t >= 0.25).expand_as(z)
    assert picked.any() and (~picked).any()
    noisy = out.inputs[:, L:]
    torch.testing.assert_close(noisy[picked], (eps - (1 - t) * v1)[picked], atol=1e-5, rtol=0)
    torch.testing.assert_close((noisy - t * out.target)[picked], z[picked], atol=1e-4, rtol=0)
    assert torch.equal(noisy[~picked], plain.inputs[:, L:][~picked])
    assert torch.equal(out.target[~picked], plain.target[~picked])
    assert torch.equal(out.inputs[:, :L], batch.inputs[:, :L]) and torch.equal(out.times, batch.times)


def one_step_error(model: FlowDiT, teacher: FlowDiT, seed: int) -> float:
    """Mean squared distance of a one-evaluation sample from the teacher's 8-evaluation one, same noise and past."""
    batch = clean_batch(crops(6, 8, seed=100 + seed), seed=seed)
    target = teacher_samples(teacher, batch, DistillConfig("heun", 8))
    one = teacher_samples(model, batch, DistillConfig("euler", 1))
    return float((one - target).pow(2).mean())


def test_student_at_one_evaluation_beats_its_teacher_at_one():
    """A curved teacher's one-step sample is far from its own many-step one; a student trained briefly on the
    teacher's samples (starting from the teacher's weights) gets much closer at one evaluation."""
    teacher = randomised_model(CFG, seed=5, scale=0.15).requires_grad_(False)
    student = FlowDiT(CFG)
    student.load_state_dict(teacher.state_dict())
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        x = crops(6, 8, seed=1000 + 8 * step)
        batch = training_batch(x, torch.ones(8, 6, dtype=torch.bool), FlowConfig(t_dist="uniform"),
                               CFG.context_chunks, 8, g)
        loss, _ = flow_loss(student, distill_batch(teacher, batch, DistillConfig("heun", 8), student, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    before = sum(one_step_error(teacher, teacher, s) for s in range(3)) / 3
    after = sum(one_step_error(student, teacher, s) for s in range(3)) / 3
    assert after < 0.5 * before, (before, after)


def test_train_distill_from_runs_resumes_and_records_its_teacher(ar_data, tmp_path):
    run_train(tiny_run(ar_data, tmp_path / "teacher"))
    teacher = tmp_path / "teacher" / "ema.pt"
    over = dict(distill_from=str(teacher), distill_solver="euler", distill_nfe=2, distill_landing=0.5)
    run_train(tiny_run(ar_data, tmp_path / "straight", **over))
    run_train(tiny_run(ar_data, tmp_path / "split", **over), stop_at=3)
    run_train(tiny_run(ar_data, tmp_path / "split", resume=True))  # the saved teacher, solver, NFE and landing share
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # resume is exact, not today's defaults
    assert a["config"]["train"]["distill_from"] == str(teacher)
    assert a["init_from"]["path"] == str(teacher.resolve())  # the student started from its teacher's weights
    plain = tmp_path / "plain"
    run_train(tiny_run(ar_data, plain, init_from=teacher))
    c = load_checkpoint(plain / "last.pt")
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])  # the teacher's samples mattered
    assert load_bundle(tmp_path / "straight" / "ema.pt").model_cfg == load_bundle(teacher).model_cfg


@pytest.mark.parametrize("over, said", [({"distill_solver": "magic"}, "unknown solver"),
                                        ({"distill_nfe": 0}, "NFE"), ({"distill_cfg": -1.0}, "distill-cfg"),
                                        ({"distill_landing": 1.5}, "distill-landing")])
def test_bad_distill_settings_are_refused_at_setup(ar_data, tmp_path, over, said):
    run_train(tiny_run(ar_data, tmp_path / "teacher", max_steps=1))
    with pytest.raises(FlowError, match=said):
        setup(tiny_run(ar_data, tmp_path / "run", distill_from=str(tmp_path / "teacher" / "ema.pt"), **over))


def test_a_teacher_with_another_window_is_refused(ar_data, tmp_path):
    run_train(tiny_run(ar_data, tmp_path / "teacher", max_steps=1))
    run_train(tiny_run(ar_data, tmp_path / "other", max_steps=1))
    run = tiny_run(ar_data, tmp_path / "run", init_from=tmp_path / "other" / "ema.pt",
                   distill_from=str(tmp_path / "teacher" / "ema.pt"))
    setup(run)  # same shape and normalisation: accepted
    wide = replace(run, model=replace(run.model, context_chunks=run.model.context_chunks + 1))
    with pytest.raises(CheckpointError, match="window"):
        setup(wide)
