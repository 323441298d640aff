"""Search LoRA rank, LoRA alpha and learning rate: `python main.py parameter_search ...`.

Every configuration is trained with K-fold cross-validation (`train.run_training`) and scored on the
validation subsets only (mean over folds of `--search_metric`); the test folds are never looked at, so
the search does not leak into the final performance estimate. Takes every option of `train` plus the
search options. Default: the full grid (Optuna `GridSampler`); `--sampler tpe --n_trials N` samples N
configurations of the same categorical space with TPE instead. `--pruner median` stops configurations
whose per-epoch validation score falls below the median of earlier ones at the same step.

Bookkeeping lives in an Optuna study in a database (`--storage`, default `sqlite:///<output_dir>/study.db`),
so an interrupted search resumes where it stopped and several processes (one per GPU) or machines
(`--storage postgresql://...`) can work on one study at the same time. Guarantees: every grid point ends
COMPLETE (or PRUNED) exactly once, and no two workers train the same point:

- Claiming. A trial whose parameters already belong to a lower-numbered COMPLETE, PRUNED, RUNNING or
  WAITING trial is a duplicate: it is closed at once as PRUNED with the user attribute `duplicate_of`
  (nothing is trained, no folder is made). Trial numbers are unique, so of two workers racing for one point
  exactly the lower-numbered trial trains it.
- Crashed workers. Every running trial records its machine and process id and sends heartbeats. A RUNNING
  trial of a process that no longer exists on this machine is failed on start-up; one from another machine
  is failed when its heartbeat is older than `--grace_period`. A failed point (crash, interrupt or error)
  is queued again as a WAITING trial that reuses the folder of the first attempt (training resumes from
  its last checkpoint there). A worker whose trial another worker failed while it was only slow logs a
  warning and goes on (`Objective.taken_over`).

Outputs in `--output_dir`: `trials/<number>_r<rank>_a<alpha>_lr<lr>/` (one training output folder per
configuration), `results.csv` / `results.md` (best first: mean ± sd over folds of every validation
metric, trainable parameters, time), `best_config.json` (the training config of the best configuration),
`score_vs_rank.png`, `search_config.json`; with `--train_best`, `best_model/`: the best configuration
trained on the full cross-validation with test-fold evaluation. See docs/parameter_search.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import utils
from utils import UserError

log = logging.getLogger(__name__)

SEARCH_PARAMS = ("lora_rank", "lora_alpha", "learning_rate")
# Config keys that may differ between workers of one study (paths and machine settings).
MACHINE_KEYS = ("output_dir", "data_dir", "pretrained", "device", "num_workers", "resume", "compile")
STATES_DONE = ("COMPLETE", "PRUNED")
LOWER_IS_BETTER = ("loss",)

TrainFn = Callable[..., dict]


# ----------------------------------------------------------------------------------------------
# Search space and options
# ----------------------------------------------------------------------------------------------
def _positive(values: list, option: str) -> list:
    if not values:
        raise UserError(f"{option}: give at least one value")
    for v in values:
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise UserError(f"{option} {v}: values must be positive numbers")
    if len(set(values)) != len(values):
        raise UserError(f"{option}: a value is listed twice")
    return values


def _ranks(values: list) -> list:
    """LoRA ranks: 0 (no LoRA: the head alone, or the whole encoder without --train_only_lora) or positive,
    with `train --lora_rank`'s rule and message."""
    import train

    if not values:
        raise UserError("--lora_ranks: give at least one value")
    for v in values:
        if v < 0:
            raise UserError(f"--lora_ranks {v}: {train.LORA_RANK_RULE}")
    if len(set(values)) != len(values):
        raise UserError("--lora_ranks: a value is listed twice")
    return values


def search_space(ranks: str | Sequence, alphas: str | Sequence, lrs: str | Sequence) -> dict[str, list]:
    """{"lora_rank": [int], "lora_alpha": [float], "learning_rate": [float]} from comma-separated lists."""
    return {
        "lora_rank": _ranks(utils.parse_list(ranks, int, "--lora_ranks")),
        "lora_alpha": _positive(utils.parse_list(alphas, float, "--lora_alphas"), "--lora_alphas"),
        "learning_rate": _positive(utils.parse_list(lrs, float, "--learning_rates"), "--learning_rates"),
    }


def grid_points(space: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    """Every distinct configuration of the space, in the order of the lists (rank slowest). Rank 0 (no LoRA)
    has no alpha to vary: it appears once per learning rate, with the first alpha."""
    points = [{}]
    for name in SEARCH_PARAMS:
        points = [dict(p, **{name: v}) for p in points for v in space[name]]
    seen: set[tuple] = set()
    distinct = []
    for p in points:
        if _key(p) not in seen:
            seen.add(_key(p))
            distinct.append(p)
    return distinct


def _key(params: Mapping[str, Any]) -> tuple:
    """The configuration a point trains: LoRA alpha means nothing at rank 0 (no adapters), so rank-0 points
    that differ only in alpha are one configuration (trained once; the others are skipped as duplicates)."""
    rank = int(params["lora_rank"])
    return (rank, float(params["lora_alpha"]) if rank > 0 else 0.0, float(params["learning_rate"]))


def _fmt(value: float) -> str:
    return f"{value:g}"


def trial_folder_name(number: int, params: Mapping[str, Any]) -> str:
    """`<number>_r<rank>_a<alpha>_lr<lr>`, e.g. `3_r8_a16_lr0.0003`."""
    return (f"{number}_r{int(params['lora_rank'])}_a{_fmt(float(params['lora_alpha']))}"
            f"_lr{_fmt(float(params['learning_rate']))}")


def claim_trial_folder(output_dir: Path, number: int, params: Mapping[str, Any]) -> str:
    """Create and return a new, empty trial folder `trials/<trial_folder_name>` (relative to `output_dir`).
    A folder of that name left by another study in the same output folder (another --study_name, or
    different training options) gets a `_2`, `_3`, ... suffix instead of being resumed: resuming it
    would report that study's results for this configuration."""
    name = trial_folder_name(number, params)
    (output_dir / "trials").mkdir(parents=True, exist_ok=True)
    folder, k = Path("trials") / name, 1
    while True:
        try:
            (output_dir / folder).mkdir()  # atomic: two workers never claim the same folder
            return str(folder)
        except FileExistsError:
            k += 1
            folder = Path("trials") / f"{name}_{k}"


def direction_of(metric: str) -> str:
    return "minimize" if any(word in metric.lower() for word in LOWER_IS_BETTER) else "maximize"


def default_study_name(output_dir: str | os.PathLike) -> str:
    return f"nuclei-lora-search-{Path(output_dir).resolve().name}"


def default_storage(output_dir: str | os.PathLike) -> str:
    return f"sqlite:///{(Path(output_dir).resolve() / 'study.db').as_posix()}"


# ----------------------------------------------------------------------------------------------
# Process identity (to recognise trials of crashed workers on this machine)
# ----------------------------------------------------------------------------------------------
def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.readline().strip()
    except OSError:
        return ""


def machine_id() -> str:
    """Host name + boot id + PID namespace: two processes with the same machine id can see each
    other's process ids (containers on one host get different PID namespaces)."""
    parts = [socket.gethostname(), _read_first_line("/proc/sys/kernel/random/boot_id")]
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "|".join(parts)


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    if os.name == "posix":  # a zombie (killed child not yet reaped) is dead for our purpose
        stat = _read_first_line(f"/proc/{pid}/stat")
        if stat and stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Study
# ----------------------------------------------------------------------------------------------
def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in MACHINE_KEYS and k not in SEARCH_PARAMS}


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's GridSampler without its `after_trial` hook, which stops the study when it thinks the grid
        is exhausted: it fails on queued retries (no grid id) and raises when a trial is told outside
        `optimize` (e.g. when a dead worker's trial is failed). `run_search` decides when to stop."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return GridSampler


def _GridSampler(space: Mapping[str, list], seed: int = 0):
    return _grid_sampler_class()(space, seed=seed)


def open_study(storage_url: str, study_name: str, space: Mapping[str, list], metric: str, sampler_name: str,
               base_config: Mapping[str, Any], pruner_name: str = "none", seed: int = 0,
               heartbeat_interval: int = 60, grace_period: int | None = None,
               pruner_warmup_steps: int = 5, pruner_startup_trials: int = 4):
    """Create or load the study; refuse one made for a different search (space, metric or training
    settings) so results are never mixed."""
    import optuna

    kwargs: dict[str, Any] = {}
    if storage_url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
        path = storage_url.split(":///", 1)[-1]
        if path and path != ":memory:":
            utils.make_output_dir(Path(path).parent, "--storage")
    for attempt in range(5):  # workers starting together may race to create the tables of a new database
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    storage_url, heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period or 3 * heartbeat_interval,
                    heartbeat_stale_trial_callback=requeue_failed_trial, **kwargs)
            break
        except ImportError as e:
            raise UserError(f"--storage {storage_url}: database driver missing ({e})") from None
        except Exception as e:  # bad URL, unreachable server, or a table-creation race
            if attempt == 4:
                raise UserError(f"--storage {storage_url}: cannot open ({type(e).__name__}: {e})") from None
            time.sleep(0.5 + attempt)

    if sampler_name == "grid":
        sampler = _GridSampler(space, seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    if pruner_name == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials,
                                             n_warmup_steps=pruner_warmup_steps)
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, pruner=pruner,
                                direction=direction_of(metric), load_if_exists=True)
    signature = {"space": {k: list(v) for k, v in space.items()}, "metric": metric,
                 "config": _comparable(base_config)}
    signature = _jsonable(signature)
    existing = study.user_attrs.get("search")
    if existing is None:
        study.set_user_attr("search", signature)
    elif existing != signature:
        diff = [k for k in ("space", "metric") if existing.get(k) != signature[k]]
        diff += [f"config.{k}" for k in sorted(set(existing["config"]) | set(signature["config"]))
                 if existing["config"].get(k) != signature["config"].get(k)]
        raise UserError(f"--study_name {study_name}: the study in {storage_url} was made for a different "
                        f"search (differs in {', '.join(diff[:6])}); use the same options, another "
                        f"--study_name or another --output_dir")
    return study


def _trial_dir_of(trial) -> str | None:
    return trial.user_attrs.get("trial_dir")


def requeue_failed_trial(study, trial) -> None:
    """Queue a failed trial's configuration again (a WAITING trial with the same parameters and sampler
    attributes), remembering its folder so the retry resumes the training there. Called for stale trials by
    the storage's heartbeat check, by `reap_dead_trials` and by `requeue_open_points`."""
    import optuna

    user_attrs = {"retry_of": trial.number}
    if _trial_dir_of(trial):
        user_attrs["trial_dir"] = _trial_dir_of(trial)
    system_attrs = {k: v for k, v in trial.system_attrs.items() if k in ("grid_id", "search_space")}
    system_attrs["fixed_params"] = dict(trial.params)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params=dict(trial.params),
                                              distributions=dict(trial.distributions), user_attrs=user_attrs,
                                              system_attrs=system_attrs))
    log.info("configuration %s of failed trial %d queued again", dict(trial.params), trial.number)


def reap_dead_trials(study) -> int:
    """Fail RUNNING trials whose process on this machine is gone, and queue their points again."""
    import optuna

    me = machine_id()
    count = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # "machine" is the last of a trial's identity attributes to be written: a trial that has it has its pid
        if t.user_attrs.get("machine") != me or "pid" not in t.user_attrs or _process_alive(int(t.user_attrs["pid"])):
            continue
        try:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        except Exception:  # another worker got there first
            continue
        log.warning("trial %d (%s) was left RUNNING by process %s, which no longer exists: marked FAIL",
                    t.number, dict(t.params), t.user_attrs.get("pid"))
        requeue_failed_trial(study, t)
        count += 1
    return count


def _owner_states():
    import optuna

    S = optuna.trial.TrialState
    return (S.COMPLETE, S.PRUNED, S.RUNNING, S.WAITING)


def point_status(study, points: Sequence[Mapping[str, Any]]) -> dict[tuple, str]:
    """For every point: 'done' (COMPLETE/PRUNED), 'running', 'waiting' or 'open' (never finished, e.g.
    failed: it must be run again)."""
    rank = {"open": 0, "waiting": 1, "running": 2, "done": 3}
    status = {_key(p): "open" for p in points}
    for t in study.get_trials(deepcopy=False, states=_owner_states()):
        if t.user_attrs.get("duplicate_of") is not None or not all(k in t.params for k in SEARCH_PARAMS):
            continue
        key = _key(t.params)
        if key not in status:
            continue
        s = {"COMPLETE": "done", "PRUNED": "done", "RUNNING": "running", "WAITING": "waiting"}[t.state.name]
        if rank[s] > rank[status[key]]:
            status[key] = s
    return status


def requeue_open_points(study, points: Sequence[Mapping[str, Any]]) -> int:
    """Queue every grid point that has only FAILED trials (a worker error or interrupt). A point with no
    trial at all is left to the sampler. Each queued trial resumes in the folder of the failed one."""
    import optuna

    failed: dict[tuple, Any] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if all(k in t.params for k in SEARCH_PARAMS):
            failed.setdefault(_key(t.params), t)
    status = point_status(study, points)
    count = 0
    for key, t in failed.items():
        if status.get(key) == "open":
            requeue_failed_trial(study, t)
            count += 1
    return count


def _owner(study, trial_number: int, params: Mapping[str, Any]) -> int | None:
    """Number of a lower-numbered trial that owns these parameters, or None if this trial owns them."""
    key = _key(params)
    for t in study.get_trials(deepcopy=False, states=_owner_states()):
        if t.number >= trial_number or t.user_attrs.get("duplicate_of") is not None:
            continue
        if all(k in t.params for k in SEARCH_PARAMS) and _key(t.params) == key:
            return t.number
    return None


# ----------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------
def _score(values: Mapping[str, Any] | None, metric: str) -> float:
    if not values or metric not in values:
        raise UserError(f"--search_metric {metric}: not among the validation metrics "
                        f"({', '.join(sorted(values or {}))})")
    return float(values[metric])


class Objective:
    """Trains one configuration with K-fold CV and returns its mean validation score."""

    def __init__(self, base_config: Mapping[str, Any], space: Mapping[str, list], output_dir: Path,
                 metric: str, train_fn: TrainFn, prune: bool) -> None:
        self.base_config = dict(base_config)
        self.space = space
        self.output_dir = output_dir
        self.metric = metric
        self.train_fn = train_fn
        self.prune = prune
        self.trained = 0
        self.duplicates = 0
        self.last_trial: Any = None  # the trial of the last call, and how that call ended
        self.last_outcome = ""

    def __call__(self, trial) -> float:
        import optuna

        self.last_trial, self.last_outcome = trial, "running"
        try:
            score = self._train(trial)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed the trial (see `taken_over`)
            self.last_outcome = "taken over"
            raise
        except BaseException:
            self.last_outcome = "raised"
            raise
        if _state_of(trial) == optuna.trial.TrialState.FAIL:  # checked here, as Optuna fails on it (see below)
            self.last_outcome = "taken over"
            raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} was failed by another worker")
        self.last_outcome = "returned"
        return score

    def taken_over(self) -> bool:
        """Whether the last trial was marked FAIL by someone else while this worker was still training it:
        another worker's heartbeat check found its heartbeat older than the grace period (an overloaded
        machine) and queued its configuration again. Optuna then refuses this worker's result ("Cannot tell a
        FAIL trial"; when that happens after the objective returned, Optuna 5.1 then fails its own assertion
        "Should not reach") or the objective's writes to the trial."""
        import optuna

        if self.last_trial is None or self.last_outcome not in ("returned", "taken over"):
            return False
        return _state_of(self.last_trial) == optuna.trial.TrialState.FAIL

    def _train(self, trial) -> float:
        import optuna

        params = {name: trial.suggest_categorical(name, list(self.space[name])) for name in SEARCH_PARAMS}
        owner = _owner(trial.study, trial.number, params)
        if owner is not None:
            trial.set_user_attr("duplicate_of", owner)
            self.duplicates += 1
            log.info("trial %d: configuration %s already taken by trial %d; skipped", trial.number, params, owner)
            raise optuna.TrialPruned(f"duplicate of trial {owner}")
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("machine", machine_id())  # last: `reap_dead_trials` reads the pid only after it
        folder = trial.user_attrs.get("trial_dir")  # a retry resumes the failed trial's folder
        if folder is None:
            folder = claim_trial_folder(self.output_dir, trial.number, params)
        trial.set_user_attr("trial_dir", folder)
        trial_dir = self.output_dir / folder
        resume = (trial_dir / "config.json").is_file() or any(trial_dir.glob("**/*.pth"))
        config = dict(self.base_config, **params, output_dir=str(trial_dir), resume=bool(resume),
                      cross_validation=True)
        trial_dir.mkdir(parents=True, exist_ok=True)
        log.info("trial %d: %s -> %s%s", trial.number, params, trial_dir, " (resuming)" if resume else "")

        epochs = int(config.get("epochs", 1))
        fold_order: dict[Any, int] = {}

        def epoch_callback(fold: Any, epoch: int, val_metrics: Mapping[str, Any]) -> None:
            if self.metric not in val_metrics:
                return
            index = fold_order.setdefault(fold, len(fold_order))
            step = index * epochs + int(epoch)
            trial.report(float(val_metrics[self.metric]), step)
            if self.prune and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at fold {fold} epoch {epoch}")

        start = time.time()
        result = self.train_fn(config, trial_dir, epoch_callback=epoch_callback, evaluate_test=False)
        self.trained += 1
        score = _score(result.get("val_mean"), self.metric)
        trial.set_user_attr("config", _jsonable(config))
        trial.set_user_attr("val_mean", _jsonable(result.get("val_mean") or {}))
        trial.set_user_attr("val_sd", _jsonable(result.get("val_sd") or {}))
        trial.set_user_attr("params_count", _jsonable(result.get("params") or {}))
        trial.set_user_attr("best_epochs", [f.get("best_epoch") for f in result.get("folds", [])])
        trial.set_user_attr("seconds", float(result.get("seconds") or (time.time() - start)))
        if not math.isfinite(score):
            raise optuna.TrialPruned(f"{self.metric} is not finite ({score})")
        return score


def _state_of(trial):
    """The trial's state in the storage now (another worker may have changed it)."""
    return next((t.state for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number), None)


def _jsonable(obj: Any) -> Any:
    """A plain-JSON copy (numpy scalars/arrays and paths converted) for Optuna's attribute storage."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
def completed_results(study, metric: str) -> list[dict[str, Any]]:
    """One row per COMPLETE configuration, best first (ties: lower trial number first)."""
    import optuna

    rows: dict[tuple, dict[str, Any]] = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                    key=lambda t: t.number):
        if not all(k in t.params for k in SEARCH_PARAMS) or t.value is None:
            continue
        key = _key(t.params)
        if key in rows:
            log.warning("configuration %s completed twice (trials %d and %d); keeping the first",
                        dict(t.params), rows[key]["trial"], t.number)
            continue
        counts = t.user_attrs.get("params_count") or {}
        row: dict[str, Any] = {
            "trial": t.number, "lora_rank": int(t.params["lora_rank"]),
            "lora_alpha": float(t.params["lora_alpha"]), "learning_rate": float(t.params["learning_rate"]),
            "score": float(t.value),
        }
        means, sds = t.user_attrs.get("val_mean") or {}, t.user_attrs.get("val_sd") or {}
        for name in sorted(means, key=lambda n: (n != metric, n)):
            if isinstance(means[name], (int, float)):
                row[f"{name}_mean"] = float(means[name])
                sd = sds.get(name)
                row[f"{name}_sd"] = float(sd) if isinstance(sd, (int, float)) else float("nan")
        row.update({"trainable_params": counts.get("trainable"), "total_params": counts.get("total"),
                    "trainable_percent": counts.get("percent"), "head_params": counts.get("head"),
                    "best_epochs": " ".join(str(e) for e in t.user_attrs.get("best_epochs") or []),
                    "seconds": t.user_attrs.get("seconds"), "trial_dir": t.user_attrs.get("trial_dir", "")})
        rows[key] = row
    sign = -1.0 if direction_of(metric) == "maximize" else 1.0
    return sorted(rows.values(), key=lambda r: (sign * r["score"] if math.isfinite(r["score"]) else math.inf,
                                                r["trial"]))


def _pm(mean: Any, sd: Any, digits: int = 4) -> str:
    if not isinstance(mean, (int, float)) or not math.isfinite(mean):
        return "—"
    if isinstance(sd, (int, float)) and math.isfinite(sd):
        return f"{mean:.{digits}f} ± {sd:.{digits}f}"
    return f"{mean:.{digits}f}"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def results_markdown(rows: Sequence[Mapping[str, Any]], metric: str, counts: Mapping[str, int],
                     base_config: Mapping[str, Any]) -> str:
    metrics = [k[:-5] for k in (rows[0] if rows else {}) if k.endswith("_mean")]
    lines = [
        "# LoRA parameter search",
        "",
        f"Score: validation **{metric}** ({direction_of(metric)}), mean ± sd over "
        f"{base_config.get('num_folds', '?')} cross-validation folds; test folds not used. "
        f"Epochs: {base_config.get('epochs', '?')}, input size: {base_config.get('input_size', '?')}.",
        "",
        "Trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".",
        "",
    ]
    header = ["#", "trial", "rank", "alpha", "lr"] + metrics + ["trainable params", "time"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows, 1):
        trainable = r.get("trainable_params")
        alpha = _fmt(r["lora_alpha"]) if r["lora_rank"] else "—"  # rank 0: no adapters, alpha unused
        cells = [str(i), str(r["trial"]), str(r["lora_rank"]), alpha, _fmt(r["learning_rate"])]
        cells += [_pm(r.get(f"{m}_mean"), r.get(f"{m}_sd")) for m in metrics]
        cells += [f"{trainable:,}" if isinstance(trainable, int) else "—", _duration(r.get("seconds"))]
        if i == 1:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("\nNo configuration has completed yet.")
    return "\n".join(lines) + "\n"


def plot_score_vs_rank(rows: Sequence[Mapping[str, Any]], metric: str, path: Path) -> Path | None:
    """Validation score (mean ± sd over folds) against LoRA rank, one line per (alpha, learning rate)."""
    if not rows:
        return None
    import visualize

    fig = visualize.new_figure(7.5, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["lora_alpha"], r["learning_rate"]), []).append(r)
    for (alpha, lr), members in sorted(groups.items()):
        members = sorted(members, key=lambda r: r["lora_rank"])
        x = [r["lora_rank"] for r in members]
        y = [r.get(f"{metric}_mean", r["score"]) for r in members]
        err = [r.get(f"{metric}_sd", float("nan")) for r in members]
        err = [0.0 if not math.isfinite(e) else e for e in err]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"alpha {_fmt(alpha)}, lr {_fmt(lr)}")
    ranks = sorted({r["lora_rank"] for r in rows})
    if ranks[0] == 0:  # rank 0 (no LoRA) on a log axis: linear between 0 and 1
        ax.set_xscale("symlog", base=2, linthresh=1)
    else:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.minorticks_off()
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel(f"validation {metric} (mean ± sd over folds)")
    ax.set_title("Parameter search")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(groups) > 6 else 1, loc="best")
    fig.tight_layout()
    return visualize.save_figure(fig, path, dpi=110)


def trial_counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        name = t.state.name.lower()
        if t.user_attrs.get("duplicate_of") is not None:
            name = "skipped duplicates"
        counts[name] = counts.get(name, 0) + 1
    return counts


def write_results(study, metric: str, output_dir: Path, base_config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rebuild results.csv, results.md, best_config.json and score_vs_rank.png from the study."""
    rows = completed_results(study, metric)
    utils.write_csv(output_dir / "results.csv", rows)
    utils.atomic_write_text(output_dir / "results.md",
                            results_markdown(rows, metric, trial_counts(study), base_config))
    if rows:
        best = next(t for t in study.get_trials(deepcopy=False) if t.number == rows[0]["trial"])
        utils.write_json(output_dir / "best_config.json", best.user_attrs.get("config") or {})
    plot_score_vs_rank(rows, metric, output_dir / "score_vs_rank.png")
    return rows


# ----------------------------------------------------------------------------------------------
# Worker
# ----------------------------------------------------------------------------------------------
def run_search(base_config: Mapping[str, Any], space: Mapping[str, list], output_dir: str | os.PathLike, *,
               metric: str, sampler: str = "grid", n_trials: int | None = None, pruner: str = "none",
               storage: str | None = None, study_name: str | None = None, seed: int = 0,
               heartbeat_interval: int = 60, grace_period: int | None = None, pruner_warmup_epochs: int = 5,
               pruner_startup_trials: int = 4, train_fn: TrainFn | None = None) -> dict[str, Any]:
    """One worker of the search: trains configurations until the grid (or `n_trials` for TPE) is done or
    every remaining point is being trained by another worker, then rebuilds the result files.
    Returns {"rows", "trained", "duplicates", "finished", "study_name", "storage"}."""
    import optuna

    if train_fn is None:
        import train

        train_fn = train.run_training
    # every check before anything is created: no study.db or empty folder is left by a refused search
    check_sampler_options(sampler, n_trials)
    if storage is not None:
        check_storage_url(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    open_args = (space, metric, sampler, base_config, pruner, seed, heartbeat_interval, grace_period,
                 pruner_warmup_epochs, pruner_startup_trials)
    study_name = study_name or default_study_name(output_dir)
    if storage is not None:  # a shared database: opened (and checked against this search) first
        study = open_study(storage, study_name, *open_args)
        output_dir = utils.make_output_dir(output_dir)
    else:
        output_dir = utils.make_output_dir(output_dir)
        storage = default_storage(output_dir)
        study = open_study(storage, study_name, *open_args)
    points = grid_points(space)
    target = len(points) if sampler == "grid" else int(n_trials or 0)
    if sampler == "tpe" and target > len(points):
        log.warning("--n_trials %d is larger than the %d distinct configurations; stopping at %d",
                    target, len(points), len(points))
        target = len(points)
    utils.write_json(output_dir / "search_config.json", {
        "study_name": study_name, "storage": storage, "metric": metric, "direction": direction_of(metric),
        "sampler": sampler, "n_trials": target, "pruner": pruner, "space": space, "base_config": base_config,
        "environment": utils.environment_info()})
    log.info("study %r in %s: %d configurations (%s sampler)", study_name, storage, target, sampler)

    reap_dead_trials(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    requeue_open_points(study, points)
    objective = Objective(base_config, space, output_dir, metric, train_fn, prune=(pruner == "median"))

    def remaining_work() -> tuple[int, int]:
        """(points nobody works on or waits for a worker, points being worked on)."""
        status = point_status(study, points)
        done = sum(s == "done" for s in status.values())
        running = sum(s == "running" for s in status.values())
        waiting = sum(s == "waiting" for s in status.values())
        if sampler == "grid":
            return len(points) - done - running, running
        return max(target - done - running, waiting), running

    def stop_when_done(study_, trial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            write_results(study_, metric, output_dir, base_config)
        if remaining_work()[0] == 0:
            study_.stop()

    max_idle = 3 * len(points) + 10  # bound on one round (a sampler proposing only taken points)
    optuna_log = logging.getLogger("optuna.study._optimize")  # where Optuna logs a failed trial
    quiet_failures = DropFailedTrialTraceback()
    optuna_log.addFilter(quiet_failures)
    try:
        while remaining_work()[0] > 0:
            trained_before = objective.trained
            try:
                study.optimize(objective, n_trials=max_idle, callbacks=[stop_when_done], catch=(),
                               gc_after_trial=True, show_progress_bar=False)
            except (ValueError, AssertionError, optuna.exceptions.UpdateFinishedTrialError):
                if not objective.taken_over():
                    raise
                t = objective.last_trial
                log.warning("trial %d (%s) was marked failed by another worker while this one was still training "
                            "it (no heartbeat for %d s: is the machine overloaded? a larger --heartbeat_interval "
                            "helps); its configuration was queued again and resumes in %s", t.number, t.params,
                            grace_period or 3 * heartbeat_interval, t.user_attrs.get("trial_dir"))
                continue
            if objective.trained == trained_before:
                if remaining_work()[0] > 0:
                    log.warning("the sampler proposed only configurations that are already taken; stopping "
                                "this worker (run it again to continue)")
                break
    finally:
        optuna_log.removeFilter(quiet_failures)
    rows = write_results(study, metric, output_dir, base_config)
    open_points, running = remaining_work()
    finished = open_points == 0 and running == 0
    if running:
        log.info("%d configuration(s) still being trained by other workers; results.* will be rebuilt when "
                 "they finish", running)
    return {"rows": rows, "trained": objective.trained, "duplicates": objective.duplicates,
            "finished": finished, "study_name": study_name, "storage": storage}


class DropFailedTrialTraceback(logging.Filter):
    """Optuna logs the exception of a failed trial with its traceback (and then "Trial N failed with value
    None."), then raises it again (`catch=()`): main.py reports that exception itself (one line for Ctrl-C and
    user errors, the traceback of a bug once), so both records are dropped. The trial is still marked FAIL and
    run again later. (The objective returns a finite float or raises, so no other trial fails silently.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return False
        message = record.getMessage()
        return not (message.startswith("Trial ") and message.endswith(" failed with value None."))


def check_sampler_options(sampler: str, n_trials: int | None) -> None:
    if sampler == "tpe" and not (n_trials or 0) > 0:
        raise UserError("--n_trials: give the number of configurations to try with --sampler tpe")


def check_storage_url(url: str) -> None:
    """A database URL SQLAlchemy (Optuna's storage) can parse, with an installed dialect; checked before
    anything is written (a server that cannot be reached is found when the study is opened)."""
    try:
        from sqlalchemy.engine import make_url

        make_url(url).get_dialect()
    except ImportError as e:
        raise UserError(f"--storage {url}: database driver missing ({e})") from None
    except Exception as e:  # ArgumentError (not a URL), NoSuchModuleError (unknown database kind)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--storage {url}: not a database URL (e.g. sqlite:///search.db or "
                        f"postgresql://user:password@host/db): {detail}") from None


def train_best(best_config: Mapping[str, Any], output_dir: Path, train_fn: TrainFn | None = None) -> dict:
    """Train the best configuration with full cross-validation, test folds evaluated, into
    `<output_dir>/best_model/` (resumes there if interrupted)."""
    if train_fn is None:
        import train

        train_fn = train.run_training
    target = output_dir / "best_model"
    resume = (target / "config.json").is_file() or any(target.glob("**/*.pth"))
    config = dict(best_config, output_dir=str(target), resume=bool(resume))
    log.info("training the best configuration (rank %s, alpha %s, lr %s) into %s", config.get("lora_rank"),
             config.get("lora_alpha"), config.get("learning_rate"), target)
    return train_fn(config, target, epoch_callback=None, evaluate_test=True)


# ----------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    import train

    train.add_arguments(parser)
    parser.set_defaults(output_dir="parameter_search")
    # set by the search itself: absent unless given, and then refused (run() says which flag to use instead)
    for action in parser._actions:
        if action.dest in SEARCH_SETS:
            action.default = argparse.SUPPRESS
            action.help = f"set by the search: use {SEARCH_SETS[action.dest]}" if action.dest != "fold" else \
                "not available: the search trains every fold"
    g = parser.add_argument_group("parameter search")
    g.add_argument("--lora_ranks", default="2,4,8,16", help="LoRA ranks to try (comma-separated)")
    g.add_argument("--lora_alphas", default="2,4,8", help="LoRA alphas to try (comma-separated)")
    g.add_argument("--learning_rates", default="1e-4,3e-4,1e-3", help="learning rates to try (comma-separated)")
    g.add_argument("--search_metric", default=None, choices=train.MONITOR_CHOICES,
                   help="validation metric to optimise (default: the training --monitor metric, else pq)")
    g.add_argument("--sampler", choices=("grid", "tpe"), default="grid",
                   help="grid: every combination; tpe: --n_trials configurations chosen by TPE")
    g.add_argument("--n_trials", type=int, default=None, help="configurations to try with --sampler tpe")
    g.add_argument("--search_seed", type=int, default=0, help="seed of the sampler (grid order, TPE)")
    g.add_argument("--pruner", choices=("none", "median"), default="none",
                   help="median: stop configurations whose per-epoch validation score is below the median")
    g.add_argument("--pruner_warmup_epochs", type=int, default=5,
                   help="median pruner: never prune before this many epochs (counted across folds)")
    g.add_argument("--pruner_startup_trials", type=int, default=4,
                   help="median pruner: configurations to complete before pruning starts")
    g.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by all workers (default: sqlite:///<output_dir>/study.db; "
                        "many machines: postgresql://user:password@host/db)")
    g.add_argument("--study_name", default=None, help="study name (default: derived from --output_dir)")
    g.add_argument("--heartbeat_interval", type=int, default=60,
                   help="seconds between heartbeats of a running configuration")
    g.add_argument("--grace_period", type=int, default=None,
                   help="seconds without heartbeat after which another worker re-runs a configuration "
                        "(default: 3 x --heartbeat_interval)")
    g.add_argument("--train_best", action="store_true",
                   help="afterwards train the best configuration on the full CV (test folds evaluated) "
                        "into <output_dir>/best_model/")


def _default_metric(config: Mapping[str, Any]) -> str:
    monitor = str(config.get("monitor") or "").strip()
    for prefix in ("val_", "val/"):
        if monitor.startswith(prefix):
            monitor = monitor[len(prefix):]
    return monitor or "pq"


# train flags the search sets itself -> what to use instead
SEARCH_SETS = {"lora_rank": "--lora_ranks", "lora_alpha": "--lora_alphas", "learning_rate": "--learning_rates",
               "fold": "nothing: every configuration is trained on every fold"}


def check_search_flags(args: argparse.Namespace) -> None:
    """Refuse the train flags the search would override (they would be silently ignored), and put their
    defaults back so the train configuration can be built."""
    import train

    given = [dest for dest in SEARCH_SETS if hasattr(args, dest)]
    if given:
        dest = given[0]
        raise UserError(f"--{dest}: set by the parameter search for each configuration; use {SEARCH_SETS[dest]}")
    defaults = train.default_config(getattr(args, "data_dir", "") or "")
    for dest in SEARCH_SETS:
        setattr(args, dest, defaults[dest])


def run(args: argparse.Namespace) -> int:
    import train

    check_search_flags(args)
    space = search_space(args.lora_ranks, args.lora_alphas, args.learning_rates)
    for name, value in (("--heartbeat_interval", args.heartbeat_interval), ("--grace_period", args.grace_period),
                        ("--n_trials", args.n_trials)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: must be a positive integer")
    if args.search_seed < 0:
        raise UserError(f"--search_seed {args.search_seed}: must be 0 or more")
    check_sampler_options(args.sampler, args.n_trials)
    if args.storage is not None:
        check_storage_url(args.storage)
    config = dict(train.config_from_args(args), cross_validation=True, resume=False)
    if args.resume:
        log.info("--resume is implied: a parameter search always continues its study")
    train.validate_config(config)
    train.configure_threads(args, config)
    # before anything is written: the data, and the window and pixel size against the data and memory
    train.discover_training_data(dict(config))
    output_dir = Path(args.output_dir)
    metric = args.search_metric or _default_metric(config)
    result = run_search(config, space, output_dir, metric=metric, sampler=args.sampler, n_trials=args.n_trials,
                        pruner=args.pruner, storage=args.storage, study_name=args.study_name,
                        seed=args.search_seed, heartbeat_interval=args.heartbeat_interval,
                        grace_period=args.grace_period, pruner_warmup_epochs=args.pruner_warmup_epochs,
                        pruner_startup_trials=args.pruner_startup_trials)
    rows = result["rows"]
    print(f"parameter search: {len(rows)} configuration(s) complete, {result['trained']} trained by this worker; "
          f"results in {output_dir.resolve() / 'results.md'}")
    if rows:
        best = rows[0]
        print(f"best: rank {best['lora_rank']}, alpha {_fmt(best['lora_alpha'])}, lr {_fmt(best['learning_rate'])}"
              f" -> validation {metric} {best['score']:.4f} (config: {output_dir / 'best_config.json'})")
    if args.train_best:
        if not result["finished"]:
            log.warning("other workers are still training configurations; the best model is not trained now. "
                        "Run the same command with --train_best again when they have finished.")
            return 0
        if not rows:
            raise UserError("--train_best: no configuration completed, nothing to train")
        summary = train_best(utils.read_json(output_dir / "best_config.json"), output_dir)
        test = summary.get("test_mean") or {}
        print(f"best configuration trained into {output_dir / 'best_model'}"
              + (f"; test {metric} {test[metric]:.4f}" if metric in test else ""))
    return 0
