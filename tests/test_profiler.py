"""`profiler: xplane`: a tiny run writes a trace of its step window into its TensorBoard folder; a run that
fails inside the window still stops and writes its trace; the window is counted from the run's first step;
bad keys are one-line errors."""

import glob
import os
import types

import jax
import pytest

from MaxText import train
from MaxText.errors import ConfigError
from MaxText.observe import metrics, profiler

# A given MFU denominator: the run skips measuring the CPU's matmul peak (seconds on a busy machine).
RUN = dict(profiler="xplane", skip_first_n_steps_for_profiler=1, steps=4, peak_tflops_per_device=1.0)


def _traces(config):
  return glob.glob(os.path.join(config.tensorboard_dir, "plugins", "profile", "*", "*.xplane.pb"))


def test_a_tiny_run_writes_its_trace_into_the_tensorboard_folder(make_config):
  config = make_config(profiler_steps=2, **RUN)
  train.train_and_evaluate(config, progress=False)
  traces = _traces(config)
  assert len(traces) == 1, traces
  with open(traces[0], "rb") as f:
    trace = f.read()
  assert b"train_step" in trace  # the jitted step ran inside the window


def test_a_run_that_fails_inside_the_window_stops_the_trace(make_config, monkeypatch, tmp_path):
  config = make_config(profiler_steps=5, **RUN)
  add = metrics.MetricWindow.add
  calls = []

  def failing_add(self, step_metrics):
    calls.append(1)
    if len(calls) == 2:  # after step 2: inside the window (steps 2..6)
      raise RuntimeError("boom")
    return add(self, step_metrics)

  monkeypatch.setattr(metrics.MetricWindow, "add", failing_add)
  with pytest.raises(RuntimeError, match="boom"):  # the run's own error, not the profiler's
    train.train_and_evaluate(config, progress=False)
  assert len(_traces(config)) == 1
  jax.profiler.start_trace(str(tmp_path))  # no trace is left running
  jax.profiler.stop_trace()


def _fake_trace(monkeypatch, first_step=0, **keys):
  """A Profiler over a stand-in jax.profiler, and the list of calls it makes."""
  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda folder: calls.append(("start", folder)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  config = types.SimpleNamespace(**{"profiler": "xplane", "tensorboard_dir": "tb", **keys})
  return profiler.Profiler(config, first_step=first_step, log=lambda text: None), calls


def test_the_window_counts_from_the_runs_first_step(monkeypatch):
  trace, calls = _fake_trace(monkeypatch, 10, skip_first_n_steps_for_profiler=2, profiler_steps=3)  # resumed at 10
  for step in range(10, 20):
    trace.maybe_start(step)
    calls.append(step + 1)  # the step that runs
    trace.maybe_stop(step + 1)
  trace.close()
  assert calls[calls.index(("start", "tb")) + 1: calls.index(("stop",))] == [13, 14, 15]
  assert calls.count(("stop",)) == 1


def test_a_run_that_ends_inside_the_window_is_stopped_by_close(monkeypatch):
  trace, calls = _fake_trace(monkeypatch, skip_first_n_steps_for_profiler=1, profiler_steps=5)
  for step in range(3):  # the run has 3 steps; the window would end after step 6
    trace.maybe_start(step)
    trace.maybe_stop(step + 1)
  assert calls == [("start", "tb")]
  trace.close()
  trace.close()  # the loop's finally may call it again: one stop only
  assert calls == [("start", "tb"), ("stop",)]


def test_no_trace_without_the_profiler(monkeypatch):
  trace, calls = _fake_trace(monkeypatch, profiler="", skip_first_n_steps_for_profiler=0, profiler_steps=1)
  for step in range(3):
    trace.maybe_start(step)
    trace.maybe_stop(step + 1)
  trace.close()
  assert calls == []


@pytest.mark.parametrize("overrides,message", [
    (dict(profiler="nsys"), "config key 'profiler' must be one of \"\", xplane; got 'nsys'"),
    (dict(profiler_steps=0), "config key 'profiler_steps' must be positive"),
    (dict(skip_first_n_steps_for_profiler=-1), "'skip_first_n_steps_for_profiler' must not be negative"),
])
def test_profiler_keys_are_checked(make_config, overrides, message):
  with pytest.raises(ConfigError, match=message):
    make_config(**overrides)
