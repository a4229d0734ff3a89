"""Batch machinery: spec expansion, atomic records, resume after kill -9, failure isolation,
worker death, dependencies, executors (local processes, Ray), reports.

The jobs here are tiny fake kinds defined in this module (workers import it by name), so the
tests exercise the machinery, not the analyses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kfacbound.batch import (
    append_record,
    latest_records,
    parse_spec,
    read_records,
    run_batch,
)
from kfacbound.batch.spec import canonical_json, job_key
from kfacbound.cli import main
from kfacbound.errors import KfacboundError

HERE = __name__  # module name under which workers import the fake job functions
ROOT = Path(__file__).resolve().parents[HERE.count(".")]  # sys.path entry that holds it


# ---------------------------------------------------------------------------- fake job kinds


def echo_job(config, out_dir):
    return {"value": config["options"].get("value"), "seed": config.get("seed"),
            "pid": os.getpid()}


def sleep_job(config, out_dir):
    time.sleep(float(config["options"].get("seconds", 0.5)))
    return {"slept": config["options"].get("seconds", 0.5), "i": config["options"].get("i")}


def fail_job(config, out_dir):
    raise ValueError(f"boom {config['options'].get('value')}")


def crash_job(config, out_dir):
    os._exit(17)  # a worker dying hard (segfault, OOM killer)


def threads_job(config, out_dir):
    import torch

    return {"torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}


def fake_train(config, out_dir):
    """Writes a 'checkpoint' (temp name + rename) naming its seed; fails for seed 13."""
    if config["seed"] == 13:
        raise RuntimeError("diverged")
    path = Path(out_dir) / "checkpoints" / f"{job_key(config)}.kfb"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"seed": config["seed"], "bn": config["bn"]}))
    os.replace(tmp, path)
    return {"checkpoint": str(path.relative_to(out_dir)), "train_error": 0.1}


def read_ckpt_job(config, out_dir):
    from kfacbound.batch.jobs import needed_checkpoints

    return {"seeds_read": [json.loads(p.read_text())["seed"]
                           for p in needed_checkpoints(config, out_dir)]}


KINDS = f"""
[kinds]
echo = "{HERE}:echo_job"
sleep = "{HERE}:sleep_job"
fail = "{HERE}:fail_job"
crash = "{HERE}:crash_job"
threads = "{HERE}:threads_job"
train = "{HERE}:fake_train"
read1 = {{ entry = "{HERE}:read_ckpt_job", needs = "checkpoint" }}
readall = {{ entry = "{HERE}:read_ckpt_job", needs = "checkpoints" }}
"""


def spec_text(body: str) -> str:
    return body + KINDS


def statuses(out: Path) -> dict[str, str]:
    return {k: r["status"] for k, r in latest_records(out / "results.jsonl").items()}


# ---------------------------------------------------------------------------- spec


def test_spec_expands_grid_with_dependencies():
    spec = parse_spec(spec_text("""
seeds = [0, 1, 2]
bn = [false, true]
datasets = [{ name = "digits", label = "dg" }]
architectures = [{ arch = "fc", widths = [8], label = "tiny" }, "lenet5"]
[train]
epochs = 1
[[analyses]]
kind = "read1"
[analyses.grid]
posterior = ["diag", "kfac"]
[[analyses]]
kind = "readall"
"""))
    kinds = [j.kind for j in spec.jobs]
    cells = 1 * 2 * 2  # datasets × archs × bn
    assert kinds.count("train") == cells * 3
    assert kinds.count("read1") == cells * 3 * 2
    assert kinds.count("readall") == cells  # one per cell, all seeds
    keys = [j.key for j in spec.jobs]
    assert len(set(keys)) == len(keys)
    by_key = {j.key: j for j in spec.jobs}
    position = {k: i for i, k in enumerate(keys)}
    for job in spec.jobs:
        # the key is sha256 of the canonical JSON of the full config without its labels
        assert job.key == job_key(job.config)
        assert job_key(dict(job.config, label={"x": 1})) == job.key
        for need in job.needs:  # dependencies come first and are train jobs of the same cell
            assert position[need] < position[job.key]
            dep = by_key[need].config
            assert by_key[need].kind == "train"
            assert (dep["dataset"], dep["arch"], dep["bn"]) == (
                job.config["dataset"], job.config["arch"], job.config["bn"])
        if job.kind == "read1":
            assert by_key[job.needs[0]].config["seed"] == job.config["seed"]
        if job.kind == "readall":
            assert sorted(by_key[n].config["seed"] for n in job.needs) == [0, 1, 2]
    train = next(j for j in spec.jobs if j.kind == "train")
    # fully resolved: architecture defaults and every TrainConfig field are in the config
    assert train.config["arch"]["activation"] == "relu" and "momentum" in train.config["options"]
    assert train.config["arch"]["bn"] == train.config["bn"]
    # keys are stable across parses and change with any option
    again = parse_spec(spec.text)
    assert [j.key for j in again.jobs] == keys
    changed = parse_spec(spec.text.replace("epochs = 1", "epochs = 2"))
    assert set(keys).isdisjoint(j.key for j in changed.jobs)  # dependents change with needs


@pytest.mark.parametrize("body, message", [
    ("sedes = [0]\nanalyses = ['echo']", "unknown key(s) 'sedes'"),
    ("seeds = [0, 0]\nanalyses = ['echo']", "duplicates"),
    ("seeds = [-1]\nanalyses = ['echo']", "non-negative"),
    ("bn = 'yes'\nanalyses = ['echo']", "bn must be"),
    ("analyses = ['nope']", "unknown job kind 'nope'"),
    ("datasets = ['imagenet']\nanalyses = ['echo']", "unknown dataset 'imagenet'"),
    ("datasets = [{ name = 'digits', colour = 1 }]\nanalyses = ['echo']",
     "unknown dataset option 'colour'"),
    ("architectures = [{ arch = 'fc', activation = 'swish' }]\nanalyses = ['echo']",
     "unknown activation"),
    ("architectures = [{ arch = 'fc', widht = [3] }]\nanalyses = ['echo']",
     "unknown key(s) 'widht'"),
    ("architectures = [{ arch = 'fc', bn = true }]\nanalyses = ['echo']", "top-level bn"),
    ("datasets = ['digits']\narchitectures = ['fc']\n[train]\nepoch = 3", "'epoch'"),
    ("datasets = ['digits']\narchitectures = ['fc']\n[train]\nlr = -1.0", "lr must be"),
    ("analyses = ['read1']", "at least one [[datasets]]"),
    ("[[analyses]]\nkind = 'echo'\nvalue = 1\n[analyses.grid]\nvalue = [1, 2]",
     "both an option and a grid axis"),
    ("[[analyses]]\nkind = 'echo'\n[analyses.grid]\nvalue = []", "non-empty list"),
    ("seeds = [", "not valid TOML"),
])
def test_spec_errors_are_clear(body, message):
    with pytest.raises(KfacboundError) as info:
        parse_spec(spec_text(body) if "[kinds]" not in body else body, where="s.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("s.toml")


def test_spec_validates_builtin_analysis_options():
    with pytest.raises(KfacboundError, match="unknown job kind"):
        parse_spec("analyses = ['bounds']")
    with pytest.raises(KfacboundError, match="train jobs are implied"):
        parse_spec("analyses = ['train']")


def test_bound_recipe_expands_into_the_job_options():
    from kfacbound.bounds.certify import RECIPES

    text = """
seeds = [0]
datasets = ["digits"]
architectures = ["T-600"]
[[analyses]]
kind = "bound"
recipe = "best"
iterations = 7
[analyses.grid]
posterior = ["diag", "kfac"]
"""
    jobs = [j.config for j in parse_spec(text).jobs if j.kind == "bound"]
    assert sorted(j["options"]["posterior"] for j in jobs) == ["diag", "kfac"]  # grid wins
    for job in jobs:
        opts = job["options"]
        assert "recipe" not in opts and opts["iterations"] == 7  # explicit options win
        for key, val in RECIPES["best"].items():
            if key not in ("posterior", "iterations"):
                assert opts[key] == val, key
    with pytest.raises(KfacboundError, match="unknown recipe"):
        parse_spec(text.replace('"best"', '"fastest"'))
    # without a posterior, "best" selects among its posteriors (one job, a list)
    (job,) = [j.config for j in parse_spec(text.split("[analyses.grid]")[0]).jobs
              if j.kind == "bound"]
    assert job["options"]["posterior"] == ["diag", "kfac"]


def test_an_analysis_can_be_limited_to_some_architectures():
    text = """
seeds = [0, 1]
bn = [false, true]
datasets = ["digits"]
[[architectures]]
arch = "fc"
widths = [8]
label = "small"
[[architectures]]
arch = "fc"
widths = [16]
label = "big"
[train]
epochs = 1
[[analyses]]
kind = "bound"
iterations = 3
[[analyses]]
kind = "bound"
iterations = 5
architectures = ["big"]
"""
    spec = parse_spec(text)
    counts: dict[tuple, int] = {}
    for j in spec.jobs:
        if j.kind == "bound":
            cell = (j.config["label"]["arch"], j.config["options"]["iterations"])
            counts[cell] = counts.get(cell, 0) + 1
    assert counts == {("small", 3): 4, ("big", 3): 4, ("big", 5): 4}  # 2 seeds × 2 bn each
    # the filter is not an option: the unfiltered jobs of the big network keep their keys
    unfiltered = parse_spec(text.replace('architectures = ["big"]\n', ""))
    assert {j.key for j in spec.jobs} < {j.key for j in unfiltered.jobs}
    with pytest.raises(KfacboundError, match="'huge' are not in the grid"):
        parse_spec(text.replace('["big"]', '["huge"]'))
    with pytest.raises(KfacboundError, match="non-empty list"):
        parse_spec(text.replace('["big"]', '"big"'))


# ---------------------------------------------------------------------------- records


def test_records_tolerate_truncated_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    append_record(path, {"key": "a", "status": "ok", "x": float("nan")})
    with open(path, "ab") as fh:  # a crash in the middle of a line
        fh.write(b'{"key": "b", "status": "o')
    assert [r["key"] for r in read_records(path)] == ["a"]
    assert read_records(path)[0]["x"] is None  # strict JSON: NaN stored as null
    append_record(path, {"key": "c", "status": "ok"})
    assert [r["key"] for r in read_records(path)] == ["a", "c"]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and json.loads(lines[-2])["key"] == "c"


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "results.jsonl"
    big = "x" * 200_000  # larger than a pipe buffer: one write still yields one whole line

    def writer(t):
        for i in range(15):
            append_record(path, {"key": f"{t}-{i}", "status": "ok", "pad": big})

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = [ln for ln in path.read_bytes().split(b"\n") if ln]
    assert len(lines) == 60
    assert sorted(json.loads(ln)["key"] for ln in lines) == sorted(
        f"{t}-{i}" for t in range(4) for i in range(15))
    assert canonical_json({"b": 1, "a": [1.5]}) == '{"a":[1.5],"b":1}'


# ---------------------------------------------------------------------------- running


def test_failure_isolation_and_dependencies_inline(tmp_path):
    spec = parse_spec(spec_text("""
seeds = [0, 13]
datasets = ["digits"]
architectures = [{ arch = "fc", widths = [4] }]
[[analyses]]
kind = "read1"
[[analyses]]
kind = "readall"
[[analyses]]
kind = "echo"
[analyses.grid]
value = [1, 2]
[[analyses]]
kind = "fail"
value = 7
"""))
    out = tmp_path / "out"
    outcome = run_batch(spec, out, executor="inline", progress=False)
    recs = latest_records(out / "results.jsonl")
    assert set(recs) == {j.key for j in spec.jobs}  # every job recorded, failed or not
    by_kind: dict[str, list] = {}
    for job in spec.jobs:
        by_kind.setdefault(job.kind, []).append(recs[job.key])
    # seed 13's train fails: its read1 and the all-seed readall fail as dependency errors
    for rec in by_kind["train"] + by_kind["read1"]:
        assert rec["status"] == ("error" if rec["config"]["seed"] == 13 else "ok")
    assert by_kind["read1"][0]["result"] == {"seeds_read": [0]}
    assert {r["error"]["type"] for r in by_kind["read1"] if r["status"] == "error"} == {
        "DependencyFailed"}
    assert by_kind["readall"][0]["status"] == "error"
    assert "diverged" in by_kind["readall"][0]["error"]["message"]
    assert all(r["status"] == "ok" for r in by_kind["echo"])
    fail = by_kind["fail"]
    assert {r["error"]["type"] for r in fail} == {"ValueError"}
    assert all("boom 7" in r["error"]["message"] and "fail_job" in r["error"]["traceback"]
               for r in fail)
    assert len(outcome.failed) == 1 + 1 + 1 + 2  # train, read1, readall, fail × 2 seeds
    rec = by_kind["echo"][0]
    assert rec["versions"]["torch"] and rec["timing"]["wall_s"] >= 0
    # a rerun keeps the failures (no new records) unless asked to retry them
    n_lines = len(read_records(out / "results.jsonl"))
    again = run_batch(spec, out, executor="inline", progress=False)
    assert len(read_records(out / "results.jsonl")) == n_lines
    assert sorted(again.kept_failed) == sorted(outcome.failed) and again.ran == 0
    retry = run_batch(spec, out, executor="inline", progress=False, retry_failed=True)
    assert retry.ran == len(outcome.failed) - 2  # the 2 dependents of train 13 fail unrun
    assert len(read_records(out / "results.jsonl")) == n_lines + len(outcome.failed)
    # a deleted checkpoint makes its train job (only) run again
    train0 = next(j for j in spec.jobs if j.kind == "train" and j.config["seed"] == 0)
    (out / "checkpoints" / f"{train0.key}.kfb").unlink()
    again = run_batch(spec, out, executor="inline", progress=False)
    assert again.ran == 1 and (out / "checkpoints" / f"{train0.key}.kfb").exists()


def test_cli_exit_code_and_report(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(spec_text("""
name = "cli-test"
[[analyses]]
kind = "echo"
[analyses.grid]
value = [1, 2, 3]
"""))
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(main, ["batch", str(spec_file), "--out", str(out), "--executor",
                               "inline", "--no-progress"])
    assert res.exit_code == 0, res.output
    csv_text = (out / "summary.csv").read_text()
    assert csv_text.splitlines()[0].startswith("key,kind,status,dataset,arch,bn,seed")
    assert "opt.value" in csv_text.splitlines()[0] and len(csv_text.splitlines()) == 4
    report = (out / "report.md").read_text()
    assert "# Batch report: cli-test" in report and "## echo (3 jobs)" in report
    assert 'kind = "echo"' in report  # the spec is in the header
    assert "kfacbound batch" in report
    # add a failing job: exit code 1, failure listed; dry run shows what would run
    spec_file.write_text(spec_file.read_text().replace(
        "[kinds]", "[[analyses]]\nkind = \"fail\"\n\n[kinds]"))
    res = runner.invoke(main, ["batch", str(spec_file), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0 and res.output.count("-> skip") == 3
    assert res.output.count("-> run") == 1
    res = runner.invoke(main, ["batch", str(spec_file), "--out", str(out), "--executor",
                               "inline", "--no-progress"])
    assert res.exit_code == 1
    assert "## Failures" in (out / "report.md").read_text()
    assert "boom" in (out / "report.md").read_text()
    # bad input: exit code 2 with one line
    spec_file.write_text("analyses = ['nope']")
    res = runner.invoke(main, ["batch", str(spec_file), "--out", str(out)])
    assert res.exit_code == 2 and "unknown job kind" in res.output


def test_local_workers_threads_and_worker_death(tmp_path):
    spec = parse_spec(spec_text("""
[[analyses]]
kind = "crash"
[[analyses]]
kind = "sleep"
seconds = 0.3
[analyses.grid]
i = [1, 2, 3]
[[analyses]]
kind = "threads"
"""))
    out = tmp_path / "out"
    outcome = run_batch(spec, out, executor="local", workers=2, threads=1, progress=False)
    recs = latest_records(out / "results.jsonl")
    kinds = {j.key: j.kind for j in spec.jobs}
    assert len(recs) == len(spec.jobs)
    crash = [r for k, r in recs.items() if kinds[k] == "crash"]
    assert crash[0]["status"] == "error" and crash[0]["error"]["type"] == "WorkerDied"
    assert outcome.failed == [crash[0]["key"]]
    # the sleep job in flight with the crash is run again alone and succeeds
    sleeps = [r for k, r in recs.items() if kinds[k] == "sleep"]
    assert [r["status"] for r in sleeps] == ["ok"] * 3
    assert all(r["pid"] != os.getpid() for r in sleeps)  # ran in worker processes
    threads = next(r for k, r in recs.items() if kinds[k] == "threads")
    assert threads["result"] == {"torch_threads": 1, "omp": "1"}


def _count(path: Path) -> int:
    return len(read_records(path)) if path.exists() else 0


def test_resume_after_kill_9(tmp_path):
    n = 8
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(spec_text(f"""
[[analyses]]
kind = "sleep"
seconds = 0.4
[analyses.grid]
i = {list(range(n))}
"""))
    out = tmp_path / "out"
    results = out / "results.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "import sys; from kfacbound.cli import main; sys.exit(main())",
           "batch", str(spec_file), "--out", str(out),
           "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _count(results) < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no record within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _count(results)
    assert 1 <= first < n  # killed mid-run
    time.sleep(1.5)  # an orphaned worker must not write anything behind our back
    assert _count(results) == first
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = read_records(results)
    keys = [r["key"] for r in records]
    assert sorted(keys) == sorted(j.key for j in parse_spec(spec_file.read_text()).jobs)
    assert len(keys) == len(set(keys)) == n  # every job exactly once
    assert all(r["status"] == "ok" for r in records)
    assert sorted(r["result"]["i"] for r in records) == list(range(n))
    # every line is complete JSON
    assert all(json.loads(line) for line in results.read_bytes().splitlines())


def test_second_run_on_same_directory_is_refused(tmp_path):
    from kfacbound.batch.runner import batch_lock

    out = tmp_path / "out"
    out.mkdir()
    spec = parse_spec(spec_text("analyses = ['echo']"))
    with batch_lock(out):
        with pytest.raises(KfacboundError, match="another batch is running"):
            run_batch(spec, out, executor="inline", progress=False)


def test_ray_executor(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is an optional dependency")
    try:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"ray cannot start here: {exc}")
    try:
        spec = parse_spec(spec_text("""
seeds = [0, 1]
datasets = ["digits"]
architectures = [{ arch = "fc", widths = [4] }]
[[analyses]]
kind = "readall"
[[analyses]]
kind = "fail"
[[analyses]]
kind = "echo"
value = 5
"""))
        out = tmp_path / "out"
        outcome = run_batch(spec, out, executor="ray", workers=1, progress=False)
        recs = latest_records(out / "results.jsonl")
        assert len(recs) == len(spec.jobs) == 2 + 1 + 2 + 2
        kinds = {j.key: j.kind for j in spec.jobs}
        for key, rec in recs.items():
            assert rec["status"] == ("error" if kinds[key] == "fail" else "ok"), rec["error"]
            assert rec["pid"] != os.getpid()  # ran in a Ray worker
        readall = next(r for k, r in recs.items() if kinds[k] == "readall")
        assert readall["result"]["seeds_read"] == [0, 1]  # after both train tasks
        assert len(outcome.failed) == 2 and ray.is_initialized()  # our instance left running
    finally:
        ray.shutdown()


def test_missing_analysis_module_is_a_recorded_error(tmp_path):
    spec = parse_spec("""
[[analyses]]
kind = "ghost"
[[analyses]]
kind = "echo"
""" + KINDS.replace("[kinds]", '[kinds]\nghost = "kfacbound.analysis.not_written_yet:run"'))
    outcome = run_batch(spec, tmp_path / "out", executor="inline", progress=False)
    recs = latest_records(tmp_path / "out" / "results.jsonl")
    ghost = next(r for r in recs.values() if r["kind"] == "ghost")
    assert ghost["status"] == "error" and "cannot import" in ghost["error"]["message"]
    assert ghost["error"]["user_error"] is True
    assert next(r for r in recs.values() if r["kind"] == "echo")["status"] == "ok"
    assert outcome.failed == [ghost["key"]]


def test_ray_missing_gives_a_clear_error(monkeypatch):
    from kfacbound.batch.executors import make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(KfacboundError, match=r"pip install 'kfacbound\[ray\]'"):
        make_executor("ray", workers=1)


def test_submit_to_a_pool_broken_by_a_dead_worker(tmp_path):
    """A job submitted after a worker died (pool already broken) still runs."""
    from kfacbound.batch.executors import LocalExecutor

    spec = parse_spec(spec_text("analyses = ['crash', 'echo']"))
    crash, echo = spec.jobs
    ex = LocalExecutor(1, 1)
    try:
        ex.submit(crash, str(tmp_path))
        deadline = time.time() + 120
        while not ex._pool._broken:  # wait until the pool noticed the death
            assert time.time() < deadline
            time.sleep(0.05)
        ex.submit(echo, str(tmp_path))
        records = {}
        while len(records) < 2:
            records.update({job.kind: rec for job, rec in ex.wait()})
    finally:
        ex.close()
    assert records["crash"]["error"]["type"] == "WorkerDied"
    assert records["echo"]["status"] == "ok"


def test_inline_jobs_leave_the_driver_threads_alone(tmp_path):
    import torch

    before = torch.get_num_threads()
    spec = parse_spec(spec_text("analyses = ['threads']"))
    run_batch(spec, tmp_path / "out", executor="inline", threads=before + 1, progress=False)
    rec = next(iter(latest_records(tmp_path / "out" / "results.jsonl").values()))
    assert rec["result"]["torch_threads"] == before + 1 and rec["threads"] == before + 1
    assert torch.get_num_threads() == before


def test_docstring_example_is_a_valid_spec():
    """The format example in kfacbound.batch.spec's docstring parses and expands."""
    import tomllib

    import kfacbound.batch.spec as spec_module

    doc = spec_module.__doc__
    block = doc[doc.index("Format (every"):doc.index("What a job needs")].splitlines()[2:]
    raw = tomllib.loads("\n".join(line[4:] for line in block))
    assert "checkpoints" in raw and raw["kinds"]["score"]["needs"] == "checkpoint"
    raw.pop("checkpoints")  # the example's files do not exist here
    raw["kinds"] = {k: {"entry": f"{HERE}:echo_job", "needs": "none"} for k in raw["kinds"]}
    spec = spec_module.expand_spec(raw)
    assert sorted({j.kind for j in spec.jobs}) == ["bound", "train"]
    assert len([j for j in spec.jobs if j.kind == "bound"]) == 2 * 2 * 2  # seeds×bn×posterior


def test_the_bn_study_keeps_its_job_keys():
    """The BatchNorm study runs over several sessions and resumes by job key: a refactor that
    renames an option or changes a default of train / certify_checkpoint / structure_report
    would silently rerun it from scratch. Changing these keys must be a deliberate decision
    (then update them here and say so in results/README.md)."""
    from pathlib import Path

    from kfacbound.batch.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "scripts" / "specs" / "bn_study.toml")
    def post(j):
        p = j.config["options"].get("posterior")
        return tuple(p) if isinstance(p, list) else p
    keys = {(j.kind, j.config["label"]["arch"], j.config["bn"], j.config.get("seed"), post(j),
             j.config["options"].get("max_examples") or j.config["options"].get("iterations")):
            j.key for j in spec.jobs}
    # 18 trainings, 54 bounds, 12 structure jobs; since the morning of 2026-12-07
    # (results/README.md) 12 certificates with the best recipe of then (MLP-600 and LeNet-5),
    # since its evening 18 with the best recipe of now (Q started at Q = P, 500 steps)
    assert len(spec.jobs) == 114
    assert keys[("train", "mlp-600", False, 0, None, None)].startswith("1889ff8d889e0cf2")
    assert keys[("bound", "mlp-600", False, 0, "diag", 2000)].startswith("8b65e0328969cd9c")
    free = [j.key for j in spec.jobs if j.kind == "bound" and j.config["seed"] == 0
            and j.config["label"]["arch"] == "mlp-600" and not j.config["bn"]
            and j.config["options"]["prior_split"] is None]
    assert free == ["e3c58e197d9c2d0e1a1e986ff0937dba6b35beef2d6ae33445d44d9b29cc6330"]
    assert keys[("structure", "mlp-600", False, None, None, 2000)].startswith("176a3abb383aff63")
    assert keys[("structure", "mlp-600", False, None, None, 8000)].startswith("9e6fe5cf19aa2ca5")
    assert keys[("bound", "mlp-600", False, 0, ("diag", "kfac"), 4000)].startswith("b1d725be3b78")
    assert keys[("bound", "mlp-600", False, 0, ("diag", "kfac"), 500)].startswith("6b63f2d9d5ce")


def test_architecture_train_overrides_and_key_neutral_schedule():
    text = """
seeds = [0]
datasets = ["digits"]
[[architectures]]
arch = "fc"
widths = [8]
train = { epochs = 3, schedule = "cosine" }
[[architectures]]
arch = "fc"
widths = [4]
[train]
epochs = 2
"""
    trains = [j.config for j in parse_spec(text).jobs if j.kind == "train"]
    by_label = {c["label"]["arch"]: c for c in trains}
    assert by_label["fc-8"]["options"]["epochs"] == 3
    assert by_label["fc-8"]["options"]["schedule"] == "cosine"
    assert "_train" not in by_label["fc-8"]["arch"]
    # the constant schedule (the behaviour before the field existed) is left out of the key
    assert by_label["fc-4"]["options"]["epochs"] == 2
    assert "schedule" not in by_label["fc-4"]["options"]
    with pytest.raises(KfacboundError, match="schedule"):
        parse_spec(text.replace('"cosine"', '"linear"'))


def test_mark_stale_retracts_matching_results_which_then_run_again(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(spec_text("""
[[analyses]]
kind = "echo"
[analyses.grid]
value = [1, 2, 3]
"""))
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["batch", str(spec_file), "--out", str(out), "--executor", "inline", "--no-progress"]
    assert runner.invoke(main, args).exit_code == 0
    n_lines = len(read_records(out / "results.jsonl"))
    res = runner.invoke(main, [*args, "--mark-stale", "kind=echo,options.value=2"])
    assert res.exit_code != 0 and "reason" in res.output  # a reason is required
    res = runner.invoke(main, [*args, "--mark-stale", "kind=echo,options.value=2",
                               "--reason", "echo was wrong"])
    assert res.exit_code == 0, res.output
    assert "marked 1 finished result(s) stale" in res.output
    records = read_records(out / "results.jsonl")
    assert len(records) == n_lines + 2  # the retraction, then the job's new result
    stale, rerun = records[-2], records[-1]
    assert stale["status"] == "stale" and stale["stale"]["reason"] == "echo was wrong"
    assert stale["stale"]["where"] == {"kind": "echo", "options.value": 2}
    assert rerun["key"] == stale["key"] and rerun["status"] == "ok"
    assert rerun["result"]["value"] == 2
    assert set(statuses(out).values()) == {"ok"}
    # nothing matches: nothing is marked, nothing runs
    res = runner.invoke(main, [*args, "--mark-stale", "options.value=9", "--reason", "x"])
    assert "marked 0" in res.output and len(read_records(out / "results.jsonl")) == n_lines + 2


def test_new_bound_options_stay_out_of_the_key_at_their_old_behaviour():
    """optimizer / schedule / prior_dropout came after studies were run: at the values that
    reproduce the old behaviour they are not in a bound job's options (so keys are unchanged)
    and the adapter passes them back to certify_checkpoint; other values are in the key."""
    from kfacbound.batch.jobs import get_job_kind

    base = """
seeds = [0]
datasets = ["digits"]
architectures = [{ arch = "fc", widths = [4] }]
[[analyses]]
kind = "bound"
"""
    def bound_options(extra: str) -> dict:
        jobs = parse_spec(base + extra).jobs
        return next(j for j in jobs if j.kind == "bound").config["options"]

    plain = bound_options("")
    assert not {"optimizer", "schedule"} & set(plain)
    assert plain["prior_dropout"] == 0.2  # today's default differs from the old behaviour
    old = bound_options('optimizer = "rmsprop"\nschedule = "step"\nprior_dropout = 0.0')
    assert old == {k: v for k, v in plain.items() if k != "prior_dropout"}
    adam = bound_options('optimizer = "adam"')
    assert adam["optimizer"] == "adam"
    call = get_job_kind("bound").call_options(old)  # absent: the old behaviour, not the default
    assert call["optimizer"] == "rmsprop" and call["schedule"] == "step"
    assert call["prior_dropout"] == 0.0


def test_only_runs_the_matching_jobs_and_what_they_need_and_leaves_the_rest(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(spec_text("""
seeds = [0, 1]
datasets = ["digits"]
architectures = [{ arch = "fc", widths = [4] }]
[[analyses]]
kind = "read1"
[[analyses]]
kind = "echo"
[analyses.grid]
value = [1, 2]
"""))
    jobs = parse_spec(spec_file.read_text()).jobs
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["batch", str(spec_file), "--out", str(out), "--executor", "inline", "--no-progress"]
    res = runner.invoke(main, [*args, "--only", "kind=read1,seed=1"])
    assert res.exit_code == 0, res.output
    ran = {r["key"] for r in read_records(out / "results.jsonl")}
    # the read1 job of seed 1, and the training of seed 1 it needs: nothing else
    expected = {j.key for j in jobs if j.config.get("seed") == 1 and j.kind in ("read1", "train")}
    assert ran == expected and len(expected) == 2
    assert f"{len(jobs) - 2} left for a later run" in res.output
    # the batch's keys still cover the whole grid (its report shows what is missing)
    assert json.loads((out / "batch.json").read_text())["keys"] == [j.key for j in jobs]
    # dry run: the matching, unfinished jobs run, the others wait
    res = runner.invoke(main, [*args, "--dry-run", "--only", "kind=echo,options.value=2"])
    actions = [line.split("-> ")[-1] for line in res.output.splitlines() if "-> " in line]
    echo2 = [j for j in jobs if j.kind == "echo" and j.config["options"]["value"] == 2]
    assert echo2 and not any(j.needs for j in echo2)  # echo needs no checkpoint
    assert actions.count("skip") == 2 and actions.count("run") == len(echo2)
    assert actions.count("later") == len(jobs) - 2 - len(echo2)
    res = runner.invoke(main, [*args, "--only", "kind=echo", "--only", "options.value=7"])
    assert res.exit_code == 2 and "no job of the spec matches 'options.value=7'" in res.output
    res = runner.invoke(main, [*args, "--only", ""])
    assert res.exit_code == 2 and "at least one" in res.output
    assert runner.invoke(main, args).exit_code == 0  # the rest runs later
    assert set(statuses(out)) == {j.key for j in jobs}


def test_select_jobs_closes_over_needs_transitively():
    from kfacbound.batch.records import Job
    from kfacbound.batch.runner import select_jobs

    jobs = [Job("a", {"kind": "train", "seed": 0}),
            Job("b", {"kind": "curvature", "needs": ["a"]}),
            Job("c", {"kind": "report", "needs": ["b"], "options": {"k": 3}}),
            Job("d", {"kind": "train", "seed": 1})]
    assert select_jobs(jobs, [{"options.k": 3}]) == {"a", "b", "c"}  # c needs b needs a
    assert select_jobs(jobs, [{"seed": 1}, {"kind": "curvature"}]) == {"a", "b", "d"}
    assert select_jobs(jobs, [{"kind": "nothing"}]) == set()
    assert select_jobs(jobs, []) == {"a", "b", "c", "d"}  # no filter: everything


def test_recipe_trials_is_read_checked_and_recorded(tmp_path):
    from kfacbound.batch import parse_spec, run_batch

    base = 'name = "t"\n[[datasets]]\nname = "digits"\nsubset = 40\n[[architectures]]\n' \
           'arch = "fc"\nwidths = [3]\n[train]\nepochs = 1\n'
    assert parse_spec(base).recipe_trials == 1
    spec = parse_spec("recipe_trials = 3500\n" + base)
    assert spec.recipe_trials == 3500
    # not part of any job key: the same jobs as without it
    assert [j.key for j in spec.jobs] == [j.key for j in parse_spec(base).jobs]
    for bad in ("0", "2.5", "true", '"10"'):
        with pytest.raises(KfacboundError, match="recipe_trials"):
            parse_spec(f"recipe_trials = {bad}\n" + base)
    run_batch(spec, tmp_path, executor="inline", threads=1, progress=False)
    assert json.loads((tmp_path / "batch.json").read_text())["recipe_trials"] == 3500
