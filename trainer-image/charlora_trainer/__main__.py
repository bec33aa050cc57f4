"""Entry point: ``python -m charlora_trainer --config FILE`` (or the JSON in $CHARLORA_TRAINING_CONFIG).

Exit codes: 0 done; 3 bad input (dataset, base model, config: the Job fails at once, without retries); anything else
is a failure worth a retry (the resume state makes a retry continue where the last pod stopped).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

from pydantic import ValidationError

from charlora.api.trainingjob import CONFIG_ENV, TrainingJobConfig
from charlora.storing import S3Settings
from charlora_trainer.failing import FAILURE_EXIT_CODE, BadInput, report_bad_input, report_failure
from charlora_trainer.recipe import LoRARecipe

WORKDIR_ENV = "CHARLORA_WORKDIR"


def load_config(path: Path | None, env: dict[str, str]) -> TrainingJobConfig:
    if path is not None:
        try:
            text = path.read_text()
        except OSError as err:
            raise BadInput(f"Could not read the training config {path}: {err.strerror}") from err
    elif env.get(CONFIG_ENV):
        text = env[CONFIG_ENV]
    else:
        raise BadInput(f"No training config: pass --config FILE or set ${CONFIG_ENV}")
    try:
        return TrainingJobConfig.model_validate_json(text)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in err.errors())
        raise BadInput(f"Invalid training config: {problems}") from err


def default_workdir(env: dict[str, str]) -> Path:
    """$CHARLORA_WORKDIR, else charlora-trainer/ under $TMPDIR (created: the Job points it into its scratch volume
    on a read-only root filesystem), else under the system's temporary directory."""
    if env.get(WORKDIR_ENV):
        return Path(env[WORKDIR_ENV])
    if env.get("TMPDIR"):
        Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
        return Path(env["TMPDIR"]) / "charlora-trainer"
    return Path(tempfile.gettempdir()) / "charlora-trainer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="charlora-trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help=f"TrainingJobConfig JSON file (default: ${CONFIG_ENV})")
    parser.add_argument("--workdir", type=Path, help=f"Scratch directory (default: ${WORKDIR_ENV} or a temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or default_workdir(dict(os.environ))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        config = load_config(args.config, dict(os.environ))
        recipe = LoRARecipe(config, workdir=workdir, settings=S3Settings.from_env())
        if recipe.already_published():
            print(f"{config.output_uri} already holds a manifest: nothing to do", file=sys.stderr)
            return 0
        recipe.setup()
        recipe.train()
        recipe.save()
    except BadInput as err:
        return report_bad_input(str(err))
    except Exception as err:  # noqa: BLE001 - the last line of defence: report and exit non-zero
        # Worth a retry (the Job's backoff; the resume state keeps the progress): the trace for the log, one line
        # for the pod's termination message, which the operator shows as the version's failure reason.
        traceback.print_exc()
        report_failure(f"Training failed: {type(err).__name__}: {err}")
        return FAILURE_EXIT_CODE
    if recipe.is_main:
        print(f"Trained {config.namespace}/{config.character} {config.version}: {config.output_uri}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
