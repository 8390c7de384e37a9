"""Tests for tff_dpmed.privacy.calibration."""

import dataclasses

import dp_accounting
import pytest

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import accounting
from tff_dpmed.privacy import calibration
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy import spec as spec_lib
from tff_dpmed.privacy.spec import DPSpec


def setting(**overrides) -> DPSpec:
  fields = dict(dp_mode="central", noise_multiplier=0.0, num_clients=3383, clients_per_round=120,
                sampling="poisson", delta=1e-5, accountant="rdp", clip_mode="fixed")
  fields.update(overrides)
  if fields.pop("adaptive_clipping", False):
    fields["clip_mode"] = "adaptive"
  return DPSpec.from_json(fields)


@pytest.mark.parametrize("overrides, rounds, target", [
    (dict(), 100, 2.0),
    (dict(adaptive_clipping=True), 100, 1.0),
    (dict(accountant="pld", adaptive_clipping=True), 30, 2.0),
    (dict(sampling="fixed"), 50, 4.0),
    (dict(sampling="all", clients_per_round=3383), 10, 3.0),
    (dict(dp_mode="local"), 50, 10.0),
    (dict(dp_mode="local", accountant="pld"), 50, 10.0),
    (dict(num_clients=20, clients_per_round=4, adaptive_clipping=True), 200, 8.0),
])
def test_round_trip(overrides, rounds, target):
  s = setting(**overrides)
  z = calibration.calibrate_noise_multiplier(s, rounds, target)
  eps = accounting.epsilon_for_rounds(dataclasses.replace(s, noise_multiplier=z), rounds)
  assert 0.98 * target <= eps <= target
  # Smallest: 0.1% less noise no longer meets the target.
  less = accounting.epsilon_for_rounds(dataclasses.replace(s, noise_multiplier=z * 0.999), rounds)
  assert less > target


def test_setting_noise_multiplier_is_ignored():
  a = calibration.calibrate_noise_multiplier(setting(noise_multiplier=0.0), 100, 2.0)
  b = calibration.calibrate_noise_multiplier(setting(noise_multiplier=5.0), 100, 2.0)
  assert a == b


def test_choose_clipped_count_stddev():
  assert spec_lib.choose_clipped_count_stddev(0.0, 120) == 0.0
  assert spec_lib.choose_clipped_count_stddev(1.2, 120) == pytest.approx(6.0)  # TFF default.
  assert spec_lib.choose_clipped_count_stddev(1.2, 4) == 1.2  # Small cohort: s = z.
  for z, cohort in [(0.3, 1), (1.2, 4), (1.2, 23), (5.0, 100), (50.0, 3383)]:
    s = spec_lib.choose_clipped_count_stddev(z, cohort)
    assert z < 2 * s  # TFF would raise otherwise.
    z_v, s_used = mechanisms.for_spec(
        setting(noise_multiplier=z, clients_per_round=cohort, num_clients=5000,
                adaptive_clipping=True)).noise_split()
    assert s_used == s
    assert z_v <= z / (0.75**0.5) * (1 + 1e-12)  # At most ~1.155x more update noise.
    # Whatever s is, the composed event accounts exactly as one Gaussian with z.
    composed = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_v),
                                              dp_accounting.GaussianDpEvent(2 * s)])
    eps = [dp_accounting.rdp.RdpAccountant().compose(
        dp_accounting.PoissonSampledDpEvent(0.03, e), 100).get_epsilon(1e-5)
           for e in (composed, dp_accounting.GaussianDpEvent(z))]
    assert eps[0] == pytest.approx(eps[1], rel=1e-9)


@pytest.mark.parametrize("kwargs, words", [
    (dict(target_epsilon=1e-4, s=setting(sampling="all", clients_per_round=3383)),
     "not reachable: even noise_multiplier=10000"),
    (dict(target_epsilon=0.0), "positive"),
    (dict(target_epsilon=-1.0), "positive"),
    (dict(target_epsilon=float("nan")), "positive"),
    (dict(target_epsilon=float("inf")), "positive"),
    (dict(rounds=0), "at least 1"),
    (dict(s=setting(dp_mode="none")), "nothing to calibrate"),
    (dict(s=setting(sampling="fixed", accountant="pld")), "pld"),
    (dict(s=setting(adaptive_clipping=True, clipped_count_stddev=0.3), target_epsilon=0.5),
     "clipped_count_stddev"),
])
def test_bad_input_is_a_one_line_usage_error(kwargs, words):
  s = kwargs.get("s", setting())
  with pytest.raises(UsageError) as e:
    calibration.calibrate_noise_multiplier(s, kwargs.get("rounds", 100),
                                           kwargs.get("target_epsilon", 2.0))
  assert words in str(e.value) and "\n" not in str(e.value)


def test_pld_reaches_a_target_that_rdp_cannot():
  # At 2 rounds, RDP cannot get below epsilon ~0.0035 with any z <= 1e4, but
  # PLD can reach 0.001; PLD's calibration must not give up on RDP's verdict.
  setting = DPSpec(mode="central", noise_multiplier=1.0, num_clients=10, clients_per_round=5,
                   sampling="poisson", delta=1e-5, accountant="pld", clip_mode="fixed")
  with pytest.raises(UsageError):
    calibration.calibrate_noise_multiplier(
        dataclasses.replace(setting, accountant="rdp"), 2, 0.001)
  z = calibration.calibrate_noise_multiplier(setting, 2, 0.001)
  eps = accounting.epsilon_for_rounds(dataclasses.replace(setting, noise_multiplier=z), 2)
  assert 0.98 * 0.001 <= eps <= 0.001


@pytest.mark.parametrize("flat", [
    dict(dp_mode="central", num_clients=100, clients_per_round=20, rounds=30),
    dict(dp_mode="example", clip_mode="fixed", clip=1.0, num_clients=10,
         clients_per_round=10, sampling="all", rounds=5, client_batch_size=64),
])
def test_training_calibrates_to_a_target_epsilon(data_dir, tmp_path, flat):
  # A calibrated config carries both the target and the noise it found.
  from tff_dpmed.program import trainer
  from tff_dpmed.program.config import RunConfig
  cfg = RunConfig.from_json(dict(flat, target_epsilon=3.0, data_dir=str(data_dir),
                                 download=False, output_dir=str(tmp_path)))
  run = trainer.prepare(cfg)
  spec = run.config.dp
  assert spec.noise_multiplier > 0 and run.config.target_epsilon == 3.0
  eps = accounting.epsilon_for_rounds(spec, flat["rounds"])
  assert (1 - calibration.TOLERANCE) * 3.0 <= eps <= 3.0
  if flat["dp_mode"] == "example":
    assert sum(spec.client_sizes) == len(run.splits.train_labels)


def test_both_noise_flags_are_refused():
  from tff_dpmed.program import config
  with pytest.raises(UsageError, match="alternatives"):
    config.check_noise_flags({"noise_multiplier": 1.0, "target_epsilon": 3.0})
