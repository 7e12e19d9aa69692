"""Loading a task from a spec: a Python file, an importable module or a built-in name, with
errors that name the file, the line and the fix."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import traceback
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

from autoprune.errors import TaskError
from autoprune.task._contract import TASK_EXAMPLE, Task, _describe

__all__ = ["load_task", "DEFAULT_FACTORY"]

DEFAULT_FACTORY = "make_task"  # function looked up when a spec names no function
_EXAMPLE_HINT = "Example of a correct task file:\n\n" + TASK_EXAMPLE


def load_task(spec: str, **overrides: Any) -> Task:
    """Load a task from a spec; ``overrides`` are passed to the task's factory function.

    Specs:
        ``path/to/file.py:make_task``  a function in a Python file (``:make_task`` optional);
        ``package.module:make_task``   a function in an importable module;
        ``digits``                     a built-in task (see ``autoprune.tasks.list_tasks()``).

    Raises:
        TaskError: the file or module is missing or fails to import, the function is missing,
            raises, or returns something that is not a valid :class:`Task`. The message names
            the file (and line) and includes an example of a correct task file.

    Example:
        >>> task = load_task("digits")  # doctest: +SKIP
        >>> task = load_task("my_task.py:make_task", epochs=3)  # doctest: +SKIP
    """
    from autoprune.tasks import get_task, list_tasks

    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(f"task spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in list_tasks():
        return get_task(spec, **overrides)
    target, fn_name = _split_spec(spec)
    if _looks_like_path(target):
        module, where = _import_file(spec, Path(target))
    elif re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", target):
        module, where = _import_module(spec, target, list_tasks())
    else:
        raise TaskError(
            f"cannot read task spec {spec!r}: expected a built-in name "
            f"({', '.join(list_tasks())}), 'path/to/file.py:make_task' or "
            f"'package.module:make_task'.\n\n{_EXAMPLE_HINT}"
        )
    return _call_factory(module, fn_name, where, overrides)


def _split_spec(spec: str) -> tuple[str, str]:
    # rpartition so a Windows drive letter ("C:\\tasks\\t.py:make_task") stays in the path.
    head, sep, tail = spec.rpartition(":")
    if head and re.fullmatch(r"[A-Za-z_]\w*", tail):
        return head, tail
    return spec, DEFAULT_FACTORY


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target or Path(target).is_file()


def _import_file(spec: str, path: Path) -> tuple[ModuleType, str]:
    shown = str(path)
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "does not exist"
        raise TaskError(
            f"task file {shown} {why} (from --task {spec!r}; current directory "
            f"{Path.cwd()}). Give the path of a .py file defining a function that returns an "
            f"autoprune.task.Task.\n\n{_EXAMPLE_HINT}"
        )
    path = path.resolve()
    # Unique per file (two task.py in different folders), stable across processes.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"autoprune_user_task_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise TaskError(f"task file {shown} cannot be imported as Python.\n\n{_EXAMPLE_HINT}")
    module = importlib.util.module_from_spec(module_spec)
    # The modules beside the file import as they do when it runs as a script.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    # Registered while executing: dataclasses and pickling look modules up in sys.modules.
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        raise _import_error(shown, path, e) from e
    return module, shown


def _import_module(spec: str, target: str, builtins: list[str]) -> tuple[ModuleType, str]:
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        found = None
    if found is None:
        hint = ""
        if "." not in target:
            hint = (
                f" It is not a built-in task either (built-in: {', '.join(builtins)}); "
                "a file path needs its .py suffix."
            )
        raise TaskError(
            f"task module {target!r} not found (from --task {spec!r}): is the package "
            f"installed or on PYTHONPATH?{hint}\n\n{_EXAMPLE_HINT}"
        )
    origin = Path(found.origin) if found.origin and found.origin != "built-in" else None
    try:
        module = importlib.import_module(target)
    except Exception as e:
        raise _import_error(str(origin or target), origin, e) from e
    return module, str(origin) if origin else target


def _import_error(shown: str, path: Path | None, e: BaseException) -> TaskError:
    if isinstance(e, SyntaxError) and e.filename and path and Path(e.filename) == path:
        code = (e.text or "").rstrip()
        return TaskError(
            f"task file {shown}, line {e.lineno}: syntax error: {e.msg}"
            + (f"\n    {code}" if code else "")
            + f"\n\n{_EXAMPLE_HINT}"
        )
    line = _line_in(e, path)
    at = f", line {line}" if line else ""
    what = "import error" if isinstance(e, ImportError) else "error while importing"
    return TaskError(f"task file {shown}{at}: {what}: {type(e).__name__}: {e}\n\n{_EXAMPLE_HINT}")


def _line_in(e: BaseException, path: Path | None) -> int | None:
    """Line of the innermost traceback frame inside ``path`` (the user's file)."""
    if path is None:
        return None
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        try:
            if Path(frame.filename).resolve() == path.resolve():
                line = frame.lineno
        except OSError:
            continue
    return line


_MISSING_ARGS = re.compile(r"Task\.__init__\(\) missing \d+ required positional arguments?: (.*)")
_UNKNOWN_ARG = re.compile(r"Task\.__init__\(\) got an unexpected keyword argument '(\w+)'")


def _call_factory(module: ModuleType, fn_name: str, where: str, overrides: dict) -> Task:
    path = Path(where) if Path(where).is_file() else None
    fn = getattr(module, fn_name, None)
    if fn is None:
        defined = sorted(
            n
            for n, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_")
        )
        listed = f" Functions it defines: {', '.join(defined)}." if defined else ""
        raise TaskError(
            f"task file {where} has no function {fn_name!r}.{listed} Name the function after "
            f"the colon (file.py:function) or define {DEFAULT_FACTORY}().\n\n{_EXAMPLE_HINT}"
        )
    if not callable(fn):
        raise TaskError(
            f"task file {where}: {fn_name} is a {type(fn).__name__}, not a function returning "
            f"a Task.\n\n{_EXAMPLE_HINT}"
        )
    if overrides:
        try:
            inspect.signature(fn).bind(**overrides)
        except TypeError:
            params = ", ".join(inspect.signature(fn).parameters) or "no arguments"
            raise TaskError(
                f"task file {where}: {fn_name}() does not accept option(s) "
                f"{', '.join(sorted(overrides))}; it takes: {params}"
            ) from None
        except ValueError:
            pass  # builtins without a signature: let the call decide
    try:
        result = fn(**overrides)
    except TypeError as e:
        missing, unknown = _MISSING_ARGS.search(str(e)), _UNKNOWN_ARG.search(str(e))
        line = _line_in(e, path)
        at = f", line {line}" if line else ""
        if missing:
            raise TaskError(
                f"task file {where}{at}: {fn_name}() builds a Task without required "
                f"field(s) {missing.group(1)}. Required: {', '.join(_required_fields())}."
                f"\n\n{_EXAMPLE_HINT}"
            ) from e
        if unknown:
            raise TaskError(
                f"task file {where}{at}: Task has no field {unknown.group(1)!r}. Fields: "
                f"{', '.join(f.name for f in fields(Task))}.\n\n{_EXAMPLE_HINT}"
            ) from e
        raise _raised(where, fn_name, path, e) from e
    except TaskError as e:
        line = _line_in(e, path)
        at = f", line {line}" if line else ""
        raise TaskError(f"task file {where}{at}: {fn_name}(): {e}\n\n{_EXAMPLE_HINT}") from e
    except Exception as e:
        raise _raised(where, fn_name, path, e) from e
    if isinstance(result, dict):
        result = _task_from_dict(result, where, fn_name)
    if not isinstance(result, Task):
        raise TaskError(
            f"task file {where}: {fn_name}() returned {_describe(result)}, expected an "
            f"autoprune.task.Task (or a dict of its fields).\n\n{_EXAMPLE_HINT}"
        )
    return result


def _raised(where: str, fn_name: str, path: Path | None, e: Exception) -> TaskError:
    line = _line_in(e, path)
    at = f", line {line}" if line else ""
    return TaskError(
        f"task file {where}{at}: {fn_name}() raised {type(e).__name__}: {e}\n\n{_EXAMPLE_HINT}"
    )


def _required_fields() -> list[str]:
    from dataclasses import MISSING

    return [
        f.name
        for f in fields(Task)
        if f.default is MISSING and f.default_factory is MISSING  # type: ignore[misc]
    ]


def _task_from_dict(d: dict, where: str, fn_name: str) -> Task:
    known = {f.name for f in fields(Task)}
    missing = [n for n in _required_fields() if n not in d]
    unknown = sorted(set(d) - known)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing required field(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown field(s) {', '.join(unknown)}")
        raise TaskError(
            f"task file {where}: {fn_name}() returned a dict with {' and '.join(parts)}. "
            f"Required: {', '.join(_required_fields())}.\n\n{_EXAMPLE_HINT}"
        )
    try:
        return Task(**d)
    except TaskError as e:
        raise TaskError(f"task file {where}: {fn_name}(): {e}\n\n{_EXAMPLE_HINT}") from e
