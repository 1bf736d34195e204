"""Checkpoint selection by a cheap FID (evaluation.checkpoint_fid): the curve, the best step's weights
evaluated and saved as the trial's model, and the choice kept across a crash and resume."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from isosweep.spec import SpecError, load_spec, spec_from_dict
from isosweep.training.best_step import BEST_WEIGHTS, SELECTION_FILE, selection_columns
from isosweep.training.checkpoint import load_train_state, verify_checkpoint
from isosweep.training.loop import train_loop
from isosweep.training.reporting import LocalReporter

pytestmark = pytest.mark.usefixtures("one_thread")


def make_spec(model_dir, every=2, num_samples=4, **train):
    t = dict(lambda_iso=0.0, p=1.0, global_batch_size=4, max_steps=8, checkpoint_every=2, report_every=1,
             ema_decay=0.5, learning_rate=1e-2, seed=0)  # no isometry term: this is about selection; lr high so steps differ
    t.update(train)
    return spec_from_dict({"name": "t", "base_model": {"source": str(model_dir)},
                           "dataset": {"kind": "shapes", "size": 64, "resolution": 8}, "train": t,
                           "evaluation": {"checkpoint_fid": {"every": every, "num_samples": num_samples, "ddim_steps": 1}}})


class FakeScorer:
    """Returns the next of `values` per call (one call per scored step) and keeps the weights it scored."""

    def __init__(self, values):
        self.values, self.seen = list(values), []

    def __call__(self, unet, scheduler, device, rank, world_size, codec=None):
        assert not unet.training
        self.seen.append({k: v.detach().clone() for k, v in unet.state_dict().items()})
        return self.values[len(self.seen) - 1], "fake-net-v1"


class FakeEvaluator:
    def __init__(self):
        self.weights = []

    def __call__(self, unet, scheduler, device, rank, world_size, codec=None):
        from isosweep.evaluation.record import EvalResult

        self.weights.append({k: v.detach().clone() for k, v in unet.state_dict().items()})
        return EvalResult(metrics={"fid": 7.0, "ppl": 3.0}, backbones={"fid": "fake-net-v1", "ppl": "fake-net-v1"})


class Crash(RuntimeError):
    pass


class CrashingReporter(LocalReporter):
    """A `LocalReporter` whose report of step `at_step` raises: the loop crashes there, through its own interface."""

    def __init__(self, root, at_step: int) -> None:
        super().__init__(root)
        self.at_step = at_step

    def report(self, metrics, checkpoint_dir=None) -> None:
        if metrics["step"] == self.at_step:
            raise Crash(f"crashed at step {self.at_step}")
        super().report(metrics, checkpoint_dir)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _unet(path):
    return UNet2DModel.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def selected_run(tiny_model_dir, tmp_path_factory):
    """8 steps scored at steps 2, 4, 6, 8 with 5, 2, 3, NaN."""
    scorer, evaluator = FakeScorer([5.0, 2.0, 3.0, math.nan]), FakeEvaluator()
    rep = LocalReporter(tmp_path_factory.mktemp("selected"))
    res = train_loop(make_spec(tiny_model_dir), rep, evaluator=evaluator, scorer=scorer)
    return res, rep, scorer, evaluator


def test_the_lowest_cheap_fid_step_is_evaluated_and_saved(selected_run):
    """Scores at steps 2, 4, 6, 8 of 5, 2, 3, NaN: step 4 is selected (a NaN never is); the final evaluation
    runs on step 4's EMA weights, which are the final checkpoint's pipeline; every report, checkpoint and
    selection.json says so."""
    res, rep, scorer, evaluator = selected_run
    assert res.step == 8 and len(scorer.seen) == 4 and len(evaluator.weights) == 1
    scored = {r["step"]: r["fid_cheap"] for r in rep.reports if "fid_cheap" in r}
    assert list(scored) == [2, 4, 6, 8] and scored[4] == 2.0 and math.isnan(scored[8])
    assert all(r["backbone_fid_cheap"] == "fake-net-v1" for r in rep.reports if "fid_cheap" in r)
    final = rep.reports[-1]
    assert final["selected_step"] == 4 and final["selected_fid_cheap"] == 2.0 and final["fid"] == 7.0
    assert all("selected_step" not in r for r in rep.reports[:-1])

    # the scorer saw each step's EMA weights (those a checkpoint at that step saves), and they differ
    ckpt = {int(c.name.split("_")[1]): c for c in rep.checkpoints}
    assert sorted(ckpt) == [2, 4, 6, 8]
    assert _same(scorer.seen[1], _unet(ckpt[4] / "unet")) and not _same(scorer.seen[1], scorer.seen[3])
    # the final evaluation ran on step 4's weights, and the final checkpoint's pipeline holds them
    assert _same(evaluator.weights[0], scorer.seen[1])
    assert _same(_unet(ckpt[8] / "unet"), scorer.seen[1])
    assert _same(_unet(ckpt[8] / "best"), scorer.seen[1])
    assert isinstance(DDPMPipeline.from_pretrained(ckpt[8]).unet, UNet2DModel)
    # training state still holds the last step's EMA (a resume to extend training continues from step 8)
    state = load_train_state(ckpt[8])
    assert state["step"] == 8 and state["ema"]["num_updates"] == 8

    record = json.loads((ckpt[8] / SELECTION_FILE).read_text())
    assert record["curve"] == [[2, 5.0], [4, 2.0], [6, 3.0], [8, None]]
    assert record["selected_step"] == 4 and record["backbone"] == "fake-net-v1" and record["metric"] == "fid_cheap"
    assert record["settings"] == {"num_samples": 4, "ddim_steps": 1, "seed": 1234, "reference_samples": None, "backbone": "auto"}
    files = verify_checkpoint(ckpt[8])["files"]
    assert SELECTION_FILE in files and BEST_WEIGHTS in files and "best/config.json" in files
    assert selection_columns(ckpt[8]) == {"selected_step": 4, "selected_fid_cheap": 2.0, "backbone_fid_cheap": "fake-net-v1"}
    assert json.loads((ckpt[2] / SELECTION_FILE).read_text())["curve"] == [[2, 5.0]]  # the curve so far, in every checkpoint


def test_the_row_and_mlflow_say_which_step(selected_run, tmp_path):
    """The trial's final report and results row carry the selected step, its cheap FID and backbone; MLflow gets
    `backbone.fid_cheap` and the checkpoint with selection.json but without best/ (training state)."""
    from isosweep.evaluation.record import read_record
    from isosweep.results.rows import make_row
    from isosweep.sweep.trial import final_report
    from isosweep.tracking import artifacts, client

    _, rep, _, _ = selected_run
    final = rep.checkpoints[-1]
    spec = spec_from_dict({"name": "t"})
    params = {"lambda_iso": 0.0, "p": 1.0, "iso_metric": "stereographic", "baseline": True}
    report = final_report(spec, rep.reports[-1], read_record(final), params, str(final), None, selection_columns(final))
    row = make_row("t0", params, report, "TERMINATED")
    assert row["selected_step"] == 4 and row["selected_fid_cheap"] == 2.0 and row["backbone_fid_cheap"] == "fake-net-v1"
    assert row["status"] == "DONE" and row["fid"] == 7.0
    assert math.isnan(make_row("t1", params, {"fid": 1.0}, "TERMINATED")["selected_step"])  # selection off

    uri = client.resolve_tracking_uri(None, None, tmp_path / "mlruns")
    c = client.client(uri)
    run_id = c.create_run(c.create_experiment("selection")).info.run_id
    artifacts.log_trial_result(uri, run_id, final)
    data = c.get_run(run_id).data
    assert data.tags["backbone.fid_cheap"] == data.params["backbone.fid_cheap"] == "fake-net-v1"
    logged = {a.path for a in c.list_artifacts(run_id, "checkpoint")}
    assert f"checkpoint/{SELECTION_FILE}" in logged and "checkpoint/unet" in logged
    assert "checkpoint/best" not in logged and "checkpoint/train_state.pt" not in logged


@pytest.mark.parametrize("last", [math.nan, 1.0])
def test_a_crash_and_resume_keep_the_choice(tiny_model_dir, tmp_path, last):
    """Crashed at step 7 (its report raises), the run resumes from the step-6 checkpoint
    after the step-4 checkpoint (the best) is deleted, as Ray deletes old ones: the best weights come from best/
    of step 6, and the outcome equals an uninterrupted run's: step 4 selected (or step 8, when its score is lower)."""
    values = [5.0, 2.0, 3.0, last]
    whole_scorer, whole = FakeScorer(values), LocalReporter(tmp_path / "whole")
    train_loop(make_spec(tiny_model_dir), whole, evaluator=FakeEvaluator(), scorer=whole_scorer)

    first = CrashingReporter(tmp_path / "first", at_step=7)
    with pytest.raises(Crash):
        train_loop(make_spec(tiny_model_dir), first, evaluator=FakeEvaluator(), scorer=FakeScorer(values))
    assert [r["step"] for r in first.reports] == [1, 2, 3, 4, 5, 6]
    for c in first.checkpoints[:-1]:
        shutil.rmtree(c)  # only step 6 is left: the step-4 checkpoint is gone
    scorer, evaluator = FakeScorer([last]), FakeEvaluator()  # after the resume, only step 8 is scored
    second = LocalReporter(tmp_path / "second")
    train_loop(make_spec(tiny_model_dir), second, evaluator=evaluator, scorer=scorer, resume_from=str(first.checkpoints[-1]))
    assert len(scorer.seen) == 1 and [r["step"] for r in second.reports] == [7, 8]

    best = 4 if math.isnan(last) else 8
    assert second.reports[-1]["selected_step"] == best == whole.reports[-1]["selected_step"]
    assert second.reports[-1]["selected_fid_cheap"] == (2.0 if best == 4 else 1.0)
    expected = _unet(whole.checkpoints[-1] / "unet")  # the uninterrupted run's selected weights
    for got in (evaluator.weights[0], _unet(second.checkpoints[-1] / "unet")):
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    curve = json.loads((second.checkpoints[-1] / SELECTION_FILE).read_text())["curve"]
    assert curve == json.loads((whole.checkpoints[-1] / SELECTION_FILE).read_text())["curve"]
    assert [s for s, _ in curve] == [2, 4, 6, 8]


def test_a_resume_scored_another_way_starts_a_new_curve(tiny_model_dir, tmp_path):
    """Cheap FIDs of other settings (here: the sample count) do not compare: the saved curve and choice are dropped."""
    first = LocalReporter(tmp_path / "first")
    train_loop(make_spec(tiny_model_dir, max_steps=2), first, scorer=FakeScorer([1.0]))
    second = LocalReporter(tmp_path / "second")
    train_loop(make_spec(tiny_model_dir, max_steps=4, num_samples=8), second, scorer=FakeScorer([9.0]),
               resume_from=str(first.checkpoints[-1]))
    record = json.loads((second.checkpoints[-1] / SELECTION_FILE).read_text())
    assert record["curve"] == [[4, 9.0]] and record["selected_step"] == 4


def test_off_by_default_and_without_a_scorer(tiny_model_dir, tmp_path):
    """every: 0 (the default) or null, or no scorer (no evaluation): no cheap FID, the last step is the model."""
    scorer = FakeScorer([1.0] * 8)
    for every in (0, None):
        rep = LocalReporter(tmp_path / f"off-{every}")
        train_loop(make_spec(tiny_model_dir, every=every, max_steps=2), rep, scorer=scorer)
        assert not scorer.seen and all("fid_cheap" not in r for r in rep.reports)
        assert not (rep.checkpoints[-1] / SELECTION_FILE).exists() and selection_columns(rep.checkpoints[-1]) == {}
    rep = LocalReporter(tmp_path / "no-scorer")
    train_loop(make_spec(tiny_model_dir, max_steps=2), rep)
    assert not (rep.checkpoints[-1] / SELECTION_FILE).exists()


def test_the_spec_field(tiny_model_dir):
    """Validated with the field and the fix named; off by default and in the demo, on in the paper's dataset specs."""
    with pytest.raises(SpecError, match=r"field 'evaluation.checkpoint_fid.every'.*got -1.*fix: raise it"):
        make_spec(tiny_model_dir, every=-1)
    with pytest.raises(SpecError, match=r"field 'evaluation.checkpoint_fid.num_samples'.*fix"):
        make_spec(tiny_model_dir, num_samples=1)
    assert spec_from_dict({"name": "x"}).evaluation.checkpoint_fid.every == 0
    assert not load_spec("search_spaces/demo.yaml", check_paths=False).evaluation.checkpoint_fid.every
    for name in ("celebahq", "cifar10", "lsun_bedroom", "lsun_church", "shapes_study"):
        spec = load_spec(f"search_spaces/{name}.yaml", check_paths=False)
        cheap = spec.evaluation.checkpoint_fid
        assert cheap.every, name
        assert cheap.num_samples < spec.evaluation.fid.num_samples, name


def test_the_scorer_is_the_final_fid_on_fewer_samples(tmp_path, monkeypatch):
    """`checkpoint_fid_scorer`: FID with checkpoint_fid's samples and DDIM steps, the same feature network, reference
    statistics and latents as the final FID (so at the same settings it equals it), and its backbone's name."""
    from isosweep.evaluation import suite
    from isosweep.evaluation.features import resolver as bb
    from isosweep.evaluation.features.resolver import FeatureNetworks
    from isosweep.evaluation.suite import checkpoint_fid_scorer, evaluate_model
    from isosweep.spec import DatasetSpec

    def pixels(images):  # a stand-in feature network: 4x4 average-pooled pixels
        return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)

    monkeypatch.setattr(bb, "load_feature_networks", lambda *a, **k: FeatureNetworks(
        family="test", names={"fid": "pixels-test", "ppl": "pixels-test", "ls": "pixels-test"}, fid_features=pixels))
    monkeypatch.setattr(suite, "_add_images", lambda *a, **k: pytest.fail("the cheap FID made images"))
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    spec = spec_from_dict({"name": "t", "dataset": {"kind": "shapes", "size": 64, "resolution": 8},
                           "evaluation": {"cache_dir": str(tmp_path), "batch_size": 16, "seed": 5,
                                          "fid": {"num_samples": 40, "ddim_steps": 3, "reference_samples": 64},
                                          "checkpoint_fid": {"every": 10, "num_samples": 24, "ddim_steps": 2}}})
    value, backbone = checkpoint_fid_scorer(spec)(unet, scheduler, torch.device("cpu"), 0, 1)
    assert backbone == "pixels-test" and np.isfinite(value) and value > 0
    monkeypatch.undo()
    monkeypatch.setattr(bb, "load_feature_networks", lambda *a, **k: FeatureNetworks(
        family="test", names={"fid": "pixels-test"}, fid_features=pixels))
    same = spec.evaluation.model_copy(update={"fid": spec.evaluation.fid.model_copy(update={"num_samples": 24, "ddim_steps": 2})})
    full = evaluate_model(unet, scheduler, same, DatasetSpec(kind="shapes", size=64, resolution=8), metrics=["fid"], progress=False)
    assert value == pytest.approx(full.metrics["fid"], rel=1e-9) and full.backbones["fid"] == "pixels-test"
    other = evaluate_model(unet, scheduler, spec.evaluation, DatasetSpec(kind="shapes", size=64, resolution=8),
                           metrics=["fid"], progress=False, images=False)
    assert other.metrics["fid"] != pytest.approx(value)  # the final FID's own settings give another number
