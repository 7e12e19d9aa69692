"""What travels between the driver and the nodes of a Ray cluster, which share no files.

To the nodes: a ``file.py:make_task`` task's directory, through the job's ``runtime_env``
(``working_dir``: Ray uploads it once and starts every worker in its node's copy, on
``PYTHONPATH``); the base model's weights, through the object store (the driver builds the
model once, workers build the architecture and load them). Back to the driver: trial results
and latency measurements, in what each trial reports (see ``_trainable.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from autoprune.errors import TaskError, UsageError
from autoprune.search._base import SearchContext

RUNTIME_ENV_VARS = {"RAY_CHDIR_TO_TRIAL_DIR": "0"}  # workers stay in the working_dir


def _task_file(spec: str) -> tuple[Path, str] | None:
    """The file and function of a ``file.py[:function]`` spec whose file exists, else None."""
    from autoprune.task._loader import _split_spec

    path, fn = _split_spec(spec)
    if path.endswith(".py") and Path(path).is_file():
        return Path(path).resolve(), fn
    return None


def ships_task(ctx: SearchContext) -> bool:
    """True when the task travels in the job's ``working_dir``: a file task on a cluster
    (``--address``). A local Ray reads the task file where it is."""
    return bool(ctx.backend_options.get("address")) and _task_file(ctx.task_spec) is not None


def runtime_env(ctx: SearchContext) -> dict[str, Any]:
    """The job's ``runtime_env``: the file task's directory as ``working_dir`` on a cluster."""
    env: dict[str, Any] = {"env_vars": dict(RUNTIME_ENV_VARS)}
    if ships_task(ctx):
        path, _ = _task_file(ctx.task_spec)
        env["working_dir"] = str(path.parent)
    return env


def check_joined(ray: Any, ctx: SearchContext) -> None:
    """A Ray initialized before the search (by the caller) must already ship a file task."""
    if ships_task(ctx) and not ray.get_runtime_context().runtime_env.get("working_dir"):
        path, _ = _task_file(ctx.task_spec)
        raise UsageError(
            f"Ray was initialized in this process without a working_dir, so the nodes cannot "
            f"load the task file {path}: call ray.init(address=..., runtime_env="
            f"{{'working_dir': {str(path.parent)!r}}}), or let autoprune connect (do not "
            f"call ray.init first)")


def worker_spec(ctx: SearchContext) -> str:
    """The spec workers load: the file's name inside the working_dir when the task travels,
    its absolute path on a local Ray, other specs as they are."""
    found = _task_file(ctx.task_spec)
    if found is None:
        return ctx.task_spec
    path, fn = found
    return f"{path.name}:{fn}" if ships_task(ctx) else f"{path}:{fn}"


def load_worker_task(spec: str, shipped: bool) -> Any:
    """The task on a worker; a shipped task file is looked up in this worker's working_dir."""
    from autoprune.task import load_task
    from autoprune.task._loader import _split_spec

    if not shipped:
        return load_task(spec)
    name, fn = _split_spec(spec)
    path = Path.cwd() / name
    if not path.is_file():
        raise TaskError(f"the task file {name} is not in this worker's working_dir "
                        f"({Path.cwd()}): the job's runtime_env did not ship it")
    return load_task(f"{path}:{fn}")


@dataclasses.dataclass(frozen=True)
class Weights:
    """The driver's base model weights, in Ray's object store."""

    ref: Any  # ray.ObjectRef of the state dict
    training: bool  # the base model's mode (build_model returns it in eval mode, as a rule)


def put_weights(ray: Any, model: Any) -> Weights:
    """Put ``model``'s weights in the object store (once per search on the driver)."""
    return Weights(ray.put(model.state_dict()), model.training)


def with_weights(task: Any, state: dict[str, Any], training: bool = False) -> Any:
    """``task`` whose ``build_model`` builds the architecture (``build_architecture``, else
    ``build_model``) and loads ``state`` (the driver's weights, see :class:`Weights`) into it,
    in the driver's model's mode (``training``)."""
    build = task.build_architecture or task.build_model

    def build_model():
        model = build()
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # the first line says where, the second what differs
            detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
            raise TaskError(f"task {task.name!r}: the driver's weights do not fit the model "
                            f"built on this node ({detail}); build_architecture must build "
                            f"the same model as build_model") from None
        return model.train(training)

    return dataclasses.replace(task, build_model=build_model)
