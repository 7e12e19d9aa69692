from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from autoprune.errors import TargetError, UsageError
from autoprune.latency import (
    BUILTIN_TARGETS,
    TOKEN_ENV_VAR,
    Target,
    list_targets,
    load_target,
    resolve_token,
)


def test_builtin_targets():
    assert list_targets() == ["cpu", "cpu-1t"]
    one = load_target("cpu-1t")
    assert one is BUILTIN_TARGETS["cpu-1t"]
    assert (one.intra_op_threads, one.inter_op_threads, one.statistic) == (1, 1, "p50")
    assert one.providers == ("CPUExecutionProvider",)
    assert load_target("cpu").intra_op_threads == 0  # ORT default: all cores
    assert not one.is_remote


def test_key_is_stable_and_covers_what_latency_depends_on():
    one = load_target("cpu-1t")
    assert one.key() == (
        "CPUExecutionProvider|intra=1|inter=1|opt=all|batch=1|shapes=example|pin=0|local"
    )
    assert one.key() == Target.from_dict(one.to_dict()).key()
    # the name and the run counts do not change what is measured
    assert dataclasses.replace(one, name="edge", min_runs=99, target_ci=0.05).key() == one.key()
    assert dataclasses.replace(one, batch_size=8).key() != one.key()
    assert dataclasses.replace(one, graph_optimization_level="basic").key() != one.key()
    assert load_target("cpu").key() != one.key()
    assert load_target("remote://10.0.0.2:8765").key().endswith("remote=10.0.0.2:8765")


def test_import_is_light():
    code = "import sys, autoprune.latency; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_yaml_profile_with_base(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text(
        "version: 1\nbase: cpu\nintra_op_threads: 2\nbatch_size: 4\nstatistic: p90\n"
        "input_shapes: [[4, 1, 32, 32]]\n"
    )
    target = load_target(str(path))
    assert target.name == "edge"  # from the file name
    assert (target.intra_op_threads, target.batch_size, target.statistic) == (2, 4, "p90")
    assert target.input_shapes == ((4, 1, 32, 32),)
    assert target.max_runs == BUILTIN_TARGETS["cpu"].max_runs  # from the base


def test_json_profile_round_trip(tmp_path):
    target = dataclasses.replace(load_target("cpu-1t"), name="pi4", intra_op_threads=4,
                                 providers=("CPUExecutionProvider",), target_ci=0.03)
    path = tmp_path / "pi4.json"
    path.write_text(json.dumps(target.to_dict()))
    assert load_target(path) == target


def test_remote_spec(tmp_path):
    target = load_target("remote://127.0.0.1:8765")
    assert target.remote == "127.0.0.1:8765" and target.is_remote
    assert target.intra_op_threads == 1  # cpu-1t settings by default
    assert load_target("remote://127.0.0.1:8765/cpu").intra_op_threads == 0
    token = tmp_path / "token"
    assert load_target("remote://h:1", token_file=token).token_file == str(token)
    assert "token_file" not in load_target("remote://h:1", token_file=token).to_dict()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("gpu-fast", r"unknown target 'gpu-fast'.*cpu, cpu-1t.*remote://host:port"),
        ("missing.yaml", "does not exist"),
        ("remote://nohost", "bad remote address"),
        ("remote://h:99999", "bad remote address"),
        ("remote://h:80/tpu", "unknown built-in target 'tpu'"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(TargetError, match=match):
        load_target(spec)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("intra_op_thread: 2\n", r"unknown target field\(s\) 'intra_op_thread'.*intra_op_threads"),
        ("statistic: p99\n", "statistic must be one of p50, p90"),
        ("intra_op_threads: -1\n", "intra_op_threads must be an integer >= 0"),
        ("min_runs: 50\nmax_runs: 10\n", "need 1 <= min_runs <= max_runs"),
        ("graph_optimization_level: max\n", "graph_optimization_level must be one of"),
        ("target_ci: 2\n", r"target_ci must be in \(0, 1\)"),
        ("batch_size: 0\n", "batch_size must be a positive integer"),
        ("input_shapes: [[1, x]]\n", "input_shapes must be a list of shapes"),
        ("base: tpu\n", "unknown built-in target 'tpu'"),
        ("version: 2\n", "version 2 is not supported"),
        ("- a\n- b\n", "must be a mapping"),
        ("a: [\n", "not valid"),
    ],
)
def test_bad_profile_files(tmp_path, content, match):
    path = tmp_path / "t.yaml"
    path.write_text(content)
    with pytest.raises(TargetError, match=match) as info:
        load_target(path)
    assert isinstance(info.value, UsageError)  # the CLI exits with code 2
    assert str(path) in str(info.value) or "'t'" in str(info.value)


def test_resolve_token(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV_VAR, raising=False)
    with pytest.raises(TargetError, match="--token-file FILE or set AUTOPRUNE_LATENCY_TOKEN"):
        resolve_token()
    monkeypatch.setenv(TOKEN_ENV_VAR, " from-env ")
    assert resolve_token() == "from-env"
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert resolve_token(path) == "from-file"  # the file wins over the environment
    path.write_text("  \n")
    with pytest.raises(TargetError, match="is empty"):
        resolve_token(path)
    with pytest.raises(TargetError, match="does not exist"):
        resolve_token(tmp_path / "nope")
