"""Tracker writes metrics.jsonl always, and a real offline wandb run we can read back."""
import json
import time
import struct
import warnings
from pathlib import Path

import pytest

from dynlm.config import LogConfig
from dynlm.tracking import Tracker, resolve_wandb_mode


@pytest.fixture(autouse=True)
def _wandb_sandbox(tmp_path, monkeypatch):
    # keep wandb's caches/config out of $HOME and never touch the network
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def read_wandb_records(path: Path):
    """Decode a .wandb file: wandb's LevelDB-style log (7-byte ':W&B' header, 32 KiB blocks,
    chunks of crc32/len16/type8) holding wandb_internal_pb2.Record protos. wandb 0.31 ships no
    Python reader (the datastore moved into wandb-core), so we parse the framing ourselves."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # zero padding / preallocated tail
            break
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):  # FULL or LAST chunk completes a record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _key(item):
    return item.key or "/".join(item.nested_key)


def _tiny_png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(0.5, 0.5), dpi=20)
    plt.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)


def test_offline_run_contains_everything(tmp_path, capsys):
    html = tmp_path / "report.html"
    html.write_text("<html><body><p>dynlm-html-marker</p></body></html>")
    png = tmp_path / "img.png"
    _tiny_png(png)
    run_dir = tmp_path / "run"
    cfg = LogConfig(wandb_mode="offline", name="t-run", group="g", tags=["unit"])
    with Tracker(cfg, run_dir, {"train": {"lr": 0.003}}, job_type="train") as t:
        assert t.run is not None
        t.log({"train/loss": 2.5}, step=1)
        t.log({"train/loss": 2.0, "train/lr": 1e-3}, step=2)
        t.log_table("eval/samples", ["id", "text"], [[1, "hello"], [2, "world"]])
        t.log_html("eval/report", html)
        t.log_image("eval/plot", png)
        t.log_line_plot("eval/curve", [1, 2, 3], {"static": [5, 4, 3], "dynamic": [5, 3, 2]}, "step", "ppl")
        t.summary({"best/valid_ppl": 42.0})

    assert "train/loss=2.5" in capsys.readouterr().out
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in lines] == [(1, 2.5), (2, 2.0)]
    assert all("time" in r for r in lines)
    assert json.loads((run_dir / "summary_metrics.json").read_text()) == {"best/valid_ppl": 42.0}

    (wb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    (wb_file,) = wb_dir.glob("run-*.wandb")
    # wandb's core process may still be flushing the file after finish() on a loaded machine
    deadline = time.monotonic() + 60
    while True:
        records = list(read_wandb_records(wb_file))
        kinds = [r.WhichOneof("record_type") for r in records]
        if (kinds and kinds[-1] == "exit") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "run" in kinds and kinds[-1] == "exit"

    run = next(r.run for r in records if r.HasField("run"))
    assert (run.display_name, run.job_type, run.run_group, list(run.tags)) == ("t-run", "train", "g", ["unit"])
    config = {_key(i): json.loads(i.value_json) for i in run.config.update}
    assert config["train"] == {"lr": 0.003}

    history = {}
    for r in records:
        if r.HasField("history"):
            items = {_key(i): json.loads(i.value_json) for i in r.history.item}
            for k, v in items.items():
                history.setdefault(k, []).append(v)
    assert history["train/loss"] == [2.5, 2.0]
    assert history["train/lr"] == [1e-3]
    media = {k.rsplit("/", 1)[0]: v[0] for k, v in history.items() if k.endswith("/path")}
    assert set(media) >= {"eval/samples", "eval/report", "eval/plot", "eval/curve_table"}

    files = wb_dir / "files"
    table = json.loads((files / media["eval/samples"]).read_text())
    assert table["columns"] == ["id", "text"] and table["data"] == [[1, "hello"], [2, "world"]]
    assert "dynlm-html-marker" in (files / media["eval/report"]).read_text()
    assert (files / media["eval/plot"]).read_bytes()[:4] == b"\x89PNG"
    curve = json.loads((files / media["eval/curve_table"]).read_text())
    assert len(curve["data"]) == 6  # 2 series x 3 points

    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    assert summary["best/valid_ppl"] == 42.0


def test_wandb_init_failure_degrades_to_jsonl(tmp_path, monkeypatch):
    import wandb

    def boom(*a, **k):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(RuntimeWarning, match="wandb init failed.*no network"):
        t = Tracker(LogConfig(wandb_mode="online"), tmp_path, {}, job_type="eval")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warnings once degraded
        t.log({"eval/ppl": 10.0}, step=0, echo=False)
        t.log_table("eval/t", ["a"], [[1]])
        t.summary({"eval/ppl": 10.0})
        t.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["eval/ppl"] == 10.0


def test_metrics_are_strict_json_lines_with_non_finite_values_as_null(tmp_path):
    """Issue 16, kind 7: a diverged loss is logged as null, not as NaN, which strict JSON readers reject."""
    with Tracker(LogConfig(wandb_mode="disabled"), tmp_path, {}, job_type="train") as t:
        t.log({"train/loss": float("nan"), "valid/ppl": float("inf"), "ok": 1.5}, step=1, echo=False)
        t.summary({"best_valid_ppl": float("inf")})

    def refuse(constant):
        raise ValueError(constant)

    [row] = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (row["train/loss"], row["valid/ppl"], row["ok"]) == (None, None, 1.5)
    assert json.loads((tmp_path / "summary_metrics.json").read_text(), parse_constant=refuse) == {"best_valid_ppl": None}


def test_disabled_tracker_writes_nothing(tmp_path):
    t = Tracker(LogConfig(wandb_mode="offline"), tmp_path / "r1", {}, job_type="train", enabled=False)
    t.log({"x": 1}, step=0)
    t.summary({"x": 1})
    t.finish()
    assert not (tmp_path / "r1").exists()


def test_wandb_mode_disabled_and_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert resolve_wandb_mode("auto") == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"
    with Tracker(LogConfig(wandb_mode="disabled"), tmp_path / "r", {}, job_type="train") as t:
        assert t.run is None
        t.log({"a": 1}, step=3, echo=False)
    assert not (tmp_path / "r" / "wandb").exists()


def finished_offline_run(run_dir: Path):
    """(records, files dir) of the one offline run under run_dir, once wandb has written its exit."""
    (wb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    (wb_file,) = wb_dir.glob("run-*.wandb")
    deadline = time.monotonic() + 60  # wandb-core may still be flushing on a loaded machine
    while True:
        records = list(read_wandb_records(wb_file))
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records, wb_dir / "files"
        time.sleep(0.5)


def test_evaluate_dashboard_in_offline_run(tmp_path, tiny_overrides):
    """A short `evaluate` logs ppl per mode, the per-article table, the improvement curve, the
    heat-map and the report figures into its offline wandb run."""
    from dynlm.cli import main

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *[f"--{o}" for o in tiny_overrides]]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--split", "valid",
                 "--modes", "static,sgd", "--out", str(out), "--log.wandb_mode=offline"]) == 0
    # tokens.parquet carries the decoded token text the heat-map shows (old columns kept)
    import pyarrow.parquet as pq
    from dynlm.data.tokenizers import load_tokenizer

    tokens = pq.read_table(out / "tokens.parquet")
    tok = load_tokenizer(run / "tokenizer")
    assert {"article_id", "position", "token", "nll_static", "nll_sgd", "text"} <= set(tokens.column_names)
    assert tokens.column("text").to_pylist() == [tok.id_to_token(i) for i in tokens.column("token").to_pylist()]

    records, files = finished_offline_run(out)
    assert records[-1].WhichOneof("record_type") == "exit"
    assert next(r.run for r in records if r.HasField("run")).job_type == "evaluate"

    history = {}
    for r in records:
        if r.HasField("history"):
            history.update({_key(i): json.loads(i.value_json) for i in r.history.item})
    summary = json.loads((out / "summary.json").read_text())["modes"]
    assert history["eval/ppl/static"] == pytest.approx(summary["static"]["ppl"])
    assert history["eval/ppl/sgd"] == pytest.approx(summary["sgd"]["ppl"])
    media = {k.rsplit("/", 1)[0]: v for k, v in history.items() if k.endswith("/path")}
    assert set(media) >= {"eval/per_article", "eval/improvement_vs_position_table", "eval/heatmap",
                          "eval/improvement", "eval/stream", "eval/histogram"}

    table = json.loads((files / media["eval/per_article"]).read_text())
    assert table["columns"][:3] == ["mode", "article_id", "title"]
    assert sorted({row[0] for row in table["data"]}) == ["sgd", "static"] and len(table["data"]) == 2 * 3
    curve = json.loads((files / media["eval/improvement_vs_position_table"]).read_text())
    n_bins = len((out / "improvement_by_position.csv").read_text().splitlines()) - 1
    assert n_bins > 0 and len(curve["data"]) == n_bins  # one series (sgd) x bins
    page = (files / media["eval/heatmap"]).read_text()
    assert page == (out / "heatmap.html").read_text() and "sgd vs static" in page
    for name in ("improvement", "stream", "histogram"):
        assert (files / media[f"eval/{name}"]).read_bytes()[:4] == b"\x89PNG"
