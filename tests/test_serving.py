"""The registered champion served by `mlflow models serve`, over real HTTP, against the real tracking server.

The model is registered the way a sweep does it (trial run, final metrics, `registry.log_and_register` with
alias `champion`) on `mlflow server` with its artifacts in S3 (moto), both on loopback (tests/support/servers.py). The
scoring server is `mlflow models serve -m models:/NAME@champion --env-manager local`, started as a subprocess
in its own process group with only MLFLOW_TRACKING_URI (the tracking server proxies S3) and stopped by its
PID. The tiny UNet (8x8) and 3 DDIM steps keep it to about a minute on 2 CPU cores.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.servers import BIN, free_port, start_process, stop_process, wait_http

from isosweep.commands.models import interpolation_frames
from isosweep.core.sampling import ddim_sample, sample_shape
from isosweep.data.images import to_uint8
from isosweep.models.loading import load_local
from isosweep.tracking import artifacts, client, pyfunc_model, registry, runs

pytestmark = pytest.mark.slow

NAME = "isodiff-serve"
STEPS = 3  # DDIM steps per request: enough to reach the model, cheap on a CPU
RES = 8  # the tiny model's image side


def _register_champion(uri: str, model_dir: Path, tmp: Path) -> str:
    """A finished trial run with final metrics, its checkpoint registered as NAME@champion; returns the run id."""
    ckpt = tmp / "ckpt"
    shutil.copytree(model_dir, ckpt)
    (ckpt / "eval").mkdir()
    (ckpt / "eval" / "metrics.json").write_text(json.dumps({"metrics": {"fid": 12.5, "ppl": 40.0}, "backbones": {"fid": "domain-shapes-v1"}}))
    c = client.client(uri)
    exp = c.get_experiment_by_name("serve") or c.get_experiment(c.create_experiment("serve"))
    run_id = c.create_run(exp.experiment_id, tags={"isosweep.trial_id": "t1"}).info.run_id
    c.log_batch(run_id, params=client.params_of({"lambda_iso": 0.03, "p": 0.5}))
    artifacts.log_trial_result(uri, run_id, ckpt, log_eval=False, log_checkpoint=False)
    runs.end_run(uri, run_id)
    registry.log_and_register(uri, run_id, ckpt, NAME, alias=registry.CHAMPION_ALIAS, tags={"trial_id": "t1"})
    return run_id


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _images(answer: dict) -> list[np.ndarray]:
    """The response's base64 PNGs, decoded and checked: (H, W, 3) uint8 RGB of the model's size."""
    out = []
    for text in answer["predictions"]:
        img = Image.open(io.BytesIO(base64.b64decode(text)))
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (RES, RES)
        out.append(np.asarray(img))
    return out


def test_the_champion_serves_pngs_over_http(tmp_path, mlflow_server, tiny_model_dir):
    uri = mlflow_server.uri
    run_id = _register_champion(uri, tiny_model_dir, tmp_path)

    # the logged model: the trial's final metrics and params on it, a signature with params, pinned requirements
    c = client.client(uri)
    model_id = c.get_run(run_id).outputs.model_outputs[0].model_id
    logged = c.get_logged_model(model_id)
    assert {m.key: m.value for m in logged.metrics} == {"fid": 12.5, "ppl": 40.0}
    assert logged.params["lambda_iso"] == "0.03" and logged.status == "READY"
    assert c.get_model_version_by_alias(NAME, "champion").source == f"models:/{model_id}"
    import mlflow

    location = client.artifact_location(uri, f"models:/{NAME}@champion")
    reqs = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/requirements.txt", tracking_uri=uri,
                                                    dst_path=str(tmp_path / "reqs"))).read_text().split()
    assert f"mlflow=={mlflow.__version__}" in reqs and f"torch=={torch.__version__.split('+')[0]}" in reqs
    assert all("==" in r for r in reqs), reqs

    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}  # the server proxies S3
    # PATH: the serve command runs `uvicorn` from the environment; PYTHONPATH: the model needs no isosweep
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1", PYTHONPATH="", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    t0 = time.monotonic()
    proc = start_process([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
                   "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env, log_path)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/ping", proc, log_path, 300)  # 100 s seen on 2 cores at a load of 7
        print(f"serving after {time.monotonic() - t0:.1f} s")
        url = f"{base}/invocations"

        # sample: n images from one seed, the latents and DDIM of `isosweep sample`
        status, answer = _post(url, {"inputs": {}, "params": {"n": 2, "seed": 7, "steps": STEPS}})
        assert status == 200, answer
        seven = _images(answer)
        assert len(seven) == 2 and not np.array_equal(seven[0], seven[1])
        status, again = _post(url, {"inputs": {}, "params": {"n": 2, "seed": 7, "steps": STEPS}})
        assert status == 200 and all(np.array_equal(a, b) for a, b in zip(seven, _images(again)))
        status, other = _post(url, {"inputs": {}, "params": {"n": 2, "seed": 8, "steps": STEPS}})
        assert status == 200 and not any(np.array_equal(a, b) for a, b in zip(seven, _images(other)))
        unet, scheduler = load_local(tiny_model_dir, None)
        x_T = torch.randn((2, *sample_shape(unet)), generator=torch.Generator().manual_seed(7))
        cli = to_uint8(ddim_sample(unet, scheduler, x_T, STEPS, progress=False).images.numpy())
        assert np.abs(np.stack(seven).astype(int) - cli.astype(int)).max() <= 1  # the CLI's images (1: thread count)
        # the same request as fields of `inputs` (JSON scalars arrive as 0-d arrays)
        status, fields = _post(url, {"inputs": {"n": 2, "seed": 7, "steps": STEPS}})
        assert status == 200 and all(np.array_equal(a, b) for a, b in zip(seven, _images(fields))), fields

        # interpolate: frames along the slerp path between two seeds, ends included, as `isosweep interpolate`
        status, answer = _post(url, {"inputs": {}, "params": {"mode": "slerp", "seeds": [1, 2], "frames": 4, "steps": STEPS}})
        assert status == 200, answer
        strip = _images(answer)
        assert len(strip) == 4 and len({f.tobytes() for f in strip}) == 4
        cli = to_uint8(interpolation_frames(unet, scheduler, [1, 2], 4, "slerp", STEPS))
        assert np.abs(np.stack(strip).astype(int) - cli.astype(int)).max() <= 1

        # bad requests: 400 with a message naming the parameter
        for params, named in (({"n": "two"}, "'n'"), ({"n": pyfunc_model.MAX_IMAGES + 1}, "'n' must be in 1..64"),
                              ({"mode": "spiral", "seeds": [1, 2]}, "'mode'"), ({"mode": "lerp", "seeds": [1]}, "'seeds'")):
            status, answer = _post(url, {"inputs": {}, "params": {"steps": STEPS, **params}})
            assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", (params, status, answer)
            assert named in answer["message"], (params, answer["message"][-500:])
        status, answer = _post(url, {"inputs": {"n": 2, "colour": "red"}})
        assert status == 400 and "'colour'" in answer["message"]
        # over the budget of UNet evaluations per request (default 64 x 50): refused before sampling, not hours later
        status, answer = _post(url, {"inputs": {}, "params": {"n": 64, "steps": 1000}})
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", (status, answer)
        assert "n=64 x steps=1000 = 64000 UNet evaluations, over this server's budget of 3200" in answer["message"], answer["message"][-500:]

        # the input example logged with the model, posted as it is: two rows, four samples and a Local Basis edit
        example = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{registry.INPUT_EXAMPLE_FILE}", tracking_uri=uri,
                                                      dst_path=str(tmp_path / "example"))
        status, answer = _post(url, json.loads(Path(example).read_text()))
        assert status == 200, answer
        samples, edit = answer["predictions"]
        assert len(_images({"predictions": samples})) == 4 and len(_images({"predictions": edit["images"]})) == 3
        assert len(edit["singular_values"]) == 1 and edit["singular_values"][0] > 0
        # a served PNG sent back as it came (base64) to be inverted: x_T of the model's shape, the redraw as a PNG
        status, answer = _post(url, {"inputs": {"mode": "invert", "image": samples[0], "steps": STEPS}})
        assert status == 200, answer
        inverted = answer["predictions"]
        assert inverted["x_T_shape"] == [3, RES, RES] and len(inverted["x_T"]) == 3 * RES * RES
        assert len(_images({"predictions": [inverted["reconstruction"]]})) == 1
    finally:
        stop_process(proc)


@pytest.mark.gpu
def test_the_model_samples_on_the_gpu_when_there_is_one(tmp_path, tiny_model_dir):
    """device auto -> CUDA where there is one; device cpu on the same server gives the same images (within a few levels)."""
    import mlflow

    path = tmp_path / "model"
    registry.save_served_model(path, tiny_model_dir)
    model = mlflow.pyfunc.load_model(str(path))
    inner = model.unwrap_python_model()
    assert inner.device == "cuda" and next(inner._unet("auto").parameters()).is_cuda
    on_gpu = [np.asarray(Image.open(io.BytesIO(p))) for p in model.predict(None, params={"n": 3, "seed": 5, "steps": STEPS})]
    on_cpu = [np.asarray(Image.open(io.BytesIO(p))) for p in model.predict(None, params={"n": 3, "seed": 5, "steps": STEPS, "device": "cpu"})]
    assert len(on_gpu) == 3 and max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(on_gpu, on_cpu)) <= 4  # TF32 convolutions
