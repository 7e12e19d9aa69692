"""Tasks: loading from files, modules and names; clear errors; built-in tasks and their cache."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from autoprune.errors import TaskError, UsageError
from autoprune.finetune import FinetuneSettings
from autoprune.task import TASK_EXAMPLE, Metric, Task, accuracy, load_task
from autoprune.tasks import _cache, digits, get_task, list_tasks, register_task, sequences

TINY_DIGITS = {"widths": (8, 16, 32, 64), "epochs": 1}  # trains in seconds

GOOD_TASK = """\
import torch
from torch.utils.data import DataLoader, TensorDataset

from autoprune.task import Task, accuracy

WIDTH = 16


def make_task(width: int = WIDTH) -> Task:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    return Task(
        name="file_task",
        build_model=lambda: torch.nn.Sequential(
            torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2)
        ).eval(),
        example_inputs=(torch.randn(1, 4),),
        train_data=DataLoader(TensorDataset(x, y), 16, shuffle=True, generator=g),
        val_data=DataLoader(TensorDataset(x, y), 32),
        metric=accuracy(),
    )


def other_task() -> Task:
    task = make_task()
    task.name = "other"
    return task
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# ----------------------------------------------------------------------------- loading


def test_load_from_file_path(tmp_path):
    path = write(tmp_path / "my_task.py", GOOD_TASK)
    task = load_task(f"{path}:make_task")
    assert isinstance(task, Task) and task.name == "file_task"
    model = task.build_model()
    assert model[0].out_features == 16
    assert model(*task.example_inputs).shape == (1, 2)
    # The function name defaults to make_task; another function is named after the colon.
    assert load_task(str(path)).name == "file_task"
    assert load_task(f"{path}:other_task").name == "other"


def test_load_passes_overrides_to_the_factory(tmp_path):
    path = write(tmp_path / "my_task.py", GOOD_TASK)
    assert load_task(f"{path}:make_task", width=5).build_model()[0].out_features == 5
    with pytest.raises(TaskError, match=r"does not accept option\(s\) depth; it takes: width"):
        load_task(f"{path}:make_task", depth=3)


def test_two_files_with_the_same_name_do_not_clash(tmp_path):
    a = write(tmp_path / "a" / "task.py", GOOD_TASK)
    b = write(tmp_path / "b" / "task.py", GOOD_TASK.replace("WIDTH = 16", "WIDTH = 7"))
    ta, tb = load_task(str(a)), load_task(str(b))
    assert ta.build_model()[0].out_features == 16 and tb.build_model()[0].out_features == 7


def test_load_from_relative_path(tmp_path, monkeypatch):
    write(tmp_path / "rel_task.py", GOOD_TASK)
    monkeypatch.chdir(tmp_path)
    assert load_task("rel_task.py:make_task").name == "file_task"


def test_load_from_module_path(tmp_path, monkeypatch):
    write(tmp_path / "autoprune_test_user_tasks.py", GOOD_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("autoprune_test_user_tasks:other_task")
    assert task.name == "other"
    assert load_task("autoprune_test_user_tasks").name == "file_task"  # make_task by default


def test_load_builtin_by_name_and_by_module(digits_cache):
    assert {"digits", "sequences"} <= set(list_tasks())
    by_name = load_task("digits", **TINY_DIGITS, cache_dir=digits_cache)
    by_module = load_task(
        "autoprune.tasks.digits:make_task", **TINY_DIGITS, cache_dir=digits_cache
    )
    assert by_name.name == by_module.name == "digits"
    assert by_name.example_inputs[0].shape == (1, 1, 32, 32)
    assert by_name.metric.name == "accuracy" and by_name.metric.direction == "maximize"
    with pytest.raises(TaskError, match=r"does not accept option\(s\) width; its options: "):
        load_task("digits", width=3)


def test_builtin_tasks_build_their_architecture_without_training(tmp_path):
    """What a Ray worker builds before it loads the driver's weights: no training, no cache."""
    for name, options in (("digits", TINY_DIGITS), ("sequences", {})):
        task = load_task(name, **options, cache_dir=tmp_path / name)
        model = task.build_architecture()
        assert model(*task.example_inputs).shape == (1, 10)
        assert not (tmp_path / name).exists()


def test_register_task_adds_a_builtin(tmp_path):
    path = write(tmp_path / "t.py", GOOD_TASK)

    @register_task("test_registered_task")
    def make(width: int = 4) -> Task:
        return load_task(str(path), width=width)

    assert "test_registered_task" in list_tasks()
    assert get_task("test_registered_task", width=3).build_model()[0].out_features == 3
    with pytest.raises(ValueError, match="already registered"):
        register_task("test_registered_task")(lambda: None)


# ----------------------------------------------------------------------------- errors

BAD_TASKS = {
    "syntax": ("import torch\n\ndef make_task(:\n    pass\n", r"line 3: syntax error"),
    "import": (
        "import torch\nimport autoprune_no_such_package\n",
        r"line 2: import error: ModuleNotFoundError: No module named "
        r"'autoprune_no_such_package'",
    ),
    "module_level_error": (
        "X = {}\nY = X['missing']\n",
        r"line 2: error while importing: KeyError",
    ),
    "missing_function": (
        "def build():\n    pass\n",
        r"has no function 'make_task'\. Functions it defines: build\.",
    ),
    "not_callable": ("make_task = 3\n", r"make_task is a int, not a function returning a Task"),
    "raises": (
        "def helper():\n    raise RuntimeError('no data at /data/x')\n\n"
        "def make_task():\n    return helper()\n",
        r"line 2: make_task\(\) raised RuntimeError: no data at /data/x",
    ),
    "wrong_type": (
        "import torch\n\ndef make_task():\n    return torch.nn.Linear(2, 2)\n",
        r"make_task\(\) returned Linear, expected an autoprune\.task\.Task",
    ),
    "missing_fields": (
        "import torch\nfrom autoprune.task import Task\n\ndef make_task():\n"
        "    return Task(name='t', build_model=lambda: torch.nn.Linear(2, 2),\n"
        "                example_inputs=(torch.randn(1, 2),))\n",
        r"line 5: make_task\(\) builds a Task without required field\(s\) 'train_data' and "
        r"'val_data'\. Required: name, build_model, example_inputs, train_data, val_data\.",
    ),
    "missing_fields_dict": (
        "def make_task():\n    return {'name': 't'}\n",
        r"returned a dict with missing required field\(s\) build_model, example_inputs, "
        r"train_data, val_data",
    ),
    "unknown_field": (
        "import torch\nfrom autoprune.task import Task\n\ndef make_task():\n"
        "    return Task(name='t', model=torch.nn.Linear(2, 2))\n",
        r"line 5: Task has no field 'model'\. Fields: name, build_model",
    ),
    "bad_field_value": (
        "import torch\nfrom autoprune.task import Task\n\ndef make_task():\n"
        "    return Task('t', lambda: torch.nn.Linear(2, 2), [1, 2], [], iter([]))\n",
        r"line 5: make_task\(\): invalid Task 't': example_inputs must be a tensor or a tuple "
        r"of tensors .* got tuple of \(int, int\); val_data is a one-shot iterator",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_TASKS))
def test_malformed_task_file_errors(tmp_path, kind):
    source, expected = BAD_TASKS[kind]
    path = tmp_path / f"bad_{kind}.py"
    path.write_text(source)
    with pytest.raises(TaskError) as info:
        load_task(f"{path}:make_task")
    message = str(info.value)
    assert str(path) in message.splitlines()[0]
    assert len(re.findall(expected, message.split("\n\n")[0])) == 1, message
    assert "Example of a correct task file" in message and TASK_EXAMPLE in message
    assert isinstance(info.value, UsageError)  # the CLI exits with code 2


def test_missing_file_error(tmp_path):
    with pytest.raises(TaskError) as info:
        load_task(f"{tmp_path}/nope.py:make_task")
    message = str(info.value)
    assert f"task file {tmp_path}/nope.py does not exist" in message
    assert "def make_task() -> Task:" in message


def test_unknown_name_and_missing_module_errors():
    with pytest.raises(TaskError, match=r"not a built-in task either \(built-in: digits, "):
        load_task("digitz")
    with pytest.raises(TaskError, match=r"task module 'no_such_pkg\.tasks' not found"):
        load_task("no_such_pkg.tasks:make_task")
    with pytest.raises(TaskError, match="non-empty string"):
        load_task("  ")


def test_failed_import_is_not_left_in_sys_modules(tmp_path):
    import sys

    path = write(tmp_path / "half.py", "X = 1\nraise ValueError('boom')\n")
    with pytest.raises(TaskError, match="line 2"):
        load_task(str(path))
    assert not [m for m in sys.modules if m.startswith("autoprune_user_task_half_")]


def test_task_file_imports_the_modules_beside_it(tmp_path):
    write(tmp_path / "beside_net.py", "import torch\n\n\ndef net():\n"
          "    return torch.nn.Linear(4, 2)\n")
    body = TASK_EXAMPLE.replace("from autoprune.task import Task, accuracy",
                                "from autoprune.task import Task, accuracy\n"
                                "from beside_net import net")
    body = body.replace("        return torch.nn.Sequential(\n"
                        "            torch.nn.Linear(20, 64), torch.nn.ReLU(), "
                        "torch.nn.Linear(64, 3)\n        )", "        return net()")
    body = body.replace("torch.randn(512, 20), torch.randint(0, 3,",
                        "torch.randn(512, 4), torch.randint(0, 2,")
    body = body.replace("torch.randn(1, 20)", "torch.randn(1, 4)")
    task = load_task(f"{write(tmp_path / 'beside_task.py', body)}:make_task")
    assert task.build_model().out_features == 2
    assert task.build_architecture().in_features == 4


def test_build_architecture_must_be_callable():
    with pytest.raises(TaskError, match="build_architecture must be callable or None"):
        make_toy_task(build_architecture=3)


def test_task_example_in_errors_is_itself_a_valid_task(tmp_path):
    path = write(tmp_path / "example_task.py", TASK_EXAMPLE)
    task = load_task(f"{path}:make_task")
    assert task.name == "my_task"
    assert 0.0 <= task.evaluate(task.build_model()) <= 1.0


# ----------------------------------------------------------------------------- Task object


def make_toy_task(**kw) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    y = (x[:, 0] > 0).long()
    fields = dict(
        name="toy",
        build_model=lambda: torch.nn.Linear(3, 2).eval(),
        example_inputs=torch.randn(1, 3),
        train_data=DataLoader(TensorDataset(x, y), 8, shuffle=True, generator=g),
        val_data=[(x, y)],
    )
    fields.update(kw)
    return Task(**fields)


def test_task_defaults_and_single_tensor_example_inputs():
    task = make_toy_task()
    assert isinstance(task.example_inputs, tuple) and task.example_inputs[0].shape == (1, 3)
    assert task.metric.name == "accuracy" and task.finetune == FinetuneSettings()
    loss = task.loss_fn(torch.tensor([[10.0, -10.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_evaluate_uses_metric_then_evaluate_fn_and_restores_mode():
    w = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    task = make_toy_task()
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(w)  # predicts class 0 for x0 > 0: always wrong
        model.bias.zero_()
    model.train()
    assert task.evaluate(model) == 0.0
    assert model.training  # restored
    with torch.no_grad():
        model.weight.copy_(-w)  # ... and now always right
    assert task.evaluate(model) == 1.0

    seen = []
    custom = make_toy_task(evaluate_fn=lambda m: seen.append(m.training) or 0.25)
    assert custom.evaluate(model) == 0.25 and seen == [False]
    broken = make_toy_task(evaluate_fn=lambda m: "high")
    with pytest.raises(TaskError, match="evaluate_fn returned str, expected a float"):
        broken.evaluate(model)


def test_custom_metric_direction_is_checked():
    loss_metric = Metric("val_loss", "minimize", lambda m, d: 0.5)
    assert make_toy_task(metric=loss_metric).evaluate(torch.nn.Linear(3, 2)) == 0.5
    with pytest.raises(TaskError, match="direction must be 'maximize' or 'minimize'"):
        Metric("x", "max", lambda m, d: 0.0)


def test_calibration_batches_are_seeded():
    task = make_toy_task()
    first, again = task.calibration_batches(3), task.calibration_batches(3)
    assert len(first) == 3 and first[0][0].shape == (8, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    other = task.calibration_batches(3, seed=1)
    assert not torch.equal(first[0][0], other[0][0])
    assert len(task.calibration_batches(100)) == 5  # all there is
    assert task.calibration_batches(0) == []


def test_accuracy_metric_on_tuple_inputs():
    class Two(torch.nn.Module):
        def forward(self, a, b):
            return torch.stack([a, b], dim=1)

    data = [((torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])), torch.tensor([0, 1]))]
    assert accuracy().fn(Two(), data) == 1.0


# ----------------------------------------------------------------------------- built-ins


def test_digits_data_split_is_fixed():
    x_train, y_train, x_val, y_val = digits.digits_tensors()
    assert x_train.shape == (1437, 1, 32, 32) and x_val.shape == (360, 1, 32, 32)
    assert abs(x_train.mean().item()) < 1e-5 and x_train.std().item() == pytest.approx(1, 1e-4)
    assert torch.bincount(y_val).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    again = digits.digits_tensors.__wrapped__()
    assert torch.equal(again[3], y_val) and torch.equal(again[2], x_val)


def test_digits_cache_is_reused_and_corruption_rebuilt(digits_cache, monkeypatch):
    trained = []
    real_train = digits.train_classifier_

    def counting_train(*args, **kw):
        trained.append(1)
        return real_train(*args, **kw)

    monkeypatch.setattr(digits, "train_classifier_", counting_train)
    cache = digits_cache / "own"
    task = load_task("digits", **TINY_DIGITS, cache_dir=cache)
    first = task.build_model()
    assert len(trained) == 1
    assert task.evaluate(first) > 0.3  # one epoch of a 78 k-parameter variant; chance is 0.1

    files = sorted(p.name for p in (cache / "weights").iterdir())
    weights = next((cache / "weights").glob("digits-*.pt"))
    assert [n for n in files if not n.endswith(".lock")] == [
        weights.name.replace(".pt", ".json"),
        weights.name,
        weights.name + ".sha256",
    ]
    assert _cache._sha256(weights) in (cache / "weights" / (weights.name + ".sha256")).read_text()

    # A second load (new task object, as in a new process) reads the cache: no training.
    monkeypatch.setattr(digits, "train_classifier_", lambda *a, **k: pytest.fail("retrained"))
    second = load_task("digits", **TINY_DIGITS, cache_dir=cache).build_model()
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values())
    )

    # build_model returns independent fresh copies in eval mode.
    with torch.no_grad():
        second.fc.weight.zero_()
    third = task.build_model()
    assert not third.training and torch.equal(third.fc.weight, first.fc.weight)

    # A corrupted file fails its checksum and is rebuilt, deterministically to the same weights.
    monkeypatch.setattr(digits, "train_classifier_", counting_train)
    weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)
    rebuilt = load_task("digits", **TINY_DIGITS, cache_dir=cache).build_model()
    assert len(trained) == 2
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), rebuilt.state_dict().values())
    )
    assert _cache._sha256(weights) in (cache / "weights" / (weights.name + ".sha256")).read_text()

    # So is a missing checksum file, and a file that is not a state dict at all.
    monkeypatch.setattr(digits, "train_classifier_", lambda *a, **k: trained.append(1) or {})
    (cache / "weights" / (weights.name + ".sha256")).unlink()
    load_task("digits", **TINY_DIGITS, cache_dir=cache).build_model()
    assert len(trained) == 3
    torch.save({"not": torch.zeros(1)}, weights)
    (cache / "weights" / (weights.name + ".sha256")).write_text(_cache._sha256(weights))
    load_task("digits", **TINY_DIGITS, cache_dir=cache).build_model()
    assert len(trained) == 4


def test_cache_dir_env_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv(_cache.CACHE_ENV, str(tmp_path / "env"))
    assert _cache.cache_dir() == tmp_path / "env"
    assert _cache.cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(_cache.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert _cache.cache_dir() == Path.home() / ".cache" / "autoprune"
    a = _cache.weights_path("digits", {"widths": [8], "epochs": 1}, tmp_path)
    b = _cache.weights_path("digits", {"epochs": 1, "widths": [8]}, tmp_path)
    c = _cache.weights_path("digits", {"epochs": 2, "widths": [8]}, tmp_path)
    assert a == b != c and a.parent == tmp_path / "weights"


def test_sequences_task(tmp_path):
    x, y = sequences.motif_sequences(200, 0)
    assert x.shape == (200, 16, 16) and set(y.tolist()) == set(range(10))
    assert torch.equal(sequences.motif_sequences.__wrapped__(200, 0)[0], x)
    task = load_task(
        "sequences", dim=32, num_heads=2, depth=1, epochs=2, n_train=512, cache_dir=tmp_path
    )
    model = task.build_model()
    assert model(*task.example_inputs).shape == (1, 10)
    assert model.layers[0].attn.num_heads == 2
    assert 0.1 < task.evaluate(model) <= 1.0  # chance is 0.1
    assert task.finetune.optimizer == "adamw"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "sequences"])
def test_builtin_tasks_reach_their_accuracy(name, tmp_path):
    """The full-size built-in models (trained in ~1 min each on 2 cores)."""
    task = load_task(name, cache_dir=tmp_path)
    model = task.build_model()
    params = sum(p.numel() for p in model.parameters())
    assert params == {"digits": 1_048_682, "sequences": 402_314}[name]
    assert task.evaluate(model) >= 0.97


def test_examples_custom_task_loads_as_a_task():
    path = Path(__file__).resolve().parents[1] / "examples" / "custom_task.py"
    task = load_task(f"{path}:make_task", hidden=32)
    model = task.build_model()
    assert model.net[0].out_features == 32
    assert task.evaluate(model) >= 0.9


def test_apply_records_the_criterion_that_ranked_each_group(tmp_path):
    from autoprune.finalize import finalize_plan
    from autoprune.plan import PruningPlan

    task = load_task("sequences", dim=32, num_heads=2, depth=1, epochs=2, n_train=512,
                     cache_dir=tmp_path)
    metrics = finalize_plan(task, PruningPlan.uniform(0.5, criterion="bn_scale"),
                            tmp_path / "ship", finetune_steps=1)
    # a transformer has no BatchNorm: l1 ranked every group, and apply says so per group
    groups = sorted(metrics["criteria"])
    assert groups == ["layers.0.attn.v", "layers.0.fc1", "layers.0.fc2"]
    assert set(metrics["criteria"].values()) == {"l1"}
    assert metrics["criterion_fallbacks"] == dict.fromkeys(groups, "bn_scale -> l1")
    assert json.loads((tmp_path / "ship" / "metrics.json").read_text())["criteria"] == \
        metrics["criteria"]
