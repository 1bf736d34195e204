"""No credential leaves the process and nothing private is left readable or lying around.

The report (every file it writes) holds no secret in any URI form; `Authorization` values and chained
exceptions are scrubbed; local files are 0600 in 0700 folders; temporary model downloads are removed
after a successful and a failing load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from isosweep import storage as st
from isosweep.files import write_bytes_atomic
from isosweep.models.builtin import default_scheduler
from isosweep.models.loading import load_unet_and_scheduler
from isosweep.redact import format_exception_scrubbed, scrub, scrub_headers, scrub_text, scrub_tree
from isosweep.results.report import write_report
from isosweep.results.rows import SweepOutcome, make_row, summarize
from isosweep.spec import BaseModelSpec, spec_from_dict

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzz9SECRETKEY"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
# every secret and the text it must not survive in; the report holds them in every URI form
SECRETS = ["alice", "hunter2pass", "tokSECRET1", "sigSECRET2", "sigSECRET3", AWS_SECRET, "abc.def", JWT, "QWxhZGRpbjpvcGVu"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leaky_spec():
    return spec_from_dict({
        "name": "demo",
        "base_model": {"source": "https://alice:hunter2pass@models.internal/unet"},  # userinfo
        "dataset": {"path": f"/data/{JWT}/images"},  # a JWT with no key naming it
        "evaluation": {"weights_dir": f"/mnt/{AWS_SECRET}/weights"},  # the value of AWS_SECRET_ACCESS_KEY
        "tracking": {"uri": "https://mlflow.internal:5000/?token=tokSECRET1&X-Amz-Signature=sigSECRET2",  # query
                     "experiment": "exp Authorization: Bearer abc.def",
                     "registry_name": "isodiff-Basic QWxhZGRpbjpvcGVu"},
        "storage": {"path": "s3://bucket/p?endpoint_override=h:9000&X-Amz-Signature=sigSECRET3"},
    }, check_paths=False)


def _outcome(spec, sweep_dir: Path) -> SweepOutcome:
    metrics = {"fid": 10.0, "ppl": 100.0, "evaluated": True,
               "checkpoint_path": "s3://bucket/p/ck?X-Amz-Signature=sigSECRET3"}
    rows = [make_row("base", {"baseline": True, "lambda_iso": 0.0, "p": 0.0, "iso_metric": "identity"}, metrics, "DONE"),
            make_row("t1", {"lambda_iso": 1e-4, "p": 0.5, "iso_metric": "stereographic"}, {**metrics, "fid": 9.0}, "DONE")]
    front, champion = summarize(spec, rows)
    return SweepOutcome("demo-20261126-101010", sweep_dir, rows, front, champion)


def test_report_holds_no_secret_in_any_file_and_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "pareto.png").write_bytes(b"\x89PNG fake")
    os.chmod(sweep_dir / "pareto.png", 0o644)
    spec = _leaky_spec()
    outcome = _outcome(spec, sweep_dir)
    assert outcome.champion is not None
    out = write_report(spec, outcome, tmp_path / "reports" / "report")

    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"report.md", "report.html", "pareto.png"}
    for path in files:
        data = path.read_bytes()
        leaked = [s for s in SECRETS if s.encode() in data]
        assert not leaked, f"{path.name} holds {leaked}"
        assert _mode(path) == 0o600, f"{path.name} is {oct(_mode(path))}"
    assert not [p for p in out.rglob(".*")]  # no temporary file of the atomic writes left
    assert _mode(out) == 0o700 and _mode(out.parent) == 0o700  # the folders the writer created
    md = (out / "report.md").read_text()
    # scrubbed, not garbled: the scheme, the host and the query's harmless parts stay
    assert "Authorization: Bearer ***" in md and "https://***@models.internal/unet" in md
    assert "endpoint_override=h:9000&X-Amz-Signature=***" in md and "?token=***" in md


def test_authorization_values_in_text_and_header_dicts():
    assert scrub_text("Authorization: Bearer abc.def") == "Authorization: Bearer ***"
    assert scrub_text("curl -H 'Authorization: Basic QWxhZGRpbjpvcGVu' x") == "curl -H 'Authorization: Basic ***' x"
    assert scrub_text("{'authorization': 'Bearer abc.def', 'accept': 'json'}") == "{'authorization': 'Bearer ***', 'accept': 'json'}"
    assert "fe5f80f77d5" not in scrub_text("Authorization: AWS4-HMAC-SHA256 Credential=x/y, Signature=fe5f80f77d5fa3")
    assert scrub_text("retrying with Bearer abc.def.") == "retrying with Bearer ***."
    assert scrub_text("Bearer tokens and Basic settings.") == "Bearer tokens and Basic settings."  # prose stays
    assert scrub_text(JWT) == "***" and scrub_text("jwt eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0. end") == "jwt *** end"
    headers = {"Authorization": "Bearer abc.def", "Proxy-Authorization": "Basic QWxhZGRpbjpvcGVu", "Cookie": "s=1",
               "X-Api-Key": "k1", "X-Amz-Security-Token": "t1", "Accept": "application/json",
               "Referer": "http://u:p@h/x"}
    assert scrub_headers(headers) == {"Authorization": "Bearer ***", "Proxy-Authorization": "Basic ***", "Cookie": "***",
                                      "X-Api-Key": "***", "X-Amz-Security-Token": "***", "Accept": "application/json",
                                      "Referer": "http://***@h/x"}
    assert scrub_tree({"headers": {"authorization": "Token abc123"}}) == {"headers": {"authorization": "Token ***"}}
    assert scrub("authorization", "opaque") == "***"
    for text in ("Authorization: Bearer abc.def", "x Basic QWxhZGRpbjpvcGVu", "http://u:p@h?token=t", JWT,
                 "Authorization: AWS4-HMAC-SHA256 Credential=x/y, Signature=fe5f80f77d5fa3"):
        once = scrub_text(text)
        assert scrub_text(once) == once  # idempotent: text is scrubbed again at every layer it crosses


def test_userinfo_with_a_raw_at_sign_goes_whole():
    """urlsplit reads the userinfo up to the authority's last '@' (`p@ss` is the password): all of it goes."""
    from urllib.parse import urlsplit

    assert urlsplit("http://u:p@ss@host/x").password == "p@ss"
    assert scrub_text("http://u:p@ss@host/x") == "http://***@host/x"
    assert scrub_text("s3://k:se@cret@bucket/p") == "s3://***@bucket/p"
    assert scrub_text("GET https://a:b@c@d:5000?x=1#f@g failed") == "GET https://***@d:5000?x=1#f@g failed"
    assert scrub_text("http://u:p#w@h/x") == "http://***@h/x"  # a raw '#' in the password: still a credential
    for kept in ("http://h/a@b", "mail a@b http://h x@y", "models:/name@champion"):  # no userinfo: unchanged
        assert scrub_text(kept) == kept
    for text in ("http://u:p@ss@host/x", "s3://k:se@cret@bucket/p", "http://u:p#w@h/x"):
        assert scrub_text(scrub_text(text)) == scrub_text(text)


def test_azure_keys_and_sas_tokens():
    """Account keys and SAS tokens in connection strings, assignments and JSON; the other parts stay readable."""
    from isosweep.redact import is_secret_key

    conn = "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc+/==;EndpointSuffix=core.windows.net"
    assert scrub_text(conn) == "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=***;EndpointSuffix=core.windows.net"
    sas = "BlobEndpoint=https://a.blob.core.windows.net/;SharedAccessSignature=sv=2021-06-08&sp=rl&sig=Zm9v%2B%3D;QueueEndpoint=q"
    assert scrub_text(sas) == "BlobEndpoint=https://a.blob.core.windows.net/;SharedAccessSignature=***;QueueEndpoint=q"
    bus = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=zzz9="
    assert scrub_text(bus) == "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=***"
    assert scrub_text("account_key=abc+/== and sas_token=sv=2021&sig=xyz end") == "account_key=*** and sas_token=*** end"
    assert scrub_text('{"accountKey": "abc+/==", "p": 1}') == '{"accountKey": "***", "p": 1}'
    assert scrub_text("AZURE_STORAGE_KEY=k3y+/== next") == "AZURE_STORAGE_KEY=*** next"
    for text in (conn, sas, bus, "sas_token=sv=2021&sig=xyz end"):
        assert scrub_text(scrub_text(text)) == scrub_text(text)
    for key in ("AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING", "account_key", "accountKey", "AccountKey",
                "SharedAccessSignature", "sas_token"):
        assert is_secret_key(key), key
        assert scrub_tree({key: "value1"}) == {key: "***"}
    for key in ("AZURE_STORAGE_ACCOUNT", "AccountName", "SharedAccessKeyName", "EndpointSuffix"):  # who and where
        assert not is_secret_key(key), key


def test_chained_exceptions_format_scrubbed(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "mlflow-token-value-123")
    try:
        try:
            raise ConnectionError("GET http://user:password@mlflow:5000/api with Authorization: Bearer abc.def")
        except ConnectionError as inner:
            try:
                raise OSError("token mlflow-token-value-123 refused")
            except OSError:
                raise RuntimeError("tracking down: https://bob:pw123@mlflow:5000?token=tokSECRET1") from inner
    except RuntimeError as exc:
        err = exc
    full = format_exception_scrubbed(err)
    short = format_exception_scrubbed(err, with_traceback=False)
    for text in (full, short):
        for secret in ("password", "pw123", "abc.def", "tokSECRET1", "user:", "bob"):
            assert secret not in text, (secret, text)
    assert "The above exception was the direct cause" in full and "Traceback" in full
    assert short == ("RuntimeError: tracking down: https://***@mlflow:5000?token=***\n"
                     "caused by: ConnectionError: GET http://***@mlflow:5000/api with Authorization: Bearer ***\n")
    try:
        try:
            raise KeyError("http://u:p@h")
        except KeyError:
            raise ValueError("second")
    except ValueError as exc:
        assert format_exception_scrubbed(exc, with_traceback=False) == "ValueError: second\nwhile handling: KeyError: 'http://***@h'\n"


def test_the_attempts_file_and_its_warning_hold_no_secret(tmp_path, capsys):
    """A trial's failures are recorded in its attempts file (read by every restart) and said in a warning; the
    errors' messages quote a tracking URI with its password and an AWS key id: neither is written nor printed."""
    from isosweep.sweep.trial import ATTEMPTS_FILE, DeterministicTrialError, fit_with_one_budget

    class BadSpec(ValueError):
        deterministic = True

    errors = [ConnectionError("POST http://u:SECRETPW@h:5000/api refused for AKIAABCDEFGHIJKLMNOP"),
              BadSpec("bad input at s3://k:se@cret@bucket/p, key AKIAABCDEFGHIJKLMNOP")]

    class Failing:  # a trainer whose fit fails: first as infrastructure (retried), then deterministically
        def fit(self):
            raise errors.pop(0)

    path = tmp_path / "t1" / ATTEMPTS_FILE
    with pytest.raises(DeterministicTrialError) as err:
        fit_with_one_budget(Failing, "t1", budget=1, attempts_uri=str(path))
    text, out = path.read_text(), capsys.readouterr().out
    for secret in ("SECRETPW", "AKIAABCDEFGHIJKLMNOP", "se@cret", "cret@"):
        assert secret not in text and secret not in out and secret not in str(err.value), secret
    record = json.loads(text)
    assert record["failures"] == 1 and "ConnectionError: POST http://***@h:5000/api refused for ***" == record["last_error"]
    assert "BadSpec: bad input at s3://***@bucket/p" in record["deterministic"] and "http://***@h:5000" in out


def test_validate_and_train_print_uris_scrubbed(tmp_path, capsys):
    """`isosweep validate` prints the resolved spec (tracking URI, storage, base model) and `isosweep train` its
    base model, storage and checkpoint: all scrubbed, the YAML still a spec that parses."""
    import yaml

    from isosweep.cli import main
    from isosweep.commands.train import finish_lines, start_line

    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "search_spaces" / "demo.yaml").read_text())
    data["tracking"] = {"uri": "http://user:SECRETPW@mlflow.internal:5000"}
    data["storage"] = {"path": "s3://k:SECRETPW@bucket/sweeps?endpoint_override=h:9000"}
    path = tmp_path / "leaky.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "SECRETPW" not in out + err and "base model: built in" in err
    shown = yaml.safe_load(out)
    assert shown["tracking"]["uri"] == "http://***@mlflow.internal:5000"
    assert shown["storage"]["path"] == "s3://***@bucket/sweeps?endpoint_override=h:9000"

    data["base_model"] = {"source": "https://alice:SECRETPW@models.internal/unet"}
    spec = spec_from_dict(data, check_paths=False)
    line = start_line(spec, "demo-train-1", "s3://k:SECRETPW@bucket/p")
    assert "SECRETPW" not in line and "base=https://***@models.internal/unet" in line and "storage=s3://***@bucket/p" in line
    done = finish_lines({"step": 40, "loss": 0.5}, 12.0, "s3://k:SECRETPW@bucket/p/demo-train-1/checkpoint_000001")
    assert done == ["done in 12 s: step 40 loss=0.5",
                    "final checkpoint (DDPMPipeline directory): s3://***@bucket/p/demo-train-1/checkpoint_000001"]


def test_storage_writes_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        before = _mode(tmp_path)
        st.write_json(str(tmp_path / "a" / "b" / "state.json"), {"x": 1})
        assert _mode(tmp_path / "a" / "b" / "state.json") == 0o600
        assert _mode(tmp_path / "a") == _mode(tmp_path / "a" / "b") == 0o700 and _mode(tmp_path) == before
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        (shared / "old.json").write_text("{}")
        os.chmod(shared / "old.json", 0o644)
        st.write_bytes(str(shared / "old.json"), b"{}")  # rewritten: private now; the existing folder keeps its mode
        assert _mode(shared / "old.json") == 0o600 and _mode(shared) == 0o755
        src = tmp_path / "src"
        (src / "fig").mkdir(parents=True)
        (src / "report.md").write_text("# r")
        (src / "fig" / "a.png").write_bytes(b"png")
        st.upload_dir(src, str(tmp_path / "dst" / "report"))
        copied = tmp_path / "dst" / "report"
        assert _mode(copied / "report.md") == _mode(copied / "fig" / "a.png") == 0o600
        assert _mode(tmp_path / "dst") == _mode(copied) == _mode(copied / "fig") == 0o700
        back = st.download_dir(str(copied), tmp_path / "back")
        assert _mode(back / "fig" / "a.png") == 0o600 and _mode(back / "fig") == _mode(back) == 0o700
        plain = write_bytes_atomic(tmp_path / "plain.bin", b"x")  # no mode: the umask's default, as before
        assert _mode(plain) == 0o644
        assert _mode(write_bytes_atomic(tmp_path / "m.bin", b"x", mode=0o640)) == 0o640
    finally:
        os.umask(old)


# ---- temporary folders: removed after a successful and a failing call ----

@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """A TMPDIR of this test's own, so leftovers are seen (tempfile caches its folder: reset it)."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert tempfile.gettempdir() == str(tmp)
    return tmp


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A registered model's artifact layout: `artifacts/pipeline/` holding a tiny DDPMPipeline."""
    root = tmp_path_factory.mktemp("registered")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)
    DDPMPipeline(unet=unet, scheduler=default_scheduler()).save_pretrained(root / "artifacts" / "pipeline")
    return root


def _leftovers(tmp: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))


def test_base_model_download_is_removed_after_loading(private_tmp, tiny_pipeline):
    seen = []

    def fetch(uri: str, dst: Path) -> Path:  # what tracking.models.download_model does, without a server
        seen.append(dst)
        shutil.copytree(tiny_pipeline, dst, dirs_exist_ok=True)
        return dst

    unet, scheduler = load_unet_and_scheduler(BaseModelSpec(source="models:/tiny@champion"), fetch=fetch)
    assert seen and seen[0].name.startswith("isosweep-base-") and not seen[0].exists()
    assert _leftovers(private_tmp) == []
    reference, _ = load_unet_and_scheduler(BaseModelSpec(source=str(tiny_pipeline / "artifacts" / "pipeline")))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():  # the weights were in memory before their files went
        assert torch.equal(unet(x, 10).sample, reference(x, 10).sample)
    assert scheduler.config.num_train_timesteps == 1000


@pytest.mark.parametrize("failure", ["download", "no_model"])
def test_base_model_download_is_removed_after_a_failure(private_tmp, tiny_pipeline, failure):
    def fetch(uri: str, dst: Path) -> Path:
        (dst / "artifacts").mkdir()
        (dst / "artifacts" / "partial.bin").write_bytes(b"x" * 100)
        if failure == "download":
            raise ConnectionError("connection reset half way")
        return dst

    with pytest.raises(ConnectionError if failure == "download" else FileNotFoundError):
        load_unet_and_scheduler(BaseModelSpec(source="models:/tiny@champion"), fetch=fetch)
    assert _leftovers(private_tmp) == []


def _fake_resolve(tiny_pipeline: Path, fail: bool):
    def resolve_model(model, tracking_uri=None, dst=None):
        assert dst is not None, "a URI must be downloaded into a folder the command removes"
        shutil.copytree(tiny_pipeline, dst, dirs_exist_ok=True)
        if fail:
            raise ConnectionError("download interrupted")
        return Path(dst) / "artifacts" / "pipeline"
    return resolve_model


@pytest.mark.parametrize("fail", [False, True])
def test_sample_and_interpolate_leave_no_download(private_tmp, tiny_pipeline, tmp_path, monkeypatch, fail):
    from isosweep.commands import models as model_commands

    monkeypatch.setattr(model_commands, "resolve_model", _fake_resolve(tiny_pipeline, fail))
    sample = argparse.Namespace(model="models:/tiny@champion", n=2, steps=1, seed=0, tracking_uri=None,
                                out=str(tmp_path / "grid.png"))
    interp = argparse.Namespace(model="models:/tiny@champion", seeds=[1, 2], frames=3, mode="slerp", steps=1,
                                tracking_uri=None, out=str(tmp_path / "strip.png"))
    for command, args in ((model_commands.sample_command, sample), (model_commands.interpolate_command, interp)):
        if fail:
            with pytest.raises(ConnectionError):
                command(args)
        else:
            assert command(args) == 0 and Path(args.out).is_file()
        assert _leftovers(private_tmp) == [], command.__name__


def test_a_failed_pull_removes_what_it_wrote(tiny_pipeline, tmp_path, monkeypatch):
    from isosweep.commands import models as model_commands

    def resolve_model(model, tracking_uri=None, dst=None):
        (Path(dst) / "artifacts").mkdir(parents=True)
        (Path(dst) / "artifacts" / "partial.bin").write_bytes(b"x")
        raise ConnectionError("download interrupted")

    monkeypatch.setattr(model_commands, "resolve_model", resolve_model)
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        with pytest.raises(ConnectionError):
            model_commands.pull_command(argparse.Namespace(model_uri="models:/tiny@champion", out=str(out), tracking_uri=None))
    assert not new.exists() and empty.is_dir() and not list(empty.iterdir())
