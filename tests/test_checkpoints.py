"""Checkpoints under faults: nothing read back is unpickled, every checkpoint carries a manifest,
a corrupt one is named and passed over for the newest older one that verifies, and copies made while
resuming are removed on every exit path. Faults are injected into real checkpoint files."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from support.servers import free_port
from test_training import make_spec  # the tiny base model fixture, tiny_model_dir, is in conftest.py

from isosweep.core.ema import EMA
from isosweep.models.builtin import default_scheduler
from isosweep.training.checkpoint import (
    MANIFEST,
    TRAIN_STATE,
    CheckpointError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_train_state,
    resume_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
    write_manifest,
)
from isosweep.training.loop import train_loop
from isosweep.training.reporting import LocalReporter

SAFETENSORS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """A 6-step run with checkpoints at steps 2, 4 and 6 (what Ray Train keeps: the last three)."""
    rep = LocalReporter(tmp_path_factory.mktemp("run"))
    train_loop(make_spec(tiny_model_dir, max_steps=6, checkpoint_every=2), rep)
    assert [c.name for c in rep.checkpoints] == ["checkpoint_000002", "checkpoint_000004", "checkpoint_000006"]
    return rep.root


@pytest.fixture
def run(run_dir, tmp_path):
    """A private copy of the run to inject faults into."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Every tempfile.mkdtemp/TemporaryDirectory of the test goes here, so a leftover is seen."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _params(path):
    # cloned: the loaded tensors may be memory-mapped from the file a test is about to truncate
    return {k: v.clone() for k, v in UNet2DModel.from_pretrained(path / "unet").state_dict().items()}


class _Evil:
    """A pickle payload: unpickling it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@dataclass
class Stored:
    """A checkpoint in a pyarrow file system other than the local one (as `ray.train.Checkpoint` is on S3)."""

    filesystem: pafs.FileSystem
    path: str


def _stored(run: Path, name: str) -> Stored:
    return Stored(pafs.SubTreeFileSystem(str(run), pafs.LocalFileSystem()), name)


def test_checkpoint_has_a_manifest_of_every_file_written_last(run_dir):
    ckpt = run_dir / "checkpoint_000006"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk and {TRAIN_STATE, SAFETENSORS, "spec.json", "model_index.json"} <= on_disk
    assert manifest["step"] == 6 and manifest["max_steps"] == 6  # the run's total: `isosweep status` tells progress by it
    assert manifest["files"][TRAIN_STATE]["size"] == (ckpt / TRAIN_STATE).stat().st_size
    assert verify_checkpoint(ckpt)["files"] == manifest["files"]
    assert not [p for p in run_dir.iterdir() if not p.name.startswith("checkpoint_")]  # no partial folders beside


def test_a_failed_write_leaves_nothing(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)

    def failing_eval(folder):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        save_checkpoint(tmp_path / "ckpt", unet, EMA(unet, 0.9), default_scheduler(), {"step": 1}, {}, extra=failing_eval)
    assert list(tmp_path.iterdir()) == []
    save_checkpoint(tmp_path / "ckpt", unet, EMA(unet, 0.9), default_scheduler(), {"step": 1}, {})
    assert load_train_state(tmp_path / "ckpt") == {"step": 1}
    assert DDPMPipeline.from_pretrained(tmp_path / "ckpt").unet.config.sample_size == 8


@pytest.mark.parametrize("manifest_matches", [True, False])
def test_a_pickle_payload_is_refused_and_never_runs(tiny_model_dir, run, tmp_path, private_tmp, manifest_matches):  # noqa: F811
    """A train_state.pt that runs code when unpickled. With its manifest rewritten to match (someone who can
    write the storage can do that) resume stops, naming the file; otherwise it is a corrupt checkpoint. The
    code never runs either way."""
    marker = tmp_path / "pwned"
    newest = run / "checkpoint_000006"
    torch.save({"step": 6, "payload": _Evil(marker)}, newest / TRAIN_STATE)
    for old in ("checkpoint_000002", "checkpoint_000004"):
        shutil.rmtree(run / old)
    if manifest_matches:
        write_manifest(newest, step=6)
    spec = make_spec(tiny_model_dir, max_steps=6, checkpoint_every=2)
    expected = UnsafeCheckpointError if manifest_matches else CheckpointError
    with pytest.raises(expected) as err:
        train_loop(spec, LocalReporter(tmp_path / "resumed"), resume_from=str(newest))
    message = str(err.value)
    assert str(newest) in message
    if manifest_matches:
        assert str(newest / TRAIN_STATE) in message and "could run code" in message and "GLOBAL" in message
    else:
        assert f"{TRAIN_STATE} has" in message or f"sha256 of {TRAIN_STATE} differs" in message  # size or checksum
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError if manifest_matches else CorruptCheckpointError):
        load_train_state(newest)
    assert not marker.exists()
    assert list(private_tmp.iterdir()) == []


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_one_resumed(tiny_model_dir, run, tmp_path, capsys,  # noqa: F811
                                                                           private_tmp):
    """The newest checkpoint's weights are cut in half: resume says so and continues from step 4, and ends
    where the uninterrupted run ended (same data order, noise and EMA)."""
    newest = run / "checkpoint_000006"
    reference = _params(newest)
    _truncate(newest / SAFETENSORS)
    rep = LocalReporter(tmp_path / "resumed")
    res = train_loop(make_spec(tiny_model_dir, max_steps=6, checkpoint_every=2), rep, resume_from=str(newest))
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is corrupt: {SAFETENSORS} has" in out and "truncated" in out
    assert f"resuming from {run / 'checkpoint_000004'} (step 4)" in out
    assert res.step == 6 and [r["step"] for r in rep.reports] == [5, 6]
    assert load_train_state(rep.checkpoints[-1])["resumed_at"] == [4]
    for k, v in _params(rep.checkpoints[-1]).items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6)
    assert list(private_tmp.iterdir()) == []


def test_a_missing_manifest_or_file_is_corrupt(run):
    (run / "checkpoint_000006" / MANIFEST).unlink()
    (run / "checkpoint_000004" / "scheduler" / "scheduler_config.json").unlink()
    point = resume_state(run / "checkpoint_000006")
    assert point.state["step"] == 2 and point.source == str(run / "checkpoint_000002")
    assert f"no {MANIFEST}" in point.skipped[0] and str(run / "checkpoint_000006") in point.skipped[0]
    assert "scheduler/scheduler_config.json is missing" in point.skipped[1]
    # a newer checkpoint beside the given one is not considered: Ray Train had not registered it
    assert resume_state(run / "checkpoint_000004").skipped == [point.skipped[1]]


def test_a_copy_not_named_checkpoint_has_no_fallback(run, tmp_path):
    copy = Path(shutil.copytree(run / "checkpoint_000004", tmp_path / "mine"))
    assert resume_state(copy).state["step"] == 4
    _truncate(copy / TRAIN_STATE)
    with pytest.raises(CheckpointError, match=rf"{copy} is corrupt: {TRAIN_STATE} has \d+ bytes"):
        resume_state(copy)
    with pytest.raises(CheckpointError, match="does not exist"):
        resume_state(tmp_path / "nowhere")


def test_all_checkpoints_corrupt_is_a_clear_error(tiny_model_dir, run, tmp_path, private_tmp):  # noqa: F811
    _truncate(run / "checkpoint_000006" / SAFETENSORS)
    (run / "checkpoint_000004" / MANIFEST).unlink()
    (run / "checkpoint_000002" / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        train_loop(make_spec(tiny_model_dir, max_steps=6), LocalReporter(tmp_path / "r"), resume_from=str(run / "checkpoint_000006"))
    message = str(err.value)
    assert message.startswith("no checkpoint to resume from verifies against its manifest")
    for name, problem in (("000006", "truncated"), ("000004", f"no {MANIFEST}"), ("000002", f"{MANIFEST} is unreadable")):
        assert f"checkpoint {run / ('checkpoint_' + name)} is corrupt" in message and problem in message
    assert "Fix:" in message and "--resume-from" in message
    assert list(private_tmp.iterdir()) == []


def test_remote_checkpoints_are_copied_verified_and_the_copies_removed(tiny_model_dir, run, tmp_path, private_tmp):  # noqa: F811
    """Through a non-local pyarrow file system (as S3 is): each candidate is copied into a temporary folder,
    which is gone afterwards, whether resume succeeded, fell back, or failed."""
    assert resume_state(_stored(run, "checkpoint_000004")).state["step"] == 4
    with pytest.raises(CheckpointError, match="subtree://elsewhere is corrupt: the folder does not exist"):
        resume_state(_stored(run, "elsewhere"))
    assert list(private_tmp.iterdir()) == []
    _truncate(run / "checkpoint_000006" / TRAIN_STATE)
    rep = LocalReporter(tmp_path / "resumed")
    res = train_loop(make_spec(tiny_model_dir, max_steps=6, checkpoint_every=2), rep,
                     resume_from=_stored(run, "checkpoint_000006"))
    assert res.step == 6 and [r["step"] for r in rep.reports] == [5, 6]
    assert list(private_tmp.iterdir()) == []
    for name in ("checkpoint_000002", "checkpoint_000004"):
        (run / name / SAFETENSORS).write_bytes(b"x" * (run / name / SAFETENSORS).stat().st_size)
    with pytest.raises(CheckpointError, match=r"subtree://checkpoint_000002 is corrupt: the sha256 of"):
        train_loop(make_spec(tiny_model_dir, max_steps=6), LocalReporter(tmp_path / "r2"), resume_from=_stored(run, "checkpoint_000006"))
    assert list(private_tmp.iterdir()) == []


def test_a_ray_checkpoint_is_a_stored_checkpoint(run):
    from ray.train import Checkpoint

    (run / "checkpoint_000006" / MANIFEST).unlink()
    ckpt = Checkpoint(str(run / "checkpoint_000006"))
    assert resume_state(ckpt).state["step"] == 4


def test_rng_states_are_plain_values_and_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian in python's state
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


_RANK = textwrap.dedent(
    """
    import json, sys, torch.distributed as dist
    from isosweep.training.checkpoint import resume_state
    rank, port, out, locations = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = []
    for location in locations:
        try:
            point = resume_state(location, rank=rank, world_size=2)
            results.append({"step": point.state["step"], "source": point.source})
        except Exception as exc:
            results.append({"error": f"{type(exc).__name__}: {exc}"})
    json.dump(results, open(out, "w"))
    dist.destroy_process_group()
    """
)


def _fake_run(root: Path, steps=(2, 4, 6)) -> Path:
    """checkpoint_<step> folders holding only a train_state.pt and a manifest; the newest one truncated."""
    for step in steps:
        d = root / f"checkpoint_{step:06d}"
        d.mkdir(parents=True)
        torch.save({"step": step}, d / TRAIN_STATE)
        write_manifest(d, step)
    newest = root / f"checkpoint_{max(steps):06d}"
    _truncate(newest / TRAIN_STATE)
    return newest


@pytest.mark.slow  # two Python processes with a gloo process group (about 20-40 s here)
def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path):
    """Rank 0 verifies and chooses; the other ranks read that one. When none verifies every rank fails (none
    waits forever on the others)."""
    fallback = _fake_run(tmp_path / "run")
    hopeless = _fake_run(tmp_path / "hopeless", steps=(2, 4))
    (tmp_path / "hopeless" / "checkpoint_000002" / MANIFEST).unlink()
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port), str(tmp_path / f"r{r}.json"),
                               str(fallback), str(hopeless)], env=env) for r in range(2)]
    assert all(p.wait(timeout=180) == 0 for p in procs)
    (r0_ok, r0_err), (r1_ok, r1_err) = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert r0_ok == r1_ok == {"step": 4, "source": str(tmp_path / "run" / "checkpoint_000004")}
    assert r0_err["error"].startswith("CheckpointError: no checkpoint to resume from verifies")
    assert r1_err["error"].startswith("CheckpointError: rank 0 could not resume: CheckpointError: no checkpoint")


def test_a_killed_workers_checkpoint_copy_is_removed_and_a_live_ones_kept(tmp_path):
    """A process killed while its checkpoint sits in a scratch folder leaves it behind (a whole model in /tmp on a
    real run); the next worker's clean-up removes it, and leaves a running process's folder alone."""
    import os
    import signal
    import subprocess
    import sys

    from isosweep.files import SCRATCH_PREFIX, remove_orphaned_scratch, scratch_dir

    code = ("import sys, time\nfrom isosweep.files import scratch_dir\nwith scratch_dir('ckpt') as d:\n"
            "    (d / 'weights.bin').write_bytes(bytes(1 << 20))\n    print(d, flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    left = Path(proc.stdout.readline().strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert left.parent == tmp_path and left.name.startswith(f"{SCRATCH_PREFIX}{proc.pid}-ckpt-") and (left / "weights.bin").is_file()
    with scratch_dir("ckpt") as ours:  # this process's, in the default temporary folder
        live = tmp_path / ours.name
        live.mkdir()
        assert remove_orphaned_scratch(tmp_path) == [left]
        assert not left.exists() and live.is_dir()
    assert not ours.exists()
