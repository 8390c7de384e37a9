"""Re-exports a finished run's model for TF Serving.

  python -m tff_dpmed.export --run_dir=runs/<experiment_name>

Training already exports at its end; this writes one more version (e.g. after
changing the export code) into <run_dir>/saved_model/<model_name>/<version>
and refreshes <run_dir>/saved_model/models.config. Prints the version folder.
"""

import json
import os

from absl import flags

from tff_dpmed import cli
from tff_dpmed.errors import UsageError
# Imports TensorFlow before absl's app.run: with TF 2.14 a first import inside
# main leaves tf.executing_eagerly() True while Keras builds functional
# models, and Flatten then fails on the unknown batch size.
from tff_dpmed.program import artifacts
from tff_dpmed.serving import export

_RUN_DIR = flags.DEFINE_string("run_dir", None,
                               "Folder of a finished training run (required).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; use --run_dir")
  if not _RUN_DIR.value:
    raise UsageError("--run_dir is required: the folder of a finished run")
  if not os.path.isdir(_RUN_DIR.value):
    raise UsageError(f"--run_dir {_RUN_DIR.value} is not a folder")
  try:
    keras_model, info, metadata = artifacts.load_trained_model(_RUN_DIR.value)
  except json.JSONDecodeError as e:
    raise UsageError(f"{_RUN_DIR.value}/summary.json is not valid JSON ({e}): "
                     "the run did not finish cleanly") from None
  except ValueError as e:
    # Keras appends every weight array to its message; the first part suffices.
    reason = " ".join(str(e).split(" Provided weights")[0].split())
    raise UsageError(
        f"cannot load the final weights of {_RUN_DIR.value} into the model as "
        f"this code builds it ({reason}): the model code has changed since the "
        "run was trained, so re-export it with the code it was trained with; "
        "the versions it already exported still serve") from None
  model_name = metadata.get("model_name")
  if not model_name:
    raise UsageError(f"{_RUN_DIR.value} does not record a model_name to export "
                     "under; was it written by this version of tff_dpmed.train?")
  path = export.export_saved_model(
      keras_model, info, os.path.join(_RUN_DIR.value, "saved_model"),
      model_name, metadata)
  print(path)


def run() -> None:
  cli.run(main)


if __name__ == "__main__":
  run()
