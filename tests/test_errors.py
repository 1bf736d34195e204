"""Which errors a retry cannot fix: found anywhere in a chain, the way Ray Train wraps a worker's error."""

from __future__ import annotations

from isosweep.data.imagefiles import ImageFileError
from isosweep.errors import deterministic_cause
from isosweep.spec import SpecError
from isosweep.training.checkpoint import CorruptCheckpointError


class _WorkerGroupError(RuntimeError):
    """Shaped like ray.train.WorkerGroupError: the ranks' errors in `worker_failures`."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_deterministic_errors_are_found_through_wrappers_and_chains():
    bad_png = ImageFileError("/data/x.png", "truncated")
    assert deterministic_cause(bad_png) is bad_png
    wrapped = _WorkerGroupError({0: RuntimeError("gloo: connection closed by peer"), 1: bad_png})
    assert deterministic_cause(wrapped) is bad_png  # one rank's real cause, the others' collateral errors
    try:
        try:
            raise CorruptCheckpointError("/ckpt/checkpoint_3", "unet/diffusion_pytorch_model.safetensors: size 10 != 2048")
        except CorruptCheckpointError as inner:
            raise RuntimeError("resume failed") from inner
    except RuntimeError as outer:
        assert isinstance(deterministic_cause(outer), CorruptCheckpointError)
    assert isinstance(deterministic_cause(RuntimeError(SpecError("x"))), SpecError)
    # infrastructure: a lost node, a timeout, a plain crash are retried
    assert deterministic_cause(_WorkerGroupError({0: ConnectionError("node died"), 1: TimeoutError()})) is None
    assert deterministic_cause(None) is None
    looped = RuntimeError("a")
    looped.__context__ = RuntimeError("b")
    looped.__context__.__context__ = looped  # a cycle must not loop forever
    assert deterministic_cause(looped) is None
