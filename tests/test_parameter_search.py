"""Tests of parameter_search.py: study bookkeeping (resume, crashed workers, duplicates, several workers)
with a fast stand-in for `train.run_training`, and the real command on tiny synthetic data (subprocesses:
a search killed half-way and resumed, two workers sharing one SQLite study)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest

import parameter_search as ps
import utils

PROJECT_DIR = Path(__file__).resolve().parents[1]
BASE = {"epochs": 2, "num_folds": 2, "input_size": 64, "monitor": "pq", "cross_validation": True}


class FakeTrain:
    """Stands in for train.run_training: a deterministic score per configuration, one `runs.txt` line
    per call in the trial folder, per-epoch callbacks like the real one."""

    def __init__(self, fail_on: tuple | None = None, interrupt_on: tuple | None = None, drop: bool = False):
        self.calls: list[tuple] = []
        self.fail_on, self.interrupt_on, self.drop = fail_on, interrupt_on, drop

    @staticmethod
    def score(config) -> float:
        return 0.1 * config["lora_rank"] + 100 * config["learning_rate"] + 0.01 * config["lora_alpha"]

    def __call__(self, config, output_dir, epoch_callback=None, evaluate_test=True):
        assert evaluate_test is False, "the search must never evaluate test folds"
        key = (config["lora_rank"], config["lora_alpha"], config["learning_rate"])
        self.calls.append((key, config["resume"]))
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(output_dir) / "runs.txt", "a") as f:
            f.write(f"{key}\n")
        (Path(output_dir) / "config.json").write_text(json.dumps(config))
        if key == self.interrupt_on:
            self.interrupt_on = None
            raise KeyboardInterrupt
        if key == self.fail_on:
            self.fail_on = None
            raise RuntimeError("CUDA out of memory (simulated)")
        score = self.score(config)
        for fold in range(config["num_folds"]):
            for epoch in range(1, config["epochs"] + 1):
                value = score - (0.5 * epoch if self.drop and config["lora_rank"] == 2 else 0.0)
                epoch_callback(fold, epoch, {"pq": value, "loss": 1 - value})
        return {"folds": [{"fold": k, "best_epoch": 1, "val": {"pq": score}, "test": None}
                          for k in range(config["num_folds"])],
                "val_mean": {"pq": score, "dice": 0.5, "loss": 1 - score},
                "val_sd": {"pq": 0.01, "dice": 0.02, "loss": 0.0}, "test_mean": None, "test_sd": None,
                "params": {"total": 1000, "trainable": 10 * config["lora_rank"], "percent": 1.0, "head": 5},
                "seconds": 1.0}


def _space():
    return ps.search_space("2,4", "4", "1e-4,1e-3")


def _load(out: Path, name: str | None = None) -> optuna.Study:
    storage = ps.default_storage(out)
    return optuna.load_study(study_name=name or ps.default_study_name(out), storage=storage)


def _complete_keys(study) -> Counter:
    return Counter(ps._key(t.params) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def _check_results(out: Path, grid: int) -> list[dict]:
    rows = utils.read_csv(out / "results.csv")
    assert len(rows) == grid
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    best = utils.read_json(out / "best_config.json")
    assert (best["lora_rank"], best["lora_alpha"], best["learning_rate"]) == \
        (int(rows[0]["lora_rank"]), float(rows[0]["lora_alpha"]), float(rows[0]["learning_rate"]))
    assert (out / "score_vs_rank.png").stat().st_size > 1000
    assert "± " in (out / "results.md").read_text()
    return rows


# ----------------------------------------------------------------------------------------------
# Bookkeeping with the fake training function (fast)
# ----------------------------------------------------------------------------------------------
def test_grid_runs_every_point_once_and_rerun_does_nothing(tmp_path):
    fake = FakeTrain()
    result = ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=fake)
    assert result["finished"] and result["trained"] == 4
    assert sorted(k for k, _ in fake.calls) == sorted(ps._key(p) for p in ps.grid_points(_space()))
    rows = _check_results(tmp_path, 4)
    assert (int(rows[0]["lora_rank"]), float(rows[0]["learning_rate"])) == (4, 1e-3)
    assert len(list((tmp_path / "trials").iterdir())) == 4
    again = ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=fake)
    assert again["trained"] == 0 and len(fake.calls) == 4
    assert set(_complete_keys(_load(tmp_path)).values()) == {1}


def test_interrupted_and_failed_points_are_rerun_in_their_folder(tmp_path):
    fake = FakeTrain(interrupt_on=(4, 4.0, 1e-4))
    with pytest.raises(KeyboardInterrupt):
        ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=fake)
    done = set(_complete_keys(_load(tmp_path)))
    untouched = [ps._key(p) for p in ps.grid_points(_space()) if ps._key(p) not in done | {(4, 4.0, 1e-4)}]
    assert untouched, "the interrupt should come before the last configuration"
    fake.fail_on = untouched[0]
    with pytest.raises(RuntimeError):
        ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=fake)
    result = ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=fake)
    assert result["finished"]
    assert set(_complete_keys(_load(tmp_path)).values()) == {1} and len(_complete_keys(_load(tmp_path))) == 4
    folders = list((tmp_path / "trials").iterdir())
    assert len(folders) == 4  # retries reuse the folder of the first attempt ...
    resumed = [resume for key, resume in fake.calls if key in ((4, 4.0, 1e-4), untouched[0])]
    assert resumed.count(True) == 2  # ... and resume the training there
    _check_results(tmp_path, 4)


def _running_trial(out: Path):
    """A RUNNING trial of the search's study in `out`, its parameters chosen (as another worker's would be)."""
    study = ps.open_study(ps.default_storage(out), ps.default_study_name(out), _space(), "pq", "grid", BASE)
    trial = study.ask()
    return trial, {n: trial.suggest_categorical(n, _space()[n]) for n in ps.SEARCH_PARAMS}


def test_dead_worker_trial_is_failed_and_requeued(tmp_path):
    # a RUNNING trial left behind by a process of this machine that no longer exists
    trial, params = _running_trial(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("machine", ps.machine_id())
    trial.set_user_attr("pid", dead.pid)
    folder = "trials/" + ps.trial_folder_name(trial.number, params)
    trial.set_user_attr("trial_dir", folder)
    (tmp_path / folder).mkdir(parents=True)
    fake = FakeTrain()
    result = ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=fake)
    assert result["finished"] and result["trained"] == 4
    study = _load(tmp_path)
    assert study.trials[trial.number].state == optuna.trial.TrialState.FAIL
    assert set(_complete_keys(study).values()) == {1} and len(_complete_keys(study)) == 4
    assert len(list((tmp_path / "trials").iterdir())) == 4


def test_trial_of_a_worker_still_writing_its_identity_is_not_reaped(tmp_path):
    # another worker of this machine has started a trial and written "machine" but not yet its pid: it is alive
    trial, params = _running_trial(tmp_path)
    trial.set_user_attr("machine", ps.machine_id())
    fake = FakeTrain()
    result = ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=fake)
    assert result["trained"] == 3 and not result["finished"]
    assert _load(tmp_path).trials[trial.number].state == optuna.trial.TrialState.RUNNING
    assert ps._key(params) not in [k for k, _ in fake.calls]


class FailedFromOutside(FakeTrain):
    """While training `key`, another worker's heartbeat check declares the trial dead (its heartbeat is older
    than the grace period, as on an overloaded machine): FAIL in the shared storage, configuration queued
    again. `when` is "end" (before the training returns) or "report" (before an epoch's report)."""

    def __init__(self, out: Path, key: tuple, when: str):
        super().__init__()
        self.out, self.key, self.when = out, key, when

    def _fail_mine(self) -> None:
        other = _load(self.out)  # the other worker's own connection to the study
        for t in other.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            if ps._key(t.params) == self.key:
                other.tell(t.number, state=optuna.trial.TrialState.FAIL)
                ps.requeue_failed_trial(other, t)
        self.key = None

    def __call__(self, config, output_dir, epoch_callback=None, evaluate_test=True):
        key = (config["lora_rank"], config["lora_alpha"], config["learning_rate"])

        def callback(*a):
            if key == self.key and self.when == "report":
                self._fail_mine()
            epoch_callback(*a)

        result = super().__call__(config, output_dir, callback, evaluate_test)
        if key == self.key and self.when == "end":
            self._fail_mine()
        return result


@pytest.mark.parametrize("when", ["end", "report", "told"])
def test_trial_failed_by_another_worker_while_training_is_logged_and_the_worker_goes_on(tmp_path, caplog, when,
                                                                                        monkeypatch):
    key = (4, 4.0, 1e-4)
    fake = FailedFromOutside(tmp_path, key, when)
    if when == "told":  # failed after the objective's last write, before Optuna records its result
        train = ps.Objective._train

        def train_then_fail(self, trial):
            score = train(self, trial)
            if ps._key(trial.params) == fake.key:
                fake._fail_mine()
            return score

        monkeypatch.setattr(ps.Objective, "_train", train_then_fail)
    with caplog.at_level("WARNING", logger="parameter_search"):
        result = ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=fake)
    assert result["finished"]
    assert [resume for k, resume in fake.calls if k == key] == [False, True]  # run again, resumed in its folder
    study = _load(tmp_path)
    assert set(_complete_keys(study).values()) == {1} and len(_complete_keys(study)) == 4
    assert len(list((tmp_path / "trials").iterdir())) == 4
    assert any("was marked failed by another worker" in r.getMessage() for r in caplog.records)
    _check_results(tmp_path, 4)


def test_point_running_elsewhere_is_not_duplicated(tmp_path):
    # another live worker (this test process) holds one grid point
    trial, params = _running_trial(tmp_path)
    trial.set_user_attr("machine", ps.machine_id())
    trial.set_user_attr("pid", os.getpid())
    fake = FakeTrain()
    result = ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=fake)
    assert result["trained"] == 3 and not result["finished"]
    assert ps._key(params) not in [k for k, _ in fake.calls]
    assert len(utils.read_csv(tmp_path / "results.csv")) == 3
    _load(tmp_path).tell(trial.number, FakeTrain.score(params))  # the other worker finishes
    result = ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=fake)
    assert result["finished"] and result["trained"] == 0
    _check_results(tmp_path, 4)


def test_duplicate_proposal_is_skipped(tmp_path):
    fake = FakeTrain()
    ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=fake)
    study = ps.open_study(ps.default_storage(tmp_path), ps.default_study_name(tmp_path), _space(), "pq",
                          "grid", BASE)
    study.enqueue_trial({"lora_rank": 2, "lora_alpha": 4.0, "learning_rate": 1e-4})
    objective = ps.Objective(BASE, _space(), tmp_path, "pq", fake, prune=False)
    study.optimize(objective, n_trials=1)
    last = study.trials[-1]
    assert last.state == optuna.trial.TrialState.PRUNED and last.user_attrs["duplicate_of"] is not None
    assert len(fake.calls) == 4


def test_tpe_and_median_pruner(tmp_path):
    fake = FakeTrain(drop=True)
    space = ps.search_space("2,4,8", "4,8", "1e-4,1e-3")
    result = ps.run_search(BASE, space, tmp_path, metric="pq", sampler="tpe", n_trials=5, pruner="median",
                           pruner_warmup_epochs=0, pruner_startup_trials=1, train_fn=fake)
    study = _load(tmp_path)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                and t.user_attrs.get("duplicate_of") is None]
    assert result["finished"] and len(finished) == 5
    keys = [ps._key(t.params) for t in finished]
    assert len(set(keys)) == 5
    steps = max(len(t.intermediate_values) for t in finished)
    assert steps == BASE["num_folds"] * BASE["epochs"] or any(t.state.name == "PRUNED" for t in finished)


def test_changed_search_is_refused(tmp_path):
    ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=FakeTrain())
    with pytest.raises(utils.UserError, match="different search"):
        ps.run_search(dict(BASE, epochs=3), _space(), tmp_path, metric="pq", train_fn=FakeTrain())


def test_second_study_in_same_folder_never_resumes_the_first_studys_trials(tmp_path):
    """`--study_name other` (what the 'different search' error suggests) with other training options in the
    same --output_dir must train every configuration afresh, not resume (and report) the first study's runs."""
    ps.run_search(BASE, _space(), tmp_path, metric="pq", train_fn=FakeTrain())
    first = {p.parent.name: p.read_text() for p in (tmp_path / "trials").glob("*/config.json")}
    fake = FakeTrain()
    result = ps.run_search(dict(BASE, epochs=3), _space(), tmp_path, metric="pq", study_name="other", train_fn=fake)
    assert result["trained"] == 4
    assert all(resume is False for _, resume in fake.calls)
    folders = {t.user_attrs["trial_dir"] for t in _load(tmp_path, "other").get_trials()}
    assert len(folders) == 4 and all(Path(f).name.endswith("_2") for f in folders)
    for folder in folders:
        assert json.loads((tmp_path / folder / "config.json").read_text())["epochs"] == 3
    after = {p.parent.name: p.read_text() for p in (tmp_path / "trials").glob("*/config.json")}
    assert len(first) == 4 and all(after[name] == text for name, text in first.items())  # first study untouched


def test_bad_lists():
    with pytest.raises(utils.UserError, match="--lora_ranks"):
        ps.search_space("2,x", "4", "1e-4")
    with pytest.raises(utils.UserError, match="--learning_rates"):
        ps.search_space("2", "4", "-1")
    assert ps.trial_folder_name(3, {"lora_rank": 8, "lora_alpha": 16.0, "learning_rate": 3e-4}) == "3_r8_a16_lr0.0003"


# ----------------------------------------------------------------------------------------------
# The real command on tiny synthetic data (subprocesses)
# ----------------------------------------------------------------------------------------------
def _command(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(PROJECT_DIR / "main.py"), "-q", "parameter_search", "--data_dir", str(data_dir),
            "--output_dir", str(out), "--pretrained", "none", "--input_size", "64", "--epochs", "1",
            "--num_folds", "2", "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
            "--val_fraction", "0.2", "--lora_ranks", "2,4", "--lora_alphas", "4", "--learning_rates", "1e-4,1e-3",
            *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _check_real(out: Path) -> None:
    study = _load(out)
    complete = _complete_keys(study)
    assert len(complete) == 4 and set(complete.values()) == {1}, complete
    folders = sorted(p.name for p in (out / "trials").iterdir())
    assert len(folders) == 4, folders  # one folder per configuration: nothing trained twice
    assert len({f.split("_", 1)[1] for f in folders}) == 4
    _check_results(out, 4)
    assert utils.read_json(out / "best_config.json")["cross_validation"] is True


def test_real_search_killed_and_resumed(synthetic_data_dir, tmp_path):
    out = tmp_path / "search"
    proc = subprocess.Popen(_command(synthetic_data_dir, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "results.csv").is_file():  # written when the first configuration completes
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no configuration completed in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = subprocess.run(_command(synthetic_data_dir, out), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    _check_real(out)


def test_real_two_workers_share_one_study(synthetic_data_dir, tmp_path):
    out = tmp_path / "search"
    storage = f"sqlite:///{(tmp_path / 'shared.db').as_posix()}"
    cmd = _command(synthetic_data_dir, out, "--storage", storage, "--study_name", "shared")
    workers = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=storage)
    complete = _complete_keys(study)
    assert len(complete) == 4 and set(complete.values()) == {1}, complete
    folders = sorted(p.name for p in (out / "trials").iterdir())
    assert len(folders) == 4, folders
    _check_results(out, 4)


def test_output_dir_that_is_a_file_is_a_user_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(utils.UserError, match="--output_dir .*afile: exists and is not a folder"):
        ps.run_search(BASE, _space(), tmp_path / "afile", metric="pq", train_fn=FakeTrain())


def test_negative_search_seed_is_a_user_error(tmp_path, capsys):
    import main

    code = main.main(["parameter_search", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                      "--lora_ranks", "2", "--lora_alphas", "4", "--learning_rates", "1e-4", "--search_seed", "-1"])
    assert code == 2 and capsys.readouterr().err.strip() == "error: --search_seed -1: must be 0 or more"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Issue 19: exit 2 leaves nothing; Ctrl-C is one line; LoRA rank 0 as in train
# ----------------------------------------------------------------------------------------------
def test_refused_sampler_or_storage_creates_nothing(tmp_path, run_error):
    out = tmp_path / "search"
    with pytest.raises(utils.UserError, match="^--n_trials: give the number"):
        ps.run_search(BASE, _space(), out, metric="pq", sampler="tpe", train_fn=FakeTrain())
    assert not out.exists()  # was: study.db in a new folder
    with pytest.raises(utils.UserError, match="^--storage bogus://x: not a database URL"):
        ps.run_search(BASE, _space(), out, metric="pq", storage="bogus://x", train_fn=FakeTrain())
    assert not out.exists()  # was: an empty folder
    for extra in (["--sampler", "tpe"], ["--storage", "bogus://x"]):
        line = run_error(["-q", "parameter_search", "--data_dir", str(tmp_path), "--output_dir", str(out), *extra])
        assert line.startswith(("error: --n_trials", "error: --storage")), line
        assert not out.exists()


def test_ctrl_c_is_one_line_and_status_130(synthetic_data_dir, tmp_path):
    """The interrupt arrives while a configuration trains (here the training function raises it, as Ctrl-C
    in the training loop does): Optuna logged a 20-line traceback before main's line; now only the line."""
    out = tmp_path / "search"
    script = ("import sys, train, main\n"
              "def interrupted(*args, **kwargs):\n"
              "    raise KeyboardInterrupt\n"
              "train.run_training = interrupted\n"
              "sys.exit(main.main(sys.argv[1:]))\n")
    argv = _command(synthetic_data_dir, out)[2:]  # without python main.py
    argv.remove("-q")  # the interrupt line must be the only line even with the search's log on
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=PROJECT_DIR, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if " INFO " not in line]
    assert lines == ["error: interrupted"], done.stderr
    assert "Traceback" not in done.stderr
    failed = _load(out).get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 1  # the interrupted configuration is run again next time


def test_lora_rank_0_is_searched_once_per_learning_rate(tmp_path):
    """train --lora_rank 0 means no LoRA; the search accepts it too, and since alpha means nothing without
    adapters, rank 0 is trained once per learning rate whatever --lora_alphas lists."""
    space = ps.search_space("0,2", "2,4", "1e-4,1e-3")
    points = ps.grid_points(space)
    assert len(points) == 2 + 4 and sum(p["lora_rank"] == 0 for p in points) == 2
    fake = FakeTrain()
    result = ps.run_search(BASE, space, tmp_path, metric="pq", train_fn=fake)
    assert result["finished"] and result["trained"] == 6
    keys = [k for k, _ in fake.calls]
    assert sorted((r, lr) for r, _, lr in keys if r == 0) == [(0, 1e-4), (0, 1e-3)]
    rows = _check_results(tmp_path, 6)
    assert sum(int(r["lora_rank"]) == 0 for r in rows) == 2
    assert sum(line.split(" | ")[2:4] == ["0", "—"] for line in (tmp_path / "results.md").read_text().splitlines()) == 2
    assert (tmp_path / "score_vs_rank.png").stat().st_size > 1000  # rank 0 on the rank axis
    for ranks in ("-1", "2,-4"):
        with pytest.raises(utils.UserError, match=r"^--lora_ranks -\d: must be 0 \(no LoRA\) or a positive integer$"):
            ps.search_space(ranks, "2", "1e-4")
