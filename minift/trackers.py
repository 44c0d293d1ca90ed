"""Experiment trackers: TensorBoard, MLflow and Weights & Biases behind one small interface.

    train(model, data, config=TrainConfig(output_dir="run", report_to=["tensorboard", "mlflow"]))

A tracker is any object with three methods, called on rank 0 only:

    log_config(config: dict)              once, before the first step: the resolved config
    log_metrics(metrics: dict, step: int) with every metrics.jsonl line: the same numbers,
                                          named "<event>/<key>" ("train/loss", "eval/val_loss")
    finish(summary: dict)                 once, at the end: the final report's metrics
                                          ("after/val_loss", ...); then it closes

`report_to` takes names ("tensorboard", "mlflow", "wandb") and such objects side by side.
Whoever opens a tracker finishes it: train() finishes the ones it opened from names (with
the training result as the summary); an object you pass is yours to finish, so the CLI,
which evaluates after training, opens its trackers itself and finishes them with report.json.

Each package is an optional extra (`pip install "minift[trackers]"`), imported only when
its name is used. Where they write:

- tensorboard: event files in <output_dir>/tensorboard (`tensorboard --logdir <output_dir>`).
- mlflow: the server MLFLOW_TRACKING_URI names, else a SQLite store in
  <output_dir>/mlflow/mlflow.db (MLflow 3 refuses its old plain-file store by default;
  `mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow/mlflow.db` shows it).
  Experiment: MLFLOW_EXPERIMENT_NAME or "minift".
- wandb: offline into <output_dir>/wandb (`wandb sync` uploads it later) unless you are
  logged in (WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc); WANDB_MODE overrides
  both. Project: WANDB_PROJECT or "minift".
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import netrc
import os
import time
from pathlib import Path
from urllib.parse import urlparse

METHODS = ("log_config", "log_metrics", "finish")


class Tracker:
    """A base for your own tracker: override what you need (the rest do nothing)."""

    def log_config(self, config: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


def _need(module: str, name: str):
    """Import `module` for the tracker `name`, or raise one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"report_to={name!r} needs the {name} package: "
                          f"pip install \"minift[trackers]\" (or pip install {name})") from None


# ----------------------------------------------------------------------------- values
def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record as "<event>/<key>": float ("train/loss")."""
    event = record.get("event", "train")
    return {f"{event}/{k}": float(v) for k, v in record.items()
            if k not in ("event", "step") and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def flatten(summary: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested dict, keys joined with "/" ({"after": {"f1": ..}} ->
    {"after/f1": ..}); strings, lists and None are left out."""
    out = {}
    for k, v in summary.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def config_dict(config) -> dict:
    """A dataclass config (TrainConfig) as plain JSON values; tracker objects in report_to
    become their class names. (dataclasses.asdict would deep-copy the trackers.)"""
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if "report_to" in d:
        d["report_to"] = [t if isinstance(t, str) else type(t).__name__ for t in d["report_to"]]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _plain(config: dict) -> dict[str, str | int | float | bool]:
    """Hyperparameters as the trackers take them: numbers, strings and bools kept, the rest
    (None, lists) as JSON text."""
    return {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
            for k, v in config.items()}


# ----------------------------------------------------------------------------- the three
class TensorBoard(Tracker):
    """Scalars through torch.utils.tensorboard; config and final metrics in the HParams tab."""

    def __init__(self, log_dir: Path):
        _need("tensorboard", "tensorboard")   # torch.utils.tensorboard's own error is vaguer
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.config: dict = {}
        self.step = 0

    def log_config(self, config: dict) -> None:
        self.config = _plain(config)
        text = json.dumps(config, indent=1).replace("\n", "\n    ")   # a Markdown code block
        self.writer.add_text("config", "    " + text)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.step = step

    def finish(self, summary: dict) -> None:
        from torch.utils.tensorboard.summary import hparams
        final = {f"final/{k}": v for k, v in flatten(summary).items()}
        for k, v in final.items():
            self.writer.add_scalar(k, v, self.step)
        for s in hparams(self.config, final):   # the HParams tab: config next to results
            self.writer.file_writer.add_summary(s, self.step)
        self.writer.close()


class MLflow(Tracker):
    """A run through MlflowClient (no process-wide mlflow state is touched)."""

    def __init__(self, run_dir: Path, run_name: str | None = None):
        _need("mlflow", "mlflow")
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param
        self._Metric, self._Param = Metric, Param
        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
        if not uri:
            store = Path(run_dir).resolve() / "mlflow"
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "minift")
        found = self.client.get_experiment_by_name(name)
        experiment = (found.experiment_id if found is not None
                      else self.client.create_experiment(name, artifact_location=artifacts))
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        self.step = 0

    def _metrics(self, metrics: dict, step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._Metric(k, v, now, step)
                                                    for k, v in metrics.items()])

    def log_config(self, config: dict) -> None:   # params are strings of at most 6000 chars
        params = [self._Param(k, str(v)[:6000]) for k, v in _plain(config).items()]
        for i in range(0, len(params), 100):        # log_batch takes 100 params at a time
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._metrics(metrics, step)
        self.step = step

    def finish(self, summary: dict) -> None:
        self._metrics({f"final/{k}": v for k, v in flatten(summary).items()}, self.step)
        self.client.set_terminated(self.run_id, "FINISHED")


def wandb_logged_in() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc (NETRC) for the W&B host: what
    `wandb login` leaves behind. Nothing is sent anywhere to find out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return bool(netrc.netrc(os.environ.get("NETRC")).authenticators(host or ""))
    except (OSError, netrc.NetrcParseError):   # no ~/.netrc, or one wandb did not write
        return False


class WandB(Tracker):
    """A W&B run, offline unless logged in (WANDB_MODE, when set, decides instead)."""

    def __init__(self, run_dir: Path, run_name: str | None = None):
        wandb = _need("wandb", "wandb")
        mode = None if os.environ.get("WANDB_MODE") else (
            "online" if wandb_logged_in() else "offline")
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minift"),
                              dir=str(run_dir), name=run_name, mode=mode,
                              reinit="create_new")   # several runs in one process are apart

    def log_config(self, config: dict) -> None:
        self.run.config.update(config)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in flatten(summary).items()})
        self.run.finish()


TRACKERS = ("tensorboard", "mlflow", "wandb")


# ----------------------------------------------------------------------------- report_to
def check_report_to(report_to) -> str | None:
    """None if `report_to` is a list of tracker names and objects, else what is wrong."""
    if isinstance(report_to, str) or not isinstance(report_to, (list, tuple)):
        return "must be a list of tracker names or tracker objects, e.g. ['tensorboard']"
    for t in report_to:
        if isinstance(t, str):
            if t not in TRACKERS:
                return f"has an unknown tracker {t!r}; choose from {', '.join(TRACKERS)}"
        else:
            missing = [m for m in METHODS if not callable(getattr(t, m, None))]
            if missing:
                return (f"has {type(t).__name__}, which lacks {', '.join(missing)} (a tracker "
                        f"has {', '.join(METHODS)}; subclass minift.trackers.Tracker)")
    return None


def require(report_to) -> None:
    """Import the package of each tracker name now (one line naming the extra if missing),
    e.g. before minutes of loading and evaluating."""
    for name in report_to:
        if isinstance(name, str):
            _need(name, name)


def open_trackers(report_to, run_dir: Path | None) -> tuple[list, list]:
    """(all trackers, those opened here from names): names become trackers writing under
    run_dir; objects are used as they are. Each name's package is imported now, so a
    missing one fails before training starts."""
    opened = []
    try:
        for name in [t for t in report_to if isinstance(t, str)]:
            if run_dir is None:
                raise ValueError(f"report_to={name!r} writes into the run folder: set output_dir")
            run_dir = Path(run_dir)
            opened.append(TensorBoard(run_dir / "tensorboard") if name == "tensorboard" else
                          MLflow(run_dir, run_dir.name) if name == "mlflow" else
                          WandB(run_dir, run_dir.name))
    except BaseException:
        for t in opened:   # the trackers opened so far are closed again
            t.finish({})
        raise
    it = iter(opened)
    return [t if not isinstance(t, str) else next(it) for t in report_to], opened


def finish_all(trackers: list, summary: dict) -> None:
    """finish(summary) on each tracker, in order."""
    for t in trackers:
        t.finish(summary)
