"""Federated splits: exact cover, no empty client, determinism, label skew, errors."""

import numpy as np
import pytest

from tests import data_fixtures
from tff_dpmed.data import medmnist
from tff_dpmed.data import partition
from tff_dpmed.errors import UsageError


def _assert_exact_cover(parts, n):
  assert all(p.dtype == np.int64 and p.size > 0 for p in parts)
  every = np.concatenate(parts)
  assert len(every) == n
  np.testing.assert_array_equal(np.sort(every), np.arange(n))


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _mean_label_distance(parts, labels, num_classes):
  """Mean total-variation distance between each client's label mix and the global one."""
  overall = np.bincount(labels, minlength=num_classes) / len(labels)
  dists = [0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - overall).sum()
           for p in parts]
  return float(np.mean(dists))


@pytest.fixture(scope="module")
def pneumonia_labels():
  return medmnist.load_medmnist("pneumoniamnist", data_dir=data_fixtures.real_data_dir(),
                                download=False).train_labels


def test_iid_cover_sizes_and_determinism():
  parts = partition.partition_iid(103, 10, seed=4)
  _assert_exact_cover(parts, 103)
  sizes = partition.client_sizes(parts)
  assert sizes.max() - sizes.min() <= 1
  assert _same(parts, partition.partition_iid(103, 10, seed=4))
  assert not _same(parts, partition.partition_iid(103, 10, seed=5))
  _assert_exact_cover(partition.partition_iid(7, 7, seed=0), 7)
  _assert_exact_cover(partition.partition_iid(7, 1, seed=0), 7)


def test_dirichlet_cover_and_determinism(pneumonia_labels):
  parts = partition.partition_dirichlet(pneumonia_labels, 20, alpha=0.5, seed=1)
  _assert_exact_cover(parts, len(pneumonia_labels))
  assert _same(parts, partition.partition_dirichlet(pneumonia_labels, 20, 0.5, seed=1))
  assert not _same(parts, partition.partition_dirichlet(pneumonia_labels, 20, 0.5, seed=2))


def test_dirichlet_repairs_empty_clients():
  labels = np.repeat(np.arange(10), 30)
  # Tiny alpha puts each class on ~1 client, so most of 200 clients start empty.
  parts = partition.partition_dirichlet(labels, 200, alpha=0.01, seed=0)
  _assert_exact_cover(parts, 300)
  assert min(len(p) for p in parts) == 1
  parts = partition.partition_dirichlet(labels, 300, alpha=0.05, seed=3)
  assert [len(p) for p in parts] == [1] * 300


def test_dirichlet_skew_grows_as_alpha_shrinks():
  labels = np.repeat(np.arange(10), 200)
  rng_seeds = range(3)
  skew = {alpha: np.mean([_mean_label_distance(
      partition.partition_dirichlet(labels, 20, alpha, seed), labels, 10) for seed in rng_seeds])
          for alpha in (0.1, 1.0, 100.0)}
  # Measured (seeds 0-5): alpha=0.1 ~0.70, alpha=1 ~0.33, alpha=100 ~0.04, IID ~0.11.
  assert skew[0.1] > 0.6
  assert 0.2 < skew[1.0] < 0.45
  assert skew[100.0] < 0.1
  iid = _mean_label_distance(partition.partition_iid(2000, 20, 0), labels, 10)
  assert iid < 0.15 < skew[1.0]


def test_multilabel_groups():
  labels = np.array([[0, 1, 1], [0, 0, 0], [1, 0, 1], [0, 0, 1]])
  np.testing.assert_array_equal(partition.partition_groups(labels), [1, 3, 0, 2])
  np.testing.assert_array_equal(partition.partition_groups(np.array([[2], [0]])), [2, 0])
  rng = np.random.default_rng(0)
  multi = rng.integers(0, 2, (500, 14))
  parts = partition.partition_dirichlet(multi, 25, alpha=0.3, seed=0)
  _assert_exact_cover(parts, 500)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "abc"])
def test_bad_alpha(alpha):
  with pytest.raises(UsageError, match="alpha") as e:
    partition.partition_dirichlet(np.zeros(10, np.int64), 2, alpha, seed=0)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("fn", [
    lambda k: partition.partition_iid(10, k, seed=0),
    lambda k: partition.partition_dirichlet(np.arange(10) % 2, k, 1.0, seed=0),
])
def test_bad_client_counts(fn):
  with pytest.raises(UsageError, match="num_clients=10 or fewer"):
    fn(11)
  with pytest.raises(UsageError, match="at least 1"):
    fn(0)
  with pytest.raises(UsageError, match="integer"):
    fn(2.5)


def test_bad_labels():
  with pytest.raises(UsageError, match="dtype float"):
    partition.partition_dirichlet(np.zeros(10), 2, 1.0, seed=0)
  with pytest.raises(UsageError, match="-1"):
    partition.partition_dirichlet(np.array([0, 1, -1]), 2, 1.0, seed=0)
  with pytest.raises(UsageError, match="shape"):
    partition.partition_dirichlet(np.zeros((2, 2, 2), np.int64), 2, 1.0, seed=0)


# --- inputs that used to hang or traceback (issue 17) ----------------------------------------

def _run_isolated(code: str, timeout_s: float = 60.0) -> str:
  """Runs `code` in a fresh interpreter and returns its stdout.

  NumPy's Dirichlet sampler loops in C and ignores signals, so a hang cannot
  be interrupted in-process; a child can be killed. A hang fails the test.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO_ROOT  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), capture_output=True,
                        text=True, timeout=timeout_s, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


@pytest.mark.parametrize("alpha", [1e-4, 1e-10, 1e-12, 1e-300, 5e-324])
def test_vanishing_alpha_is_refused_not_sampled(alpha):
  out = _run_isolated(f"""
import numpy as np
from tff_dpmed.data import partition
from tff_dpmed.errors import UsageError
try:
  partition.partition_dirichlet(np.repeat(np.arange(3), 10), 10, {alpha!r}, seed=0)
except UsageError as e:
  print("UsageError:", e)
""")
  assert out.startswith("UsageError: Dirichlet alpha") and out.count("\n") == 1
  assert "below the smallest supported value 0.001" in out
  assert "--dirichlet_alpha=0.001" in out


def test_smallest_alpha_is_quick_and_valid():
  labels = np.repeat(np.arange(14), 50)
  out = _run_isolated("""
import numpy as np
from tff_dpmed.data import partition
parts = partition.partition_dirichlet(np.repeat(np.arange(14), 50), 500, partition.MIN_ALPHA, 0)
print(sum(len(p) for p in parts), min(len(p) for p in parts))
""", timeout_s=60)
  assert out.split() == [str(len(labels)), "1"]


@pytest.mark.parametrize("alpha", [1e7, 1e300, 1.7e308])
def test_huge_alpha_is_refused(alpha):
  # ~1e308 made the sampler return all-zero proportions: everything on one client.
  with pytest.raises(UsageError, match="above the largest supported value") as e:
    partition.partition_dirichlet(np.repeat(np.arange(3), 10), 10, alpha, seed=0)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("seed", [-1, 2.5, "1", None, True])
@pytest.mark.parametrize("fn", [
    lambda s: partition.partition_iid(10, 2, seed=s),
    lambda s: partition.partition_dirichlet(np.arange(10) % 2, 2, 1.0, seed=s),
])
def test_bad_seed(fn, seed):
  with pytest.raises(UsageError, match="seed must be a non-negative integer") as e:
    fn(seed)
  assert "\n" not in str(e.value)


def test_too_many_label_groups_is_refused_not_slow():
  labels = np.arange(200_000) * 7  # Example ids passed as labels: one class each.
  with pytest.raises(UsageError, match="200000 distinct classes") as e:
    partition.partition_dirichlet(labels, 1000, 0.5, seed=0)
  assert "\n" not in str(e.value)


def test_per_example_gives_n_clients_of_one_example_each():
  parts = partition.partition_per_example(7, 7)
  assert len(parts) == 7
  assert [p.tolist() for p in parts] == [[k] for k in range(7)]
  with pytest.raises(UsageError, match="--num_clients=7"):
    partition.partition_per_example(7, 6)
