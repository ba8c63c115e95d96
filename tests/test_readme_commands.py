"""Every command README.md and the manual (docs/*.md) show, run as the process a user starts, shrunk to seconds.

The commands are read from README.md, docs/*.md and the notebooks when the tests are collected, so a line added
to any of them is a test with no edit here (a command written the same way on several pages runs once). A command is a line of a fenced code block (a leading `$ ` prompt dropped)
that starts with `python train.py`, `python evaluate.py`, `python -m ddpmlab` or `make `; in a notebook, a `!`
line or a line of a `%%bash` cell that does. Each is its own test id.

The README's comment after a command can say two things:
  `# exit N ...`      the command ends with exit code N (default 0): bad-input examples say `exit 2`.
  `# needs: WHAT ...` it needs what CI has not (gpu, internet, cifar10, slurm): its overrides are composed with
                      Hydra's `--cfg all` (a multirun's first job, as Hydra takes `--cfg` only without `-m`)
                      and, once that succeeds, the test is reported skipped with WHAT as the reason (`pytest -ra`).

Shrinking: arguments are appended after the README's own (Hydra and argparse keep the last value), and a
placeholder (`ckpt=...`, `<run>`, `PATH`) gets a file made once per session:
  train.py      experiment=smoke unless the line picks an experiment (then that one runs), trainer.max_steps=2
                (4 when resuming the shared 2-step checkpoint), data.batch_size=4, callbacks.sample_grid=null,
                val/bpd on 8 test images from 2 KL terms (an experiment's own 256 x 11 network calls took a minute);
                a search (hparams_search=) 2 trials; hydra.run.dir, hydra.sweep.dir and paths.log_dir in the
                command's own folder, where `ckpt_path=last` finds a copy of the shared run.
  evaluate.py   the shared smoke checkpoint, data_root = a Fashion-MNIST-format folder of 256 train / 16 test
                images (classifier, Inception conversion and reference statistics are made there once),
                num_samples=6, reference_images=16, nll.num_images=2, nll_estimate.num_images=4 with 2 t each,
                nll_ode.num_images=2; `sweep_dir=<...>` a two-run smoke sweep (the paper's Table 2's mu~ and eps
                L_simple cells), trained once, when a command first asks for it.
  python -m ddpmlab.models.classifier   --root (the small data) --epochs 1.
  python -m ddpmlab.bench               one round of everything at batch 2 (flags before any `--`).
  make train    make -C <repo> -o .venv/.installed-stamp train ARGS="<train.py's shrinking>": `-o` keeps a test
                from reinstalling the environment it runs in (`make test` has just done the set-up).
  make test     the same, with ARGS naming one fast test file instead of the suite (which this test is in).
  make eval     the same, with evaluate.py's shrinking in ARGS; its `ckpt=last` finds a copy of the shared run as
                the newest run of task `train` under paths.log_dir.
  make X        any other target only as `make -n` (a dry run: `make clean` would delete the environment).
The commands run two at a time (one per core of the CI machine), each in its own folder; evaluate.py's in two
lanes with a data root each (their caches), the rest shared between the lanes.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpmlab.training import train
from tests.conftest import ROOT, compose_config
from tests.test_data import write_mnist_like

pytestmark = pytest.mark.slow

PROGRAMS = ("python train.py", "python evaluate.py", "python -m ddpmlab", "make ")
NEEDS = re.compile(r"needs: ([\w-]+(?:, *[\w-]+)*)")
EXIT = re.compile(r"\bexit (\d+)\b")
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|^[A-Z][A-Z_]+$")

TRAIN_SHRINK = ["data.batch_size=4", "callbacks.sample_grid=null", "val.num_images=8", "val.timesteps=2"]
SHARED_STEPS = 2  # the shared checkpoint's steps; a resume trains 2 more
EVAL_SHRINK = ["num_samples=6", "reference_images=16", "nll.num_images=2", "nll_estimate.num_images=4",
               "nll_estimate.timesteps=2", "nll_ode.num_images=2"]
MAKE_TEST_ARGS = "tests/test_schedules.py -q -p no:cacheprovider"


@dataclass(frozen=True)
class Command:
    where: str         # file:line
    line: str          # as written, without its comment
    exit_code: int     # what it must end with
    needs: str | None  # what CI cannot have: composed, not run


def _parse(lines: list[tuple[int, str]], name: str) -> list[Command]:
    commands = []
    for number, text in lines:
        line, comment = re.fullmatch(r"(.*?)(?:\s+#\s(.*))?", text.strip().removeprefix("$ ")).groups()
        if line.startswith(PROGRAMS):
            needs, code = NEEDS.search(comment or ""), EXIT.search(comment or "")
            commands.append(Command(f"{name}:{number}", line, int(code.group(1)) if code else 0,
                                    needs.group(1) if needs else None))
    return commands


def readme_commands() -> list[Command]:
    """Every command of README.md, of the manual's pages (docs/*.md) and of the notebooks; a command written the
    same way in several places is run once, under its first place. docs/conditioning.md's need a class-conditional
    run: tests/test_conditioning_docs.py runs them."""
    commands = []
    for page in [ROOT / "README.md", *sorted(set((ROOT / "docs").glob("*.md")) - {ROOT / "docs" / "conditioning.md"})]:
        lines, in_block = [], False
        for number, text in enumerate(page.read_text().splitlines(), 1):
            if text.lstrip().startswith("```"):
                in_block = not in_block
            elif in_block:
                lines.append((number, text))
        commands += _parse(lines, str(page.relative_to(ROOT)))
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for number, cell in enumerate(json.loads(notebook.read_text())["cells"], 1):
            source = "".join(cell["source"]).splitlines() if cell["cell_type"] == "code" else []
            shell = source[1:] if source[:1] == ["%%bash"] else [s[1:] for s in source if s.startswith("!")]
            commands += _parse([(number, s) for s in shell], f"{notebook.name} cell")
    unique = {}
    for command in commands:
        unique.setdefault((command.line, command.exit_code, command.needs), command)
    return list(unique.values())


@dataclass
class Shared:
    run: Path     # a smoke run folder (task `smoke`) with checkpoints/last.ckpt
    data: Path    # a small Fashion-MNIST-format data root
    images: Path  # a folder of PNG images


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("readme")
    run = root / "smoke" / "shared_run"
    train(compose_config("experiment=smoke", *TRAIN_SHRINK, f"trainer.max_steps={SHARED_STEPS}", output_dir=run))
    write_mnist_like(root / "data" / "FashionMNIST" / "raw", n_train=256, n_test=16)  # 2 classifier batches
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    return Shared(run, root / "data", root / "images")


def _fill(token: str, shared: Shared) -> str:
    """A placeholder value -> the session's file for that key."""
    key, eq, value = token.partition("=")
    if not eq or not PLACEHOLDER.search(value):
        return token
    files = {"ckpt": shared.run / "checkpoints" / "last.ckpt", "ckpt_path": shared.run / "checkpoints" / "last.ckpt",
             "init_from": shared.run / "checkpoints" / "last.ckpt", "data.root": shared.images,
             "data_root": shared.data, "sweep_dir": _sweep}
    known = files.get(key.lstrip("+"))
    known = known(shared) if callable(known) else known
    return f"{key}={known}" if known else token  # unknown: as written, so its failure shows the line


def _sweep(shared: Shared) -> Path:
    """A two-run smoke multirun (Table 2's mu~ and eps L_simple cells), made the first time a command needs one."""
    sweep = shared.run.parent.parent / "sweep"
    if sweep.is_dir():
        return sweep
    done = _run([sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke", "diffusion.prediction=mean,eps",
                 *TRAIN_SHRINK, f"trainer.max_steps={SHARED_STEPS}", f"hydra.sweep.dir={sweep}",
                 f"paths.log_dir={sweep.parent / 'sweep_logs'}"], sweep.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return sweep


def _train_args(tokens: list[str], tmp: Path, shared: Shared) -> list[str]:
    resumes = any(t.startswith(("ckpt_path=", "+ckpt_path=")) for t in tokens)
    if "ckpt_path=last" in tokens:  # the newest run of task smoke under paths.log_dir: a copy of the shared one
        shutil.copytree(shared.run, tmp / "logs" / "smoke" / shared.run.name)
    experiment = [] if any(t.lstrip("+").startswith("experiment=") for t in tokens) else ["experiment=smoke"]
    searches = any(t.startswith("hparams_search=") for t in tokens)
    return [*experiment, *TRAIN_SHRINK, f"trainer.max_steps={SHARED_STEPS + 2 if resumes else 2}",
            *(["hydra.sweeper.n_trials=2"] if searches else []), *_hydra_paths(tmp)]


def _hydra_paths(tmp: Path) -> list[str]:
    return [f"hydra.run.dir={tmp / 'run'}", f"hydra.sweep.dir={tmp / 'sweep'}", f"paths.log_dir={tmp / 'logs'}"]


def _module_args(module: str, tmp: Path, shared: Shared) -> list[str]:
    return {"ddpmlab.models.classifier": ["--root", str(shared.data), "--epochs", "1"],
            "ddpmlab.bench": ["--preset", "fashion_mnist", "--batch", "2", "--rounds", "1", "--warmup", "1",
                              "--block", "1", "--sample-steps", "1", "--nll-terms", "1", "--full-steps", "1",
                              "--out", str(tmp / "bench.json")]}.get(module, [])


def argv(command: Command, tmp: Path, shared: Shared) -> list[str]:
    """The README line as the process this test starts: shrunk, in tmp, or composed only."""
    tokens = [_fill(t, shared) for t in shlex.split(command.line)]
    if tokens[0] == "make":
        return _make_argv(tokens[1:], tmp, shared)
    if tokens[1] == "-m":
        module, rest = tokens[2], tokens[3:]
        extra = _module_args(module, tmp, shared)
        cut = rest.index("--") if "--" in rest else len(rest)
        return [sys.executable, "-m", module, *rest[:cut], *extra, *rest[cut:]]
    script, overrides = tokens[1], tokens[2:]
    if command.needs:
        return [sys.executable, str(ROOT / script), *_first_job(overrides), *_hydra_paths(tmp), "--cfg", "all"]
    shrink = _train_args(overrides, tmp, shared) if script == "train.py" else [
        f"data_root={shared.data}", *EVAL_SHRINK, *_hydra_paths(tmp)]
    return [sys.executable, str(ROOT / script), *overrides, *shrink]


def _first_job(overrides: list[str]) -> list[str]:
    """A multirun's overrides as its first job's: no -m, the first value of each `a,b,c` sweep."""
    first = lambda o: o if "[" in o or "(" in o else re.sub(r"=([^,]*),.*", r"=\1", o)  # noqa: E731
    return [first(o) for o in overrides if o not in ("-m", "--multirun")]


def _make_argv(tokens: list[str], tmp: Path, shared: Shared) -> list[str]:
    targets = [t for t in tokens if "=" not in t]
    make = ["make", "-C", str(ROOT), "-o", ".venv/.installed-stamp"]
    if targets == ["train"]:
        args = next((shlex.split(t.partition("=")[2]) for t in tokens if t.startswith("ARGS=")), [])
        args = [_fill(a, shared) for a in args]
        return [*make, "train", f"ARGS={shlex.join(args + _train_args(args, tmp, shared))}"]
    if targets == ["test"]:
        return [*make, "test", f"ARGS={MAKE_TEST_ARGS}"]
    if targets == ["eval"]:
        shutil.copytree(shared.run, tmp / "logs" / "train" / shared.run.name)
        return [*make, "eval", f"ARGS={shlex.join([f'data_root={shared.data}', *EVAL_SHRINK, *_hydra_paths(tmp)])}"]
    return [*make, "-n", *tokens]


COMMANDS = readme_commands()


def test_the_readme_shows_commands_of_every_kind():
    """The parser finds the README's commands: a README reorganised past its reach fails here, not silently."""
    lines = [c.line for c in COMMANDS]
    for start in PROGRAMS:
        assert any(line.startswith(start) for line in lines), start
    assert any(c.needs for c in COMMANDS) and any(c.exit_code for c in COMMANDS)


def _composed_only(command: Command) -> bool:
    return bool(command.needs) and command.line.startswith(("python train.py", "python evaluate.py"))


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


EVALUATES = ("python evaluate.py", "python -m ddpmlab.models", "make eval")


@pytest.fixture(scope="session")
def started(request, shared: Shared, tmp_path_factory):
    """The selected commands, started at once, two at a time (one per core), in two lanes. evaluate.py and the
    classifier write caches under their data root (the classifier, the Inception conversion, reference features),
    so each lane has a data root of its own and runs its half of them one after another, then takes the other
    commands from a common queue."""
    selected = [item.callspec.params["command"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_readme_command"]
    lanes = []
    for lane in range(2):
        data = tmp_path_factory.mktemp(f"lane{lane}") / "data"
        shutil.copytree(shared.data, data)
        lanes.append(Shared(shared.run, data, shared.images))
    runnable = [c for c in selected if not c.needs or _composed_only(c)]
    evaluations = [c for c in runnable if c.line.startswith(EVALUATES)]
    chains = [evaluations[lane::2] for lane in range(2)]
    jobs = {}
    for command in runnable:
        lane = next((i for i, chain in enumerate(chains) if command in chain), 0)
        tmp = tmp_path_factory.mktemp("command")
        jobs[command] = (argv(command, tmp, lanes[lane]), tmp)
    futures = {c: Future() for c in jobs}
    others = [c for c in jobs if c not in evaluations]
    lock = threading.Lock()

    def run(command):
        try:
            futures[command].set_result(_run(*jobs[command]))
        except Exception as err:  # a timeout: its test reports it
            futures[command].set_exception(err)

    def lane_worker(chain):
        for command in chain:
            run(command)
        while True:
            with lock:
                if not others:
                    return
                command = others.pop(0)
            run(command)

    pool = ThreadPoolExecutor(2)
    for chain in chains:
        pool.submit(lane_worker, chain)
    yield {c: (args, futures[c]) for c, (args, tmp) in jobs.items()}
    with lock:
        others.clear()
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: re.sub(r"\s+", " ", c.line))
def test_readme_command(command: Command, started):
    if command not in started:
        pytest.skip(f"needs {command.needs}: not run ({command.where})")
    args, future = started[command]
    done = future.result()
    expected = 0 if command.needs else command.exit_code
    assert done.returncode == expected, (f"{command.where}: {command.line}\nran: {shlex.join(args)}\n"
                                         f"exit {done.returncode}, README says {expected}\n{done.stderr[-3000:]}")
    if command.needs:
        pytest.skip(f"needs {command.needs}: composed with --cfg all, not run ({command.where})")
