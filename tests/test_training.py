"""The training loop in-process (no Ray): checkpoints, resume, the p split, non-finite losses, evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

import isosweep.core.losses as losses
from isosweep.models.loading import load_unet_and_scheduler
from isosweep.spec import resolve_trial_spec, spec_from_dict
from isosweep.training.checkpoint import load_train_state
from isosweep.training.loop import NonFiniteLossError, train_loop
from isosweep.training.reporting import LocalReporter


def make_spec(model_dir, **train):
    t = dict(lambda_iso=0.1, p=0.5, global_batch_size=4, max_steps=6, checkpoint_every=3, report_every=1,
             ema_decay=0.9, learning_rate=1e-3, seed=0)
    t.update(train)
    return spec_from_dict({"name": "t", "base_model": {"source": str(model_dir)},
                           "dataset": {"kind": "shapes", "size": 64, "resolution": 8},
                           "train": t, "resources": {"workers_per_trial": 1}})


def _params(path):
    return UNet2DModel.from_pretrained(path / "unet").state_dict()


def test_checkpoint_layout_and_resume_continues(tiny_model_dir, tmp_path):
    spec = make_spec(tiny_model_dir, grad_accumulation=2)
    full = LocalReporter(tmp_path / "full")
    res = train_loop(spec, full)
    assert res.step == 6 and [r["step"] for r in full.reports] == [1, 2, 3, 4, 5, 6]
    assert [c.name for c in full.checkpoints] == ["checkpoint_000003", "checkpoint_000006"]
    for r in full.reports:
        assert np.isfinite(r["loss"]) and np.isfinite(r["dsm_loss"])
        assert {"lr", "images_per_s", "s_per_step", "epoch", "iso_fraction"} <= r.keys()
        if r["iso_fraction"] > 0:
            assert np.isfinite(r["iso_loss"]) and r["tr_r"] > 0
    last = full.checkpoints[-1]
    # a plain diffusers directory holding the EMA weights
    pipe = DDPMPipeline.from_pretrained(last)
    assert isinstance(pipe.unet, UNet2DModel) and pipe.scheduler.config.num_train_timesteps == 1000
    state = load_train_state(last)
    assert state["step"] == 6 and state["ema"]["num_updates"] == 6
    raw = state["unet"]
    ema = pipe.unet.state_dict()
    assert any(not torch.allclose(raw[k], ema[k]) for k in raw)  # the checkpointed UNet is the EMA, not the raw weights
    saved = json.loads((last / "spec.json").read_text())
    assert saved["spec"]["train"]["lambda_iso"] == 0.1

    # interrupted after 3 steps, then resumed from that checkpoint by a new run
    part = LocalReporter(tmp_path / "part")
    train_loop(make_spec(tiny_model_dir, grad_accumulation=2, max_steps=3), part)
    resumed = LocalReporter(tmp_path / "resumed")
    res2 = train_loop(spec, resumed, resume_from=str(part.checkpoints[-1]))
    assert res2.step == 6 and [r["step"] for r in resumed.reports] == [4, 5, 6]
    assert load_train_state(resumed.checkpoints[-1])["ema"]["num_updates"] == 6
    a, b = _params(last), _params(resumed.checkpoints[-1])
    for k in a:  # same step count, data order, noise and EMA as the uninterrupted run
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    for r_full, r_res in zip(full.reports[3:], resumed.reports):
        assert r_full["loss"] == pytest.approx(r_res["loss"], rel=1e-5)


def test_iso_fraction_and_never_below_pT(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    real = losses.sample_timesteps

    def spy(*args, **kwargs):
        t, iso = real(*args, **kwargs)
        calls.append((t.clone(), iso))
        return t, iso

    monkeypatch.setattr(losses, "sample_timesteps", spy)
    import isosweep.core.geometry as geometry

    # this test is about the split, not the geometry: a constant stand-in keeps 40 steps cheap
    monkeypatch.setattr(geometry, "isometry_terms", lambda enc, x, metric, generator=None: (torch.ones(len(x)), torch.ones(len(x))))
    p, steps = 0.25, 40
    rep = LocalReporter(tmp_path)
    train_loop(make_spec(tiny_model_dir, p=p, max_steps=steps, checkpoint_every=1000, report_every=10, lambda_iso=1e-3), rep)
    assert len(calls) == steps
    cut = losses.iso_cutoff(p, 1000)
    for t, iso in calls:
        assert (t.min() >= cut) if iso else (t.max() < cut)
    frac = np.mean([iso for _, iso in calls])
    assert abs(frac - (1 - p)) < 0.25  # 40 Bernoulli(0.75): sd 0.07
    assert np.mean([r["iso_fraction"] for r in rep.reports]) == pytest.approx(frac)


@pytest.mark.parametrize("mode", ["per_timestep", "pooled"])
def test_iso_timesteps_reach_the_isometry_term(tiny_model_dir, tmp_path, monkeypatch, mode):
    """The loop hands the isometry term one t per micro-batch (per_timestep, the default) or the samples' own
    denoising t (pooled), and records the choice in the checkpoint's spec.json."""
    import isosweep.core.geometry as geometry

    dsm_t, iso_t = [], []
    real_sample, real_encoder = losses.sample_timesteps, losses.encoder_at

    def sample_spy(*args, **kwargs):
        t, iso = real_sample(*args, **kwargs)
        dsm_t.append((t.clone(), iso))
        return t, iso

    def encoder_spy(unet, t, *args, **kwargs):
        iso_t.append(t.clone())
        return real_encoder(unet, t, *args, **kwargs)

    monkeypatch.setattr(losses, "sample_timesteps", sample_spy)
    monkeypatch.setattr(losses, "encoder_at", encoder_spy)
    monkeypatch.setattr(geometry, "isometry_terms", lambda enc, x, metric, generator=None: (torch.ones(len(x)), torch.ones(len(x))))
    train = {} if mode == "per_timestep" else {"iso_timesteps": mode}  # per_timestep is the default
    rep = LocalReporter(tmp_path)
    train_loop(make_spec(tiny_model_dir, p=0.25, max_steps=6, grad_accumulation=2, checkpoint_every=1000, **train), rep)
    on = [t for t, iso in dsm_t if iso]
    assert len(on) == len(iso_t) > 0
    for t, ti in zip(on, iso_t):
        assert ti.shape == t.shape and ti.min() >= losses.iso_cutoff(0.25, 1000)
        if mode == "per_timestep":
            assert ti.unique().numel() == 1 and not torch.equal(ti, t)
        else:
            assert torch.equal(ti, t)
    assert json.loads((rep.checkpoints[-1] / "spec.json").read_text())["spec"]["train"]["iso_timesteps"] == mode


def test_per_timestep_t_is_the_same_on_every_rank():
    """The loop's per-step generators give every rank the same coin and the same t_iso per micro-batch."""
    from isosweep.training.loop import step_generators

    loss_fn = losses.IsoDiffusionLoss(lambda_iso=1.0, p=0.5)
    x0, on = torch.zeros(2, 3, 8, 8), 0
    for step in range(12):
        per_rank = []
        for rank in range(3):
            shared, local = step_generators(7, step, rank)
            iso_on = loss_fn.coin(shared)
            per_rank.append([loss_fn.draw(x0, iso_on, local, shared) for _ in range(2)])
        for draws in zip(*per_rank):
            assert len({d.iso_on for d in draws}) == 1
            if draws[0].iso_on:
                on += 1
                assert all(torch.equal(d.t_iso, draws[0].t_iso) for d in draws) and draws[0].t_iso.unique().numel() == 1
    assert on > 0


def test_baseline_costs_nothing_extra(tiny_model_dir, tmp_path, monkeypatch):
    import isosweep.core.geometry as geometry

    monkeypatch.setattr(geometry, "isometry_terms", lambda *a, **k: pytest.fail("baseline computed L_iso"))
    rep = LocalReporter(tmp_path)
    with pytest.raises(ValueError, match="not in the spec's train section"):  # parameters are resolved once, by the caller
        train_loop(make_spec(tiny_model_dir, max_steps=3), rep, trial_params={"lambda_iso": 0.0})
    train_loop(resolve_trial_spec(make_spec(tiny_model_dir, max_steps=3), {"lambda_iso": 0.0}), rep, trial_params={"lambda_iso": 0.0})
    assert all(r["iso_fraction"] == 0 and "iso_loss" not in r for r in rep.reports)
    assert json.loads((rep.checkpoints[-1] / "spec.json").read_text())["spec"]["train"]["lambda_iso"] == 0.0


@pytest.mark.parametrize("term", ["dsm", "iso"])
def test_non_finite_loss_names_step_and_term(tiny_model_dir, tmp_path, monkeypatch, term):
    import isosweep.core.geometry as geometry

    counter = {"n": 0}
    if term == "dsm":
        real = losses.dsm_loss

        def bad(*a, **k):
            counter["n"] += 1
            out = real(*a, **k)
            return out * float("nan") if counter["n"] == 3 else out

        monkeypatch.setattr(losses, "dsm_loss", bad)
    else:
        monkeypatch.setattr(geometry, "isometry_ratio", lambda *a, **k: torch.tensor(float("inf"), requires_grad=True))
    rep = LocalReporter(tmp_path)
    with pytest.raises(NonFiniteLossError, match=rf"non-finite {term} loss at optimizer step \d+") as err:
        train_loop(make_spec(tiny_model_dir, p=0.0, max_steps=5, checkpoint_every=1), rep)
    if term == "dsm":
        assert "optimizer step 3 " in str(err.value)
        assert [c.name for c in rep.checkpoints] == ["checkpoint_000001", "checkpoint_000002"]  # nothing written at step 3
    else:
        assert rep.checkpoints == []


def test_evaluation_saved_with_final_checkpoint(tiny_model_dir, tmp_path):
    """The evaluator runs once, on the final EMA weights in eval mode; its record lands in the final checkpoint."""
    from isosweep.evaluation.record import EvalResult, read_record

    calls = []

    def evaluator(unet, scheduler, device, rank, world_size, codec=None):
        calls.append(dict(training=unet.training, rank=rank, world_size=world_size,
                          weights={k: v.clone() for k, v in unet.state_dict().items()}))
        return EvalResult(metrics={"fid": 1.5, "ppl": 20.0}, backbones={"fid": "domain"}, rtl_curve=[1.0, 1.1],
                          images={"samples": np.zeros((8, 8, 3), np.uint8)}, frame_distances={"slerp": [0.1]})

    rep = LocalReporter(tmp_path)
    res = train_loop(make_spec(tiny_model_dir, max_steps=4, checkpoint_every=2), rep, evaluator=evaluator)
    assert len(calls) == 1 and {k: calls[0][k] for k in ("training", "rank", "world_size")} == \
        {"training": False, "rank": 0, "world_size": 1}
    assert rep.reports[-1]["fid"] == 1.5 and res.metrics["ppl"] == 20.0 and "fid" not in rep.reports[0]
    first, final = rep.checkpoints
    assert read_record(first) is None  # only the final checkpoint is evaluated
    record = read_record(final)
    assert record.metrics == {"fid": 1.5, "ppl": 20.0} and record.rtl_curve == [1.0, 1.1]
    assert (final / "eval" / "samples.png").is_file()
    saved = _params(final)  # the checkpoint's UNet is the EMA: the evaluated weights are the saved ones
    for k, v in calls[0]["weights"].items():
        torch.testing.assert_close(v, saved[k])


def test_load_local_pipeline_and_bare_unet(tiny_model_dir, tmp_path):
    from isosweep.spec import BaseModelSpec

    unet, sched = load_unet_and_scheduler(BaseModelSpec(source=str(tiny_model_dir)))
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "linear"
    unet.save_pretrained(tmp_path / "bare")
    unet2, sched2 = load_unet_and_scheduler(BaseModelSpec(source=str(tmp_path / "bare")))
    for k, v in unet.state_dict().items():
        assert torch.equal(v, unet2.state_dict()[k])
    unet3, _ = load_unet_and_scheduler(BaseModelSpec(source=str(tiny_model_dir), subfolder="unet"))
    with pytest.raises(FileNotFoundError, match="no UNet config.json"):
        load_unet_and_scheduler(BaseModelSpec(source=str(tmp_path)))


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_the_base_models_prediction_type_reaches_the_loss(tiny_model_dir, tmp_path, monkeypatch, prediction_type):
    """The loss regresses what the base model's scheduler says it predicts (the built-in model predicts x_0):
    a loop that passed "epsilon" regardless would train the model towards the wrong target."""
    import shutil

    from diffusers import DDPMScheduler

    model = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model)
    DDPMScheduler.from_config({**DDPMScheduler.load_config(model / "scheduler"), "prediction_type": prediction_type}) \
        .save_pretrained(model / "scheduler")
    seen = []
    real = losses.denoising_target

    def spy(kind, *args, **kwargs):
        seen.append(kind)
        return real(kind, *args, **kwargs)

    monkeypatch.setattr(losses, "denoising_target", spy)
    train_loop(make_spec(model, max_steps=2, checkpoint_every=100, lambda_iso=0.0), LocalReporter(tmp_path / "run"))
    assert seen and set(seen) == {prediction_type}


def test_iso_batch_and_shared_forward_reach_the_loss(tiny_model_dir, tmp_path, monkeypatch):
    """train.iso_batch and train.iso_shared_forward: the isometry term runs on the first k samples of each micro-batch
    through the shared encoder pass (with_skips), the denoising forward of the model on the other samples only,
    and the spec records both fields."""
    calls, forwards = [], []
    real_encoder = losses.encoder_at

    def encoder_spy(unet, t, *args, **kwargs):
        calls.append((t.clone(), kwargs.get("with_skips", False)))
        return real_encoder(unet, t, *args, **kwargs)

    real_forward = UNet2DModel.forward

    def forward_spy(self, sample, timestep, *args, **kwargs):
        forwards.append(sample.shape[0])
        return real_forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(losses, "encoder_at", encoder_spy)
    monkeypatch.setattr(UNet2DModel, "forward", forward_spy)
    rep = LocalReporter(tmp_path)
    res = train_loop(make_spec(tiny_model_dir, p=0.0, max_steps=2, checkpoint_every=1000, iso_batch=1,
                               iso_shared_forward=True), rep)
    assert len(calls) == 2 and all(t.shape == (1,) and shared for t, shared in calls)
    assert forwards == [3, 3]  # global batch 4 on one worker: 1 sample shared with the isometry term, 3 denoised apart
    assert np.isfinite(res.metrics["loss"]) and res.metrics["iso_loss"] > 0
    train = json.loads((rep.checkpoints[-1] / "spec.json").read_text())["spec"]["train"]
    assert train["iso_batch"] == 1 and train["iso_shared_forward"] is True


def test_iso_every_takes_the_term_on_due_steps_and_resume_keeps_the_rhythm(tiny_model_dir, tmp_path, monkeypatch):
    """train.iso_every=2 with p=0 (every step in the iso range): the isometry term runs on steps 0, 2, 4 only
    (iso_fraction 1, 0, 1, ...), every step keeps the iso range's timesteps; a run stopped after 3 steps and resumed
    ends where the uninterrupted run ends (the rhythm follows the global step, not the process)."""
    calls, ranges = [], []
    real_encoder, real_draw = losses.encoder_at, losses.sample_timesteps

    def encoder_spy(unet, t, *args, **kwargs):
        calls.append(int(t[0]))
        return real_encoder(unet, t, *args, **kwargs)

    def draw_spy(*args, **kwargs):
        t, on = real_draw(*args, **kwargs)
        ranges.append(on)
        return t, on

    monkeypatch.setattr(losses, "encoder_at", encoder_spy)
    monkeypatch.setattr(losses, "sample_timesteps", draw_spy)
    spec = make_spec(tiny_model_dir, p=0.0, iso_every=2)
    full = LocalReporter(tmp_path / "full")
    train_loop(spec, full)
    assert [r["iso_fraction"] for r in full.reports] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert len(calls) == 3 and all(ranges)  # three isometry terms in six steps, every step drawn from [pT, T)
    assert all(np.isfinite(r["iso_loss"]) for r in full.reports[::2]) and "iso_loss" not in full.reports[1]
    part = LocalReporter(tmp_path / "part")
    train_loop(make_spec(tiny_model_dir, p=0.0, iso_every=2, max_steps=3), part)
    calls.clear()
    resumed = LocalReporter(tmp_path / "resumed")
    train_loop(spec, resumed, resume_from=str(part.checkpoints[-1]))
    assert [r["iso_fraction"] for r in resumed.reports] == [0.0, 1.0, 0.0] and len(calls) == 1  # steps 3, 4, 5
    a, b = _params(full.checkpoints[-1]), _params(resumed.checkpoints[-1])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
