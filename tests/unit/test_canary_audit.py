"""The canary audit in the learning process the trainer builds (issue 15).

In-process, on the session's TFF runtime and BreastMNIST clients, as
test_privacy_leaks.py: canaries reach the model but never the utility
metrics, and a run whose aggregator adds no noise while the ledger accounts
for some is flagged as a violation (a run with the noise is not).
"""

import dataclasses

import numpy as np
import pytest

from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy.ledger import PrivacyLedger
from tff_dpmed.program import canary_audit
from tff_dpmed.program import trainer
from tff_dpmed.program.config import RunConfig
from tff_dpmed.program.sampling import ClientSampler

_BASE = dict(dataset="breastmnist", num_clients=6, clients_per_round=3, client_batch_size=32,
             rounds=1, seed=3, audit="canary")


def _prepared(data_dir, **flat):
  return trainer.prepare(RunConfig.from_json({**_BASE, "data_dir": str(data_dir), **flat}))


def _trainable(process, state):
  return [np.asarray(w) for w in process.get_model_weights(state).trainable]


def test_canaries_reach_the_model_but_never_the_metrics(tff_runtime, data_dir):
  del tff_runtime
  run = _prepared(data_dir, dp_mode="none", num_canaries=5, canary_norm=1.0)
  plan = canary_audit.plan_for(run.config)
  assert plan.first_id == 6 and plan.num_canaries == 5
  process, released = trainer.build_process(run, trainer.client_datasets(run))
  assert released  # Without DP the train metrics are released: canaries must not be in them.
  state = process.initialize()
  before = _trainable(process, state)
  output = process.next(state, ["0", "1", "6", "7"])  # Real 0 and 1, canaries 0 and 1.
  train = output.metrics["client_work"]["train"]
  assert float(train["num_examples"]) == len(run.partitions[0]) + len(run.partitions[1])
  alone = process.next(state, ["0", "1"]).metrics["client_work"]["train"]
  for key in ("loss", "accuracy"):
    assert float(train[key]) == pytest.approx(float(alone[key]), rel=1e-5), key
  # The canaries' directions are in the model; one never sampled is not.
  after = _trainable(process, output.state)
  delta = np.concatenate([(a - b).ravel() for a, b in zip(after, before)])
  rows = canary_audit.canaries_lib.directions(plan, range(3), delta.size)
  cosines = rows @ delta / np.linalg.norm(delta)
  assert cosines[0] > 0.2 and cosines[1] > 0.2 and abs(cosines[2]) < 0.05, cosines


def test_canary_sampling_leaves_the_real_cohorts_as_they_were():
  plain = ClientSampler(50, 10, "poisson", seed=7)
  with_canaries = ClientSampler(50, 10, "poisson", seed=7, num_canaries=40)
  drawn = []
  for _ in range(20):
    np.testing.assert_array_equal(plain.sample(), with_canaries.sample())
    drawn.append(with_canaries.sample_canaries())
  ids = np.concatenate(drawn)
  assert ids.min() >= 50 and ids.max() < 90
  assert 0.1 < len(ids) / (20 * 40) < 0.3  # Each canary joins with q = 10 / 50.
  state = with_canaries.get_state()
  first = (with_canaries.sample(), with_canaries.sample_canaries())
  with_canaries.set_state(state)
  second = (with_canaries.sample(), with_canaries.sample_canaries())
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  assert ClientSampler(50, 10, "all", seed=1, num_canaries=4).sample_canaries().tolist() == [
      50, 51, 52, 53]


def _audited_run(run, rounds: int) -> dict:
  """`rounds` rounds as the loop runs them (canaries beside the real cohort), then the audit."""
  process, _ = trainer.build_process(run, trainer.client_datasets(run))
  sampler = trainer.make_sampler(run.config)
  ledger = PrivacyLedger(run.mechanism.spec)
  state = process.initialize()
  start = _trainable(process, state)
  for _ in range(rounds):
    participants, canaries = sampler.sample(), sampler.sample_canaries()
    state = process.next(state, [str(i) for i in [*participants, *canaries]]).state
    ledger.record_round(participants)  # The ledger sees the real clients only.
  spec = run.mechanism.spec
  return canary_audit.audit(canary_audit.plan_for(run.config), start, _trainable(process, state),
                            ledger.epsilon(), spec.delta, spec.mode)


_CENTRAL = dict(dp_mode="central", noise_multiplier=1.0, clip_mode="fixed", clip=0.5,
                num_canaries=40, server_momentum=0.0)


def test_noise_turned_off_inside_the_aggregator_is_a_violation(tff_runtime, data_dir,
                                                               monkeypatch):
  del tff_runtime
  run = _prepared(data_dir, **_CENTRAL)
  # A test double: the aggregator adds no noise, while the ledger accounts for z = 1.
  silent = mechanisms.for_spec(dataclasses.replace(run.mechanism.spec, noise_multiplier=0.0))
  monkeypatch.setattr(run.mechanism, "aggregator", silent.aggregator)
  result = _audited_run(run, rounds=3)
  assert result["violation"], result
  assert result["epsilon_ci"][0] > result["theoretical_epsilon"] > 0
  assert result["num_canaries"] == 40
  assert result["num_unseen_directions"] == 0 and result["null"].startswith("exact")
  assert result["std_unseen_cosine"] == pytest.approx(result["model_dimension"] ** -0.5)


def test_with_the_noise_no_violation_is_found(tff_runtime, data_dir):
  del tff_runtime
  result = _audited_run(_prepared(data_dir, **_CENTRAL), rounds=3)
  assert not result["violation"], result
  assert result["epsilon_ci"][0] < result["theoretical_epsilon"]


# Example level: gradient canaries inside DP-SGD (data/canary_examples.py).
_EXAMPLE = dict(dp_mode="example", clip_mode="fixed", clip=1.0, num_clients=5,
                clients_per_round=5, sampling="all", client_batch_size=16,
                client_learning_rate=1.0, server_learning_rate=1.0, server_momentum=0.0,
                num_canaries=100, seed=None)


def _example_audited_run(run, rounds: int) -> dict:
  process, _ = trainer.build_process(run, trainer.client_datasets(run))
  ledger = PrivacyLedger(run.mechanism.spec)
  state = process.initialize()
  start = _trainable(process, state)
  everyone = [str(i) for i in range(run.config.num_clients)]
  for _ in range(rounds):
    state = process.next(state, everyone).state
    ledger.record_round(list(range(run.config.num_clients)))
  return canary_audit.example_audit(run.example_canaries, start, _trainable(process, state),
                                    ledger.epsilon(), run.mechanism.spec.delta)


def test_example_level_noise_turned_off_inside_dp_sgd_is_a_violation(tff_runtime, data_dir,
                                                                     monkeypatch):
  del tff_runtime
  run = _prepared(data_dir, **_EXAMPLE, noise_multiplier=3.0)
  # A test double: DP-SGD adds no noise, while the ledger accounts for z = 3.
  from tff_dpmed.privacy import example_dp
  build = example_dp.build_dp_sgd_client_work
  monkeypatch.setattr(example_dp, "build_dp_sgd_client_work",
                      lambda *a, **k: build(*a, **{**k, "noise_multiplier": 0.0}))
  result = _example_audited_run(run, rounds=2)
  assert result["violation"], result
  assert result["epsilon_lower_bound"] > result["theoretical_epsilon"] > 0
  assert result["num_canaries"] == 100


def test_example_level_with_the_noise_no_violation_is_found(tff_runtime, data_dir):
  del tff_runtime
  result = _example_audited_run(_prepared(data_dir, **_EXAMPLE, noise_multiplier=3.0),
                                rounds=2)
  assert not result["violation"], result
