"""Every command docs/conditioning.md shows, run as the process a user starts, shrunk to seconds as
tests/test_readme_commands.py shrinks README.md's (same parser, placeholders and `# exit N` / `# needs:` comments),
with a class-conditional smoke run as the shared checkpoint and class folders as the shared images."""

import re
import shlex
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from ddpmlab.training import train
from tests.conftest import ROOT, compose_config
from tests.test_data import write_mnist_like
from tests.test_readme_commands import (SHARED_STEPS, TRAIN_SHRINK, Shared, _composed_only, _parse, _run, argv,
                                        readme_commands)

pytestmark = pytest.mark.slow
PAGE = ROOT / "docs" / "conditioning.md"


def page_commands():
    """The page's commands, each once; a train.py line the README's test runs already (the same process: the shared
    checkpoint matters only to evaluate.py) is left to it."""
    lines, in_block = [], False
    for number, text in enumerate(PAGE.read_text().splitlines(), 1):
        if text.lstrip().startswith("```"):
            in_block = not in_block
        elif in_block:
            lines.append((number, text))
    elsewhere = {(c.line, c.exit_code, c.needs) for c in readme_commands() if c.line.startswith("python train.py")}
    unique = {}
    for command in _parse(lines, PAGE.name):
        if (command.line, command.exit_code, command.needs) not in elsewhere:
            unique.setdefault((command.line, command.exit_code, command.needs), command)
    return list(unique.values())


COMMANDS = page_commands()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every runnable command's process, two at a time; evaluate.py's and the classifier's one after another (they
    share the data root's classifier and feature caches)."""
    root = tmp_path_factory.mktemp("conditioning_docs")
    run = root / "smoke" / "shared_run"
    train(compose_config("experiment=smoke", "model.num_classes=10", *TRAIN_SHRINK, f"trainer.max_steps={SHARED_STEPS}",
                         output_dir=run))
    write_mnist_like(root / "data" / "FashionMNIST" / "raw", n_train=256, n_test=16)
    rng = np.random.default_rng(0)
    for name in ("boots", "shirts", "bags"):  # three classes of 4 images each
        (root / "images" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / name / f"{i}.png")
    shared = Shared(run, root / "data", root / "images")
    jobs = {}
    for command in COMMANDS:
        if not command.needs or _composed_only(command):
            tmp = tmp_path_factory.mktemp("command")
            jobs[command] = (argv(command, tmp, shared), tmp)
    evaluations = [c for c in jobs if c.line.startswith(("python evaluate.py", "python -m ddpmlab.models"))]
    with ThreadPoolExecutor(2) as pool:
        chain = pool.submit(lambda: {c: _run(*jobs[c]) for c in evaluations})
        others = {c: pool.submit(_run, *jobs[c]) for c in jobs if c not in evaluations}
        done = {**chain.result(), **{c: f.result() for c, f in others.items()}}
    return {c: (jobs[c][0], done[c]) for c in jobs}


def test_the_page_shows_train_evaluate_and_refused_commands():
    lines = [c.line for c in COMMANDS]
    assert any(line.startswith("python train.py experiment=cfg_fashion_mnist") for line in lines)  # with overrides
    assert any("guidance_scale=[0,0.5,1,2,4]" in line for line in lines) and any(c.exit_code == 2 for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: re.sub(r"\s+", " ", c.line))
def test_conditioning_page_command(command, results):
    if command not in results:
        pytest.skip(f"needs {command.needs}: not run ({command.where})")
    args, done = results[command]
    expected = 0 if command.needs else command.exit_code
    assert done.returncode == expected, (f"{command.where}: {command.line}\nran: {shlex.join(args)}\n"
                                         f"exit {done.returncode}, the page says {expected}\n{done.stderr[-3000:]}")
    if command.needs:
        pytest.skip(f"needs {command.needs}: composed with --cfg all, not run ({command.where})")
