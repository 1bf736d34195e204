"""A registered champion as the next sweep's base model (`base_model.source: models:/NAME@champion`).

Fast: the Train workers' downloader (`sweep.train_worker.base_model_fetch`) and `models.loading.load_unet_and_scheduler`
called together for real against a local SQLite registry: the alias is pinned to one version, a missing alias fails
as a deterministic error and in the preflight. Slow: two demo sweeps on the real tracking server (S3 artifacts on
moto), the second fine-tuning from the first's champion, each of its trials recording exactly those weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from test_sweep import DEMO, TINY, cache_env  # noqa: F401 -- cache_env: one cache per session (conftest.isosweep_cache_dir)

from isosweep.models.builtin import default_scheduler
from isosweep.models.loading import load_unet_and_scheduler
from isosweep.spec import BaseModelSpec, SpecError, spec_from_dict

NAME = "tiny-staged"


def independent_sha256(unet: torch.nn.Module) -> str:
    """The weights' sha256 as docs/tracking.md defines it, written here without isosweep: each key then its
    tensor's bytes, in sorted key order."""
    digest, state = hashlib.sha256(), unet.state_dict()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tiny_pipeline(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)
    DDPMPipeline(unet=unet, scheduler=default_scheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A local SQLite registry holding NAME versions 1 and 2 (different weights, registered the way a sweep
    registers its models), @champion on version 2; yields (tracking URI, {version: sha256 of its UNet})."""
    from isosweep.tracking.client import client
    from isosweep.tracking.registry import log_and_register
    from isosweep.tracking.runs import get_or_create_experiment

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment = get_or_create_experiment(uri, "staged")
    hashes = {}
    for seed in (0, 1):
        folder = _tiny_pipeline(root / f"pipe{seed}", seed)
        run_id = client(uri).create_run(experiment).info.run_id
        version = log_and_register(uri, run_id, folder, NAME, alias="champion")
        hashes[version] = independent_sha256(UNet2DModel.from_pretrained(folder / "unet"))
    assert sorted(hashes) == ["1", "2"] and hashes["1"] != hashes["2"]
    return uri, hashes


def test_the_trainers_fetcher_loads_the_pinned_champion(registry, tmp_path, monkeypatch):
    """What each Train worker does for `models:/NAME@champion`: pin the alias to its version, then load that version
    through `load_unet_and_scheduler` with the same downloader; moving the alias afterwards changes nothing."""
    from isosweep.models.loading import weights_sha256
    from isosweep.sweep.train_worker import base_model_fetch
    from isosweep.tracking.client import client

    uri, hashes = registry
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the URI given is the one used
    monkeypatch.chdir(tmp_path)
    source = f"models:/{NAME}@champion"
    fetch, pinned = base_model_fetch(source, uri)
    assert pinned == {"resolved": f"models:/{NAME}/2", "version": "2"}
    unet, scheduler = load_unet_and_scheduler(BaseModelSpec(source=source), fetch=fetch)
    assert independent_sha256(unet) == weights_sha256(unet) == hashes["2"]
    assert scheduler.config.num_train_timesteps == 1000
    client(uri).set_registered_model_alias(NAME, "champion", "1")  # the alias moves while the workers start
    try:
        again, _ = load_unet_and_scheduler(BaseModelSpec(source=source), fetch=fetch)
        assert weights_sha256(again) == hashes["2"]
        assert base_model_fetch(source, uri)[1]["version"] == "1"
        fixed, _ = load_unet_and_scheduler(BaseModelSpec(source=f"models:/{NAME}/1"), fetch=base_model_fetch(f"models:/{NAME}/1", uri)[0])
        assert weights_sha256(fixed) == hashes["1"]
    finally:
        client(uri).set_registered_model_alias(NAME, "champion", "2")
    assert base_model_fetch("builtin:shapes", uri) == (None, {})


def test_a_missing_alias_fails_the_preflight_in_one_line_and_a_trial_at_once(registry, tmp_path, monkeypatch):
    """Before Ray starts: one line naming base_model.source and the fix; in a worker: an error `isosweep.errors`
    classes deterministic, so the trial is not retried (also a wrong program, such as a call with the wrong arguments)."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from isosweep.commands.validate import check_base_model
    from isosweep.errors import deterministic_cause
    from isosweep.sweep.train_worker import base_model_fetch

    uri, _ = registry
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def spec(source: str):
        return spec_from_dict({"name": "staged", "base_model": {"source": source}, "storage": {"path": str(tmp_path)}})

    for missing in (f"models:/{NAME}@nope", f"models:/{NAME}/7", "models:/no-such-model@champion"):
        with pytest.raises(SpecError) as refused:
            check_base_model(spec(missing), "staged.yaml", tracking_uri=uri)
        line = str(refused.value)
        assert "\n" not in line and line.startswith("staged.yaml: field 'base_model.source'") and "fix:" in line, line
        with pytest.raises(LookupError) as failed:
            fetch, _ = base_model_fetch(missing, uri)  # an alias or a name the registry lacks fails here
            fetch(missing, tmp_path)  # a version it lacks, here
        wrapped = WorkerGroupError("Training failed due to worker errors", {0: UserExceptionWithTraceback(failed.value, "tb")})
        assert deterministic_cause(wrapped) is failed.value, missing
    assert f"{NAME}@champion" in check_base_model(spec(f"models:/{NAME}@champion"), "staged.yaml", tracking_uri=uri)
    with pytest.raises(TypeError) as wrong:  # a downloader of the wrong signature: a wrong program
        load_unet_and_scheduler(BaseModelSpec(source=f"models:/{NAME}@champion"), fetch=lambda uri: Path(uri))  # type: ignore[arg-type]
    assert deterministic_cause(WorkerGroupError("x", {0: UserExceptionWithTraceback(wrong.value, "tb")})) is wrong.value


def test_the_preflight_finds_the_champion_in_the_local_store_of_the_storage(registry, tmp_path, monkeypatch):
    """No tracking URI named: the sweep tracks to `<storage>/mlflow.db`, so the preflight looks there too."""
    import shutil

    from isosweep.commands.validate import check_base_model

    uri, _ = registry
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage = tmp_path / "runs"
    spec = spec_from_dict({"name": "staged", "base_model": {"source": f"models:/{NAME}@champion"}, "storage": {"path": str(storage)}})
    with pytest.raises(SpecError, match="no tracking server is named"):
        check_base_model(spec, "staged.yaml")
    assert not storage.exists()  # the preflight creates nothing
    storage.mkdir()
    shutil.copy(uri.removeprefix("sqlite:///"), storage / "mlflow.db")
    assert str(storage / "mlflow.db") in check_base_model(spec, "staged.yaml")


def test_a_resumed_run_keeps_the_base_its_checkpoint_recorded(tiny_model_dir, tmp_path):
    """The loop records the loaded base's sha256 in spec.json and train_state.pt, and on_base gets it once; a run
    resumed from that checkpoint keeps the record even when the source now holds other weights."""
    import shutil

    from isosweep.training.loop import train_loop
    from isosweep.training.reporting import LocalReporter

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    expected = independent_sha256(UNet2DModel.from_pretrained(base / "unet"))
    spec = spec_from_dict({"name": "t", "base_model": {"source": str(base)}, "dataset": {"kind": "shapes", "size": 64, "resolution": 8},
                           "train": {"global_batch_size": 4, "max_steps": 2, "checkpoint_every": 2, "report_every": 1},
                           "resources": {"workers_per_trial": 1}})
    first, seen = LocalReporter(tmp_path / "first"), []
    train_loop(spec, first, on_base=seen.append)
    started = {"source": str(base), "unet_sha256": expected}
    assert seen == [started]
    assert json.loads((first.checkpoints[-1] / "spec.json").read_text())["base_model"] == started
    _tiny_pipeline(base, seed=5)  # the source now holds other weights
    resumed = LocalReporter(tmp_path / "resumed")
    train_loop(spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 3})}), resumed,
               resume_from=str(first.checkpoints[-1]))
    assert json.loads((resumed.checkpoints[-1] / "spec.json").read_text())["base_model"] == started
    fresh = LocalReporter(tmp_path / "fresh")
    train_loop(spec, fresh)
    assert json.loads((fresh.checkpoints[-1] / "spec.json").read_text())["base_model"]["unet_sha256"] != expected


def _run(args: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "w") as out:
        return subprocess.run([sys.executable, "-m", "isosweep", "run", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env, timeout=1800).returncode


@pytest.mark.slow
def test_a_sweep_fine_tunes_from_the_previous_sweeps_champion(tmp_path, cache_env, mlflow_server, monkeypatch):  # noqa: F811
    """Sweep 1 (the demo, two tiny trials) registers @champion on the tracking server; sweep 2 starts from
    `models:/NAME@champion`, and every one of its trials records the version it resolved and the sha256 of the
    UNet it loaded, which equal the registered version's UNet as MLflow's own API downloads it. Sweep 2 then moves
    @champion to its own champion: the version recorded is the one the trials trained from, not the alias's new one."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from isosweep.training.checkpoint import load_train_state

    registry_name = "isodiff-staged"
    env = {**os.environ, "ISOSWEEP_CACHE": str(cache_env), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # only --tracking-uri names the server: the workers must get it from the driver
    common = ["--tracking-uri", mlflow_server.uri]
    for o in TINY + ["search.num_trials=1", f"tracking.registry_name={registry_name}"]:
        common += ["--set", o]
    # its own experiment: the tracking server is shared with the other tests, which count the demo's runs
    first = _run([str(DEMO), "--storage", str(tmp_path / "first"), *common, "--set", "name=staged-first"], env,
                 tmp_path / "first.log")
    assert first == 0, (tmp_path / "first.log").read_text()[-3000:]
    c = MlflowClient(mlflow_server.uri)
    champion = c.get_model_version_by_alias(registry_name, "champion").version
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # this process only: the sweeps' env is set above
    downloaded = mlflow.artifacts.download_artifacts(f"models:/{registry_name}/{champion}", dst_path=str(tmp_path / "dl"))
    expected = independent_sha256(UNet2DModel.from_pretrained(Path(downloaded) / "artifacts" / "pipeline" / "unet"))

    source = f"models:/{registry_name}@champion"
    second = _run([str(DEMO), "--storage", str(tmp_path / "second"), *common, "--set", f"base_model.source={source}",
                   "--set", "name=staged"], env, tmp_path / "second.log")
    assert second == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert c.get_model_version_by_alias(registry_name, "champion").version != champion  # sweep 2 promoted its own

    started = {"source": source, "resolved": f"models:/{registry_name}/{champion}", "version": champion, "unet_sha256": expected}
    trials = sorted(p for p in (tmp_path / "second").glob("staged-*/train/*") if p.is_dir())
    assert len(trials) == 2, trials
    for trial in trials:
        checkpoints = sorted(c for c in trial.glob("checkpoint_*") if c.is_dir())
        assert checkpoints, trial
        for checkpoint in checkpoints:  # every checkpoint of the trial says what it started from
            assert json.loads((checkpoint / "spec.json").read_text())["base_model"] == started, checkpoint
            assert load_train_state(checkpoint)["base_model"] == started, checkpoint
    runs = c.search_runs([c.get_experiment_by_name("staged").experiment_id], "tags.`isosweep.role` = 'trial'")
    assert len(runs) == 2
    for run in runs:
        assert {k.removeprefix("isosweep.base_model."): v for k, v in run.data.tags.items()
                if k.startswith("isosweep.base_model.")} == started, run.info.run_id
    first_trials = sorted((tmp_path / "first").glob("staged-first-*/train/*/checkpoint_*/spec.json"))
    assert first_trials and all(json.loads(p.read_text())["base_model"]["unet_sha256"] != expected for p in first_trials)
