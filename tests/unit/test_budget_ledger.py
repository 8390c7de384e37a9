"""The budget ledger composes every run's release, and the calculator prints its total."""

import json
import subprocess
import sys

import dp_accounting
import pytest

from tests.conftest import REPO_ROOT
from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import budget
from tff_dpmed.privacy.ledger import PrivacyLedger
from tff_dpmed.privacy.spec import DPSpec

CENTRAL = DPSpec(mode="central", noise_multiplier=1.1, num_clients=100, clients_per_round=20,
                 clip_mode="fixed", delta=1e-5)
LOCAL = DPSpec(mode="local", noise_multiplier=8.0, num_clients=100, clients_per_round=20,
               clip_mode="fixed", delta=1e-5)


def test_total_is_an_independent_rdp_composition(tmp_path):
  ledger = budget.BudgetLedger(str(tmp_path / "budget.json"))
  ledger.record("a", CENTRAL, 30, "runs/a")
  ledger.record("b", CENTRAL.with_noise(2.0), 10, "runs/b")
  ledger.record("a", CENTRAL, 40, "runs/a")  # The same run, later: replaces, not adds.
  G, P = dp_accounting.GaussianDpEvent, dp_accounting.PoissonSampledDpEvent
  expected = dp_accounting.rdp.RdpAccountant().compose(P(0.2, G(1.1)), 40).compose(
      P(0.2, G(2.0)), 10).get_epsilon(1e-5)
  total = ledger.total()
  assert total.epsilon == pytest.approx(expected, rel=1e-9)
  assert (total.entries, total.compositions) == (2, 50)


def test_mixed_relations_add_up(tmp_path):
  ledger = budget.BudgetLedger(str(tmp_path / "budget.json"))
  ledger.record("c", CENTRAL, 10, "runs/c")
  ledger.record("l", LOCAL, 5, "runs/l")
  G, P = dp_accounting.GaussianDpEvent, dp_accounting.PoissonSampledDpEvent
  central = dp_accounting.rdp.RdpAccountant().compose(P(0.2, G(1.1)), 10).get_epsilon(5e-6)
  local = dp_accounting.rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE).compose(
          G(4.0), 5).get_epsilon(5e-6)
  assert ledger.total().epsilon == pytest.approx(central + local, rel=1e-9)


def test_a_restarted_run_keeps_its_old_entry(tmp_path):
  ledger = budget.BudgetLedger(str(tmp_path / "budget.json"))
  first, second = PrivacyLedger(CENTRAL), PrivacyLedger(CENTRAL)
  assert first.ledger_id != second.ledger_id
  for run_ledger, rounds in ((first, 7), (second, 3)):
    for _ in range(rounds):
      run_ledger.record_round([1, 2])
    ledger.record(f"runs/x#{run_ledger.ledger_id}", CENTRAL,
                  budget.compositions_of(run_ledger), "runs/x")
  assert ledger.total().compositions == 10
  restored = PrivacyLedger.from_json(second.to_json())
  assert restored.ledger_id == second.ledger_id


def test_unreadable_ledger_is_refused(tmp_path):
  path = tmp_path / "budget.json"
  path.write_text("{broken")
  with pytest.raises(UsageError, match="unreadable"):
    budget.BudgetLedger(str(path))
  with pytest.raises(UsageError, match="does not exist"):
    budget.BudgetLedger(str(tmp_path / "missing" / "budget.json"))


def test_calculator_prints_the_total(tmp_path):
  path = tmp_path / "budget.json"
  ledger = budget.BudgetLedger(str(path))
  ledger.record("a", CENTRAL, 30, "runs/a")
  proc = subprocess.run([sys.executable, "-m", "tff_dpmed.privacy", f"--budget_ledger={path}"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["epsilon"] == pytest.approx(ledger.total().epsilon)
  assert out["runs"] == 1 and out["privacy_unit"] == "client"
