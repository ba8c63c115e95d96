"""The config schema (ddpmlab.schema): every key the YAML files compose has a rule, and a bad value of any key,
of the wrong type or out of range, ends train.py or evaluate.py before anything is built: one line on stderr,
exit 2, no traceback, no run folder left.

The sweep is generated: every option of every group is composed once, and each key it holds gets a value of
another type and a value of its type that its rule refuses, so a new key is swept as soon as it has a rule.
Each case is a process of its own running the entry point as `python train.py ... key=value` does; to keep
~400 of them within a CI budget a helper process (this file run as a script) imports Hydra once and forks
one child per case, two at a time, each executing the script as __main__ with its own argv.
"""

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from ddpmlab import schema

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DDPMLAB_ROOT", str(ROOT))
# Groups whose options add or drop keys; `hydra` is Hydra's own, experiment presets only set values.
TRAIN_GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name not in ("hydra",))
EVAL_GROUPS = ["logger"]
WRONG_TYPE = ["xyz", "5", "[5]", "{a: 5}"]
OUT_OF_RANGE = ["-1", "0", "1000000000", "1.5", "-0.5", "''", "bogus", "[-1,-1]", "[]"]


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "/placeholder/run"  # ${hydra:runtime.output_dir} resolves only inside a run
    return cfg


@cache
def compositions(config_name: str) -> dict[str, dict[str, object]]:
    """{group option ("" for the default config): {key: value}}, each option of each group composed alone."""
    groups = TRAIN_GROUPS if config_name == "config" else EVAL_GROUPS
    options = [""] + [f"{g}={p.stem}" for g in groups for p in sorted((ROOT / "conf" / g).glob("*.yaml"))]
    return {option: dict(schema.leaves(_compose(config_name, [option] if option else []))) for option in options}


@cache
def composed_keys(config_name: str) -> dict[str, tuple[str, object]]:
    """{key: (the group option it is first found under, its value there)}."""
    found = {}
    for option, values in compositions(config_name).items():
        for key, value in values.items():
            found.setdefault(key, (option, value))
    return found


def _parse(text: str):
    return OverridesParser.create().parse_override(f"k={text}").value()


def _kind(value) -> str:
    if value is None or value is schema.MISSING:
        return "none"
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def bad_values(rule: schema.Rule, default) -> list[str]:
    """A value of another type than the default's that the rule refuses, and one of the same type (out of range,
    or not among the choices) that it refuses, where such values exist (a flag has no range)."""
    wrong = next((t for t in WRONG_TYPE if not rule.accepts(_parse(t)) and _kind(_parse(t)) != _kind(default)), None)
    out = next((t for t in OUT_OF_RANGE if t != wrong and not rule.accepts(_parse(t))
                and _kind(default) in ("none", _kind(_parse(t)))), None)
    return [v for v in (wrong, out) if v is not None]


def sweep_cases(script: str, tmp: Path) -> list[dict]:
    config_name, rules = ("config", schema.TRAIN) if script == "train" else ("eval", schema.EVAL)
    composed = compositions(config_name)
    cases = []
    for key, (option, default) in composed_keys(config_name).items():
        rule = schema.rule_for(rules, key)
        # what the option leaves unset (data=image_folder's data.root, evaluate's ckpt) gets a placeholder: every
        # rule is checked before a folder or the checkpoint is read
        needed = [f"{k}={tmp / 'absent'}" for k, v in composed[option].items() if v is schema.MISSING and k != key]
        base = ([option] if option else []) + needed
        if script == "train" and not option.startswith("experiment="):
            base.append("experiment=smoke")  # if a value were let through, the run would be seconds, not minutes
        for value in bad_values(rule, default) if rule else []:
            run_dir = tmp / f"run_{len(cases)}"
            cases.append({"key": key, "value": value, "run_dir": str(run_dir),
                          "argv": [str(ROOT / f"{script}.py"), *base, f"{key}={value}", f"hydra.run.dir={run_dir}"]})
    return cases


def _env(**extra: str) -> dict:
    """The environment of a user's shell (no HYDRA_FULL_ERROR unless given), one thread per process."""
    return {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore", **extra}


def run_cases(cases: list[dict], tmp: Path) -> list[dict]:
    """Each case's exit code and stderr, from the forking helper (this file as a script)."""
    (tmp / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, __file__, str(tmp / "cases.json")], cwd=tmp, env=_env(), check=True, timeout=900)
    return json.loads((tmp / "cases.json").read_text())


@pytest.mark.parametrize("config_name", ["config", "eval"])
def test_every_composed_key_has_a_rule(config_name):
    rules = schema.TRAIN if config_name == "config" else schema.EVAL
    missing = sorted(key for key in composed_keys(config_name) if schema.rule_for(rules, key) is None)
    assert not missing, f"keys without a rule in src/ddpmlab/schema.py: {missing}"


def test_the_generator_finds_a_bad_value_for_every_key():
    """A refused value of another type for every key (and of its own type where the rule has a range or choices),
    so the sweep below covers every key."""
    for script, config_name, rules in (("train", "config", schema.TRAIN), ("evaluate", "eval", schema.EVAL)):
        for key, (_, default) in composed_keys(config_name).items():
            rule = schema.rule_for(rules, key)  # a key without one fails the test above
            assert rule is None or bad_values(rule, default), (script, key)


def test_the_schemas_names_are_the_codes():
    from ddpmlab.diffusion.samplers import SAMPLERS
    from ddpmlab.evaluation import METRICS
    from ddpmlab.figures import FIGURES
    from ddpmlab.table2 import TABLES

    assert set(schema.SAMPLERS) == set(SAMPLERS) and set(schema.METRICS) == set(METRICS)
    assert schema.FIGURES == tuple(FIGURES) and schema.TABLES == TABLES


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train", "evaluate"])
def test_every_bad_value_ends_in_one_line_exit_2_and_leaves_nothing(tmp_path, script):
    cases = sweep_cases(script, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    results = run_cases(cases, tmp_path)
    failures = []
    for case in results:
        lines = [line for line in case["stderr"].splitlines() if line.strip()]
        ok = (case["code"] == 2 and len(lines) == 1 and lines[0].startswith(f"error: {case['key']}")
              and "Traceback" not in case["stderr"] and not Path(case["run_dir"]).exists())
        if not ok:
            failures.append(f"{case['key']}={case['value']}: exit {case['code']}, {case['stderr'][-300:]!r}")
    assert not failures, f"{len(failures)} of {len(results)} cases:\n" + "\n".join(failures)
    assert [p for p in tmp_path.rglob("*") if p not in before and p.name != "cases.json"] == []


def _run(script: str, *args: str, cwd: Path, python: tuple = (), **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python, str(ROOT / f"{script}.py"), *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=600)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_a_sample_grid_with_more_steps_than_t_is_refused_before_step_1(tmp_path):
    """`python train.py schedule.timesteps=50` trained until its first grid (sampling_steps=100 > T), then lost
    the run; it is now refused before anything is built, and torch is not even imported."""
    result = _run("train", "schedule.timesteps=50", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                  python=("-X", "importtime"))
    line = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 2 and line == [
        "error: callbacks.sample_grid.sampling_steps must be at most schedule.timesteps=50, got 100: set "
        "callbacks.sample_grid.sampling_steps=50 (or fewer), or callbacks.sample_grid.sampling_steps=null for all "
        "T steps"], result.stderr[-2000:]
    assert "| torch\n" not in result.stderr and "| lightning\n" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(("override", "start"), [
    ("resume.allow_changes=5", "error: resume.allow_changes must be a list of values, each a non-empty string, got 5"),
    ("no_such_key=1", "error: Could not override 'no_such_key'. To append to your config use +no_such_key=1"),
    ("model=transformer", "error: In 'config': Could not find 'model/transformer' Available options in 'model':"),
    ("optim.lr=[1", "error: no viable alternative at input '[1'"),
], ids=["allow_changes_not_a_list", "unknown_key", "unknown_option", "malformed_override"])
def test_a_bad_override_or_a_value_hydra_took_is_one_line(tmp_path, override, start):
    """resume.allow_changes=5 was a TypeError traceback (exit 1); Hydra's own reports were several lines."""
    line = _one_error_line(_run("train", override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path))
    assert line.startswith(start)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_what_a_library_raises_during_setup_is_one_line_naming_the_key_and_the_trace_stays_available(tmp_path):
    """An argument Lightning's Trainer does not take (the schema lets trainer.* through to it) fails in Hydra's
    instantiate: one line naming trainer.foo, exit 2; HYDRA_FULL_ERROR=1 gives Hydra's full trace."""
    args = ("experiment=smoke", "+trainer.foo=1", f"paths.log_dir={tmp_path / 'logs'}")
    line = _one_error_line(_run("train", *args, cwd=tmp_path))
    assert line.startswith("error: trainer.foo=1 failed while setting up, before the first step: TypeError: ")
    assert "unexpected keyword argument 'foo'" in line and not any((tmp_path / "logs" / "smoke").iterdir())
    full = _run("train", *args, cwd=tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr and "unexpected keyword argument 'foo'" in full.stderr


def _fork_each(cases_file: str) -> None:
    """Run every case of `cases_file` in a forked child that executes its script as __main__ with the case's argv
    (as `python script args` would, after the imports this process has already made); two children at a time.
    Writes each case's exit code and stderr back into the file."""
    import runpy
    import tempfile

    import hydra  # noqa: F401  what every child needs, imported once here
    from hydra.core.plugins import Plugins

    import ddpmlab.cli  # noqa: F401

    Plugins.instance()  # Hydra's plugin scan, once
    cases = json.loads(Path(cases_file).read_text())
    running: dict[int, tuple[dict, str]] = {}
    pending = list(cases)
    while pending or running:
        while pending and len(running) < 2:
            case = pending.pop(0)
            err = tempfile.mkstemp(prefix="stderr_")[1]
            pid = os.fork()
            if pid == 0:
                fd = os.open(err, os.O_WRONLY)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                sys.argv = case["argv"]
                code = 0
                try:
                    runpy.run_path(case["argv"][0], run_name="__main__")
                except SystemExit as exit_:
                    code = exit_.code if isinstance(exit_.code, int) else 1
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                sys.stderr.flush()
                os._exit(code)
            running[pid] = (case, err)
        pid, status = os.wait()
        case, err = running.pop(pid)
        case["code"] = os.waitstatus_to_exitcode(status)
        case["stderr"] = Path(err).read_text()
        os.unlink(err)
    Path(cases_file).write_text(json.dumps(cases))


if __name__ == "__main__":
    _fork_each(sys.argv[1])
