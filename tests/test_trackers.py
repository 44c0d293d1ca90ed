"""Trackers: what train() sends to TensorBoard, MLflow and W&B is read back with each
package's own reader and compared with metrics.jsonl; a user's object gets the same; a
missing package or a bad report_to is one clear error."""
import json
import sys
import time

import pytest

from conftest import cfg, pattern_data, tiny_model
from minift.config import TrainConfig
from minift.train import train
from minift.trackers import Tracker, flatten, scalars

pytestmark = pytest.mark.usefixtures("one_thread")


def _jsonl(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(out, report_to, steps=6):
    conf = cfg(output_dir=str(out), max_steps=steps, log_every=2, eval_every=3,
               report_to=report_to)
    result = train(tiny_model(), pattern_data(24), pattern_data(8, seed=1), conf)
    return result, _jsonl(out)


def _series(records, event, key):
    return [(r["step"], r[key]) for r in records if r["event"] == event]


def test_tensorboard_and_mlflow_read_back_the_same_losses(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path / "run"
    result, records = _run(out, ["tensorboard", "mlflow"])
    train_loss, val_loss = _series(records, "train", "loss"), _series(records, "eval", "val_loss")
    assert [s for s, _ in train_loss] == [2, 4, 6] and [s for s, _ in val_loss] == [3, 6]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    for tag, expected in (("train/loss", train_loss), ("eval/val_loss", val_loss)):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32
    final = events.Scalars("final/best_val_loss")
    assert final[0].value == pytest.approx(result.best_val_loss, rel=1e-6)
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lr": 0.003' in text

    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    run, = client.search_runs([client.get_experiment_by_name("minift").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for key, expected in (("train/loss", train_loss), ("eval/val_loss", val_loss)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == expected                                   # doubles: exact
    assert run.data.params["lr"] == "0.003" and run.data.params["max_steps"] == "6"
    assert json.loads(run.data.params["report_to"]) == ["tensorboard", "mlflow"]
    assert run.data.metrics["final/best_val_loss"] == result.best_val_loss


def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))   # not logged in: offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _, records = _run(out, ["wandb"], steps=2)
    folder, = (out / "wandb").glob("offline-run-*")
    log, = folder.glob("run-*.wandb")
    assert log.stat().st_size > 0
    # the history rows of the binary log: the same losses as metrics.jsonl. W&B's service
    # may still be writing when finish() returns: wait for the run's exit record.
    deadline = time.monotonic() + 30
    while "exit" not in (kinds := [k for k, _ in _wandb_records(log)]):
        assert time.monotonic() < deadline, kinds
        time.sleep(0.2)
    rows = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            for k, r in _wandb_records(log) if k == "history"]
    losses = [json.loads(row["train/loss"]) for row in rows if "train/loss" in row]
    assert losses == pytest.approx([r["loss"] for r in records if r["event"] == "train"]), kinds


def _wandb_records(path):
    """(kind, record) of each record in a .wandb file: W&B's 7-byte header, then LevelDB-log
    records (crc32, 2-byte length, type; 32 KiB blocks) of wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:              # a block's tail too short for a header
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4) and pos <= len(data):  # FULL, or LAST of a split record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append((record.WhichOneof("record_type"), record))
            buf = b""
    return out


class Recorder(Tracker):
    def __init__(self):
        self.config, self.metrics, self.finished = None, [], False

    def log_config(self, config):
        self.config = config

    def log_metrics(self, metrics, step):
        self.metrics.append((step, metrics))

    def finish(self, summary):
        self.finished = True


def test_a_user_tracker_gets_the_config_and_every_metrics_line(tmp_path):
    mine = Recorder()
    _, records = _run(tmp_path / "run", [mine])
    assert mine.config["lr"] == 0.003 and mine.config["report_to"] == ["Recorder"]
    assert mine.metrics == [(r["step"], scalars(r)) for r in records]
    assert not mine.finished                  # the caller's object: the caller finishes it
    json.loads((tmp_path / "run" / "run.json").read_text())   # the object is not written there


def test_a_user_tracker_works_without_an_output_dir():
    mine = Recorder()
    train(tiny_model(), pattern_data(8), config=cfg(max_steps=2, log_every=1, report_to=[mine]))
    assert [s for s, _ in mine.metrics] == [1, 2] and "train/loss" in mine.metrics[0][1]


@pytest.mark.parametrize("name, module", [("mlflow", "mlflow"), ("tensorboard", "tensorboard"),
                                          ("wandb", "wandb")])
def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)   # `import module` now raises ImportError
    with pytest.raises(ImportError) as e:
        train(tiny_model(), pattern_data(8), config=cfg(output_dir=str(tmp_path), max_steps=1,
                                                        report_to=[name]))
    assert str(e.value) == (f"report_to={name!r} needs the {name} package: "
                            f"pip install \"minift[trackers]\" (or pip install {name})")


@pytest.mark.parametrize("report_to, message", [
    ("tensorboard", "must be a list"),
    (["tensorbored"], "unknown tracker 'tensorbored'; choose from tensorboard, mlflow, wandb"),
    ([object()], "object, which lacks log_config, log_metrics, finish"),
])
def test_a_bad_report_to_names_the_field(report_to, message):
    with pytest.raises(ValueError, match="TrainConfig.report_to") as e:
        TrainConfig(report_to=report_to)
    assert message in str(e.value)


def test_a_tracker_name_needs_an_output_dir():
    with pytest.raises(ValueError, match="report_to='tensorboard' writes into the run folder"):
        train(tiny_model(), pattern_data(8), config=cfg(max_steps=1, report_to=["tensorboard"]))


def test_flatten_keeps_the_finite_numbers_of_a_nested_report():
    report = {"after": {"val_loss": 1.5, "f1": 0.25, "n": 3, "ok": True, "name": "x"},
              "before": None, "train": {"steps": 6, "seconds": float("nan")}}
    assert flatten(report) == {"after/val_loss": 1.5, "after/f1": 0.25, "after/n": 3.0,
                               "train/steps": 6.0}


def test_finetune_report_to_sends_report_json_to_the_tracker(tmp_path, capsys):
    """`minift finetune --report-to tensorboard`: the tracker's final metrics are the
    report's, after evaluation (the CLI opens and finishes it, not train())."""
    from minift.cli import main
    from minift.tasks import get_task
    (tmp_path / "val.jsonl").write_text("".join(
        get_task("params").path("validation").read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "run"
    code = main(["finetune", "--max-steps", "2", "--eval-every", "2", "--log-every", "1",
                 "--no-eval-before", "--no-forgetting", "--eval-samples", "2", "--num-samples",
                 "1", "--max-new-tokens", "4", "--val-data", str(tmp_path / "val.jsonl"),
                 "--report-to", "tensorboard", "--no-bf16", "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    report = json.loads((out / "report.json").read_text())
    final = events.Scalars("final/after/val_loss")[0].value
    assert final == pytest.approx(report["after"]["val_loss"], rel=1e-6)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert json.loads((out / "config.json").read_text())["report_to"] == ["tensorboard"]


def test_finetune_with_a_missing_tracker_fails_before_loading(tmp_path, capsys, monkeypatch):
    from minift.cli import main
    monkeypatch.setitem(sys.modules, "mlflow", None)
    code = main(["finetune", "--report-to", "mlflow", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().splitlines() == [
        "minift: error: report_to='mlflow' needs the mlflow package: "
        "pip install \"minift[trackers]\" (or pip install mlflow)"]
