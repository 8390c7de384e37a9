"""Flags every benchmark shares (defined once: run_all imports all the benchmarks)."""

from absl import flags

DATA_DIR = flags.DEFINE_string(
    "data_dir", None,
    "Folder of MedMNIST .npz files (default: $TFF_DPMED_DATA_DIR, else the download cache).")
REPETITIONS = flags.DEFINE_integer(
    "repetitions", 3, "Repetitions of every measurement; median and min-max are reported.")
QUICK = flags.DEFINE_boolean(
    "quick", False, "Tiny sizes and one repetition: a smoke run, not a measurement.")
OUTPUT = flags.DEFINE_string(
    "output", None, "Where to write the report, raw JSON beside it (default: the benchmark's "
    "own file, e.g. benchmarks/RESULTS.md for run_all).")
