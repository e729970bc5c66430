"""One tracking layer for every command: stdout + run_dir/metrics.jsonl always, wandb when it works.

wandb is strictly optional: any failure (not installed, init error, network, auth) turns into one
warning and the run carries on with the local logs, so a broken tracker never kills a training run.
"""
from __future__ import annotations

import math
import netrc
import os
import time
import warnings
from pathlib import Path

from .textio import dumps, read_json, read_text, write_json


def resolve_wandb_mode(mode: str) -> str:
    """'auto' -> 'online' only when credentials exist, else 'offline' (never blocks on a login prompt)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _jsonable(v):
    """Tensors / numpy scalars -> python numbers so json.dumps never fails mid-run."""
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            pass
    return v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v)


class Tracker:
    def __init__(self, log_cfg, run_dir, config: dict, job_type: str, enabled: bool = True):
        self.enabled = enabled  # False on rank != 0: every method is a no-op
        self.run_dir = Path(run_dir)
        self.run = None
        self._wandb = None
        self._jsonl = None
        self._t0 = time.time()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        mode = resolve_wandb_mode(getattr(log_cfg, "wandb_mode", "auto"))
        if mode == "disabled":
            return
        try:
            os.environ.setdefault("WANDB_SILENT", "true")  # keep stdout readable
            import wandb

            self._wandb = wandb
            self.run = wandb.init(
                mode=mode,
                dir=str(self.run_dir),
                project=log_cfg.project or None,
                entity=log_cfg.entity or None,
                name=log_cfg.name or None,
                group=log_cfg.group or None,
                tags=list(log_cfg.tags) or None,
                job_type=job_type,
                config=config,
                reinit="create_new",  # several trackers in one process (tests, sweeps) must not clash
                settings=wandb.Settings(silent=True, console="off"),  # we print our own lines
            )
        except Exception as e:  # noqa: BLE001 - any wandb failure must degrade, not crash
            self._wandb_failed("init", e)

    def _wandb_failed(self, what: str, e: Exception) -> None:
        warnings.warn(f"wandb {what} failed ({type(e).__name__}: {e}); logging to stdout and "
                      f"{self.run_dir / 'metrics.jsonl'} only", RuntimeWarning, stacklevel=3)
        self.run = None

    def _call(self, what: str, fn):
        """Run a wandb call; on failure warn once and stop using wandb."""
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self._wandb_failed(what, e)

    # --- scalars -------------------------------------------------------------------------------
    def log(self, metrics: dict, step: int | None = None, echo: bool = True) -> None:
        if not self.enabled:
            return
        metrics = {k: _jsonable(v) for k, v in metrics.items()}
        rec = {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
        self._jsonl.write(dumps(rec) + "\n")  # strict JSON: a NaN/inf loss is null
        self._jsonl.flush()  # a crashed run still leaves its curve behind
        if echo:
            head = f"[step {step}] " if step is not None else ""
            print(head + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()), flush=True)
        self._call("log", lambda: self.run.log(metrics, step=step))

    # --- rich media (wandb only; callers keep their own files in run_dir) ----------------------
    def log_table(self, key: str, columns: list, rows: list) -> None:
        if self.enabled:
            self._call("log_table", lambda: self.run.log(
                {key: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])}))

    def log_html(self, key: str, path) -> None:
        if self.enabled:
            self._call("log_html", lambda: self.run.log(
                {key: self._wandb.Html(read_text(path), inject=False, data_is_not_path=True)}))

    def log_image(self, key: str, path) -> None:
        if self.enabled:
            self._call("log_image", lambda: self.run.log({key: self._wandb.Image(str(path))}))

    def log_line_plot(self, key: str, xs: list, ys_by_name: dict, xname: str = "x", title: str = "") -> None:
        if self.enabled:
            self._call("log_line_plot", lambda: self.run.log({key: self._wandb.plot.line_series(
                xs=list(xs), ys=[list(v) for v in ys_by_name.values()], keys=list(ys_by_name),
                title=title or key, xname=xname)}))

    def summary(self, d: dict) -> None:
        if not self.enabled:
            return
        d = {k: _jsonable(v) for k, v in d.items()}
        f = self.run_dir / "summary_metrics.json"
        old = read_json(f) if f.exists() else {}
        write_json(f, {**old, **d})  # strict JSON: a non-finite value (no validation yet: inf) is null
        self._call("summary", lambda: self.run.summary.update(d))

    def finish(self, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        self._call("finish", lambda: self.run.finish(exit_code=exit_code))
        self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type else 0)
