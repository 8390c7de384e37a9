"""Nothing leaves a client or the server outside the accounted mechanism (issue 13).

In-process, on the session's TFF runtime: the learning process the trainer
builds, one round on BreastMNIST clients, and the client sampler it uses.
"""

import numpy as np
import pytest

from tff_dpmed.program import trainer
from tff_dpmed.program.config import RunConfig

_BASE = dict(dataset="breastmnist", num_clients=6, clients_per_round=3, client_batch_size=32,
             rounds=1, seed=3)


def _prepared(data_dir, **flat):
  return trainer.prepare(RunConfig.from_json({**_BASE, "data_dir": str(data_dir), **flat}))


def _one_round_metrics(run, clients):
  process, released = trainer.build_process(run, trainer.client_datasets(run))
  output = process.next(process.initialize(), [str(c) for c in clients])
  return output.metrics, released


def _leaves(tree):
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in _leaves(v)]
  if isinstance(tree, (list, tuple)):
    return [x for v in tree for x in _leaves(v)]
  return [tree]


@pytest.mark.parametrize("dp_flags", [
    dict(dp_mode="local", noise_multiplier=1.0, clip_mode="fixed", clip=1.0),
    dict(dp_mode="central", noise_multiplier=1.0, clip_mode="adaptive"),
    dict(dp_mode="example", noise_multiplier=1.0, clip_mode="fixed", clip=1.0),
    dict(dp_mode="example", noise_multiplier=1.0, clip_mode="fixed", clip=1.0,
         client_dp="central", server_noise_multiplier=1.0, server_clip=1.0),
], ids=["local", "central", "example", "example+central"])
def test_dp_process_releases_no_per_client_count_or_loss(tff_runtime, data_dir, dp_flags):
  del tff_runtime
  run = _prepared(data_dir, **dp_flags)
  clients = [0]  # One client: a sum over the cohort would be its exact values.
  metrics, released = _one_round_metrics(run, clients)
  assert not released
  assert metrics["client_work"]["train"] == ()
  exact_count = float(len(run.partitions[0]))
  numbers = [float(np.asarray(x)) for x in _leaves(metrics) if np.size(x) == 1]
  assert exact_count not in numbers, metrics


def test_without_dp_the_metrics_are_released_and_exact(tff_runtime, data_dir):
  # The same check can fail: without DP the count is there.
  del tff_runtime
  run = _prepared(data_dir, dp_mode="none")
  metrics, released = _one_round_metrics(run, [0])
  assert released
  assert float(metrics["client_work"]["train"]["num_examples"]) == len(run.partitions[0])


def _draws(cfg, rounds=5):
  sampler = trainer.make_sampler(cfg)
  return [sampler.sample().tolist() for _ in range(rounds)]


def test_seeded_dp_sampling_is_not_reproducible_unless_asked():
  central = RunConfig.from_json({"num_clients": 100, "clients_per_round": 20, "seed": 5,
                                 "noise_multiplier": 1.0})
  assert _draws(central) != _draws(central)  # P(equal) ~ 1e-100.
  insecure = central.replace(reproducible_sampling=True)
  assert _draws(insecure) == _draws(insecure)
  baseline = central.replace(dp_mode="none", noise_multiplier=None)
  assert _draws(baseline) == _draws(baseline)


def test_exported_config_of_a_dp_model_has_no_seed():
  from tff_dpmed.program import artifacts
  config = RunConfig.from_json({"seed": 5, "noise_multiplier": 1.0}).to_json()
  assert "seed" not in artifacts.exported_config(config)
  example = RunConfig.from_json({"seed": 5, "noise_multiplier": 1.0, "dp_mode": "example",
                                 "clip_mode": "fixed"}).to_json()
  assert "seed" not in artifacts.exported_config(example)
  assert "noise_seed" not in artifacts.exported_config(example)
  baseline = RunConfig.from_json({"seed": 5, "dp_mode": "none"}).to_json()
  assert artifacts.exported_config(baseline)["seed"] == 5
