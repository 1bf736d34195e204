"""Step metrics of the training loop, buffered and sent in batches without ever stopping training."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Mapping

from mlflow.entities import Metric

from isosweep.tracking.client import MAX_KEY, MAX_METRICS_PER_BATCH, TrackingError, TrackingStop, client, clip, refusal, retry_call


class StepLogger:
    """Buffers step metrics and sends them with `MlflowClient.log_batch` every `flush_every` steps.

    For the training loop (rank 0): `log({"loss": 0.1, "tr_ratio": 1.2}, step)` costs no network
    call; every `flush_every` distinct steps one batched request goes out (1000 metrics per request).
    A failed periodic flush never stops training: it is tried once, the metrics stay buffered (up to
    `max_buffer`, oldest dropped after that) and one warning is printed. `close()` (the final flush)
    retries with backoff and raises `TrackingError` naming the URI if the server is still down.
    A refusal (401/403: an expired token; a deleted run) is final: `stop` records it (one warning), the buffer is
    dropped and no further request goes out, from this logger or any other holder of the same `stop`.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 50, max_buffer: int = 200_000,
                 stop: TrackingStop | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_every = max(1, int(flush_every))
        self.max_buffer = max_buffer
        self._buffer: list[Metric] = []
        self._steps_since_flush = 0
        self._last_step: int | None = None
        self._warned = False
        self._closed = False
        self._client = client(tracking_uri)
        self.stop = stop or TrackingStop(tracking_uri, f"run {run_id}")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer finite scalar metrics (floats, ints, 0-d tensors) at `step`; nothing once tracking has stopped."""
        if self.stop.kind is not None:
            return
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            try:
                v = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                self._buffer.append(Metric(key=clip(str(key), MAX_KEY), value=v, timestamp=ts, step=int(step)))
        if step != self._last_step:
            self._steps_since_flush += 1
            self._last_step = step
        if len(self._buffer) > self.max_buffer:
            del self._buffer[: len(self._buffer) - self.max_buffer]
        if self._steps_since_flush >= self.flush_every:
            self.flush()

    def flush(self, *, final: bool = False) -> bool:
        """Send the buffer; True when it is empty afterwards. Non-final flushes never raise, nor does a refusal."""
        self._steps_since_flush = 0
        if self.stop.kind is not None:
            self._buffer.clear()
            return False
        while self._buffer:
            chunk = self._buffer[:MAX_METRICS_PER_BATCH]
            try:
                if final:
                    retry_call("log step metrics", self.tracking_uri, self._client.log_batch, self.run_id, metrics=chunk)
                else:
                    retry_call("log step metrics", self.tracking_uri, self._client.log_batch, self.run_id, metrics=chunk, attempts=1)
            except Exception as exc:  # noqa: BLE001 -- a refusal stops tracking; an outage is TrackingError; else a bug
                kind = refusal(exc)
                if kind is not None:
                    self.stop.stop(kind, f"logging step metrics of run {self.run_id}", exc)
                    self._buffer.clear()
                    return False
                if not isinstance(exc, TrackingError):
                    raise
                if final:
                    raise TrackingError(f"final flush of {len(self._buffer)} buffered step metrics failed: {exc}") from exc
                if not self._warned:
                    warnings.warn(f"isosweep: step metrics kept in memory, tracking server not reachable: {exc}", RuntimeWarning, stacklevel=2)
                    self._warned = True
                return False
            del self._buffer[: len(chunk)]
        return True

    def close(self, *, raise_errors: bool = True) -> None:
        """Final flush (retried with backoff); raises TrackingError naming the URI if it cannot.

        raise_errors=False warns instead (use it while another exception is propagating, so the
        tracking error does not hide the training error).
        """
        if self._closed:
            return
        try:
            self.flush(final=True)
        except TrackingError as exc:
            if raise_errors:
                raise
            warnings.warn(f"isosweep: {exc}", RuntimeWarning, stacklevel=2)
        self._closed = True

    def __enter__(self) -> "StepLogger":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(raise_errors=exc_type is None)


