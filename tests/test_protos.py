"""The ssjf.v1 contract stays backward compatible with the saved descriptor set, and the
checker itself refuses what breaks a client while allowing additions."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from google.protobuf import descriptor_pb2

from services.common.protocompat import (
    BASELINE,
    compile_descriptor_set,
    incompatibilities,
    load_baseline,
)
from tests.helpers import REPO_ROOT

FieldType = descriptor_pb2.FieldDescriptorProto


def test_protos_are_backward_compatible_with_the_saved_baseline():
    problems = incompatibilities(load_baseline(), compile_descriptor_set())
    assert not problems, (
        "protos/ breaks ssjf.v1 clients (add fields/RPCs, never remove, renumber or retype):\n"
        + "\n".join(problems)
    )


@pytest.fixture
def baseline() -> descriptor_pb2.FileDescriptorSet:
    return load_baseline(BASELINE)


def _message(files: descriptor_pb2.FileDescriptorSet, name: str) -> descriptor_pb2.DescriptorProto:
    return next(m for f in files.file for m in f.message_type if m.name == name)


def _changed(baseline: descriptor_pb2.FileDescriptorSet, edit) -> list[str]:
    new = descriptor_pb2.FileDescriptorSet()
    new.CopyFrom(baseline)
    edit(new)
    return incompatibilities(baseline, new)


def test_additions_are_compatible(baseline):
    def add(files):
        request = _message(files, "GenerateRequest")
        request.field.add(name="new_knob", number=99, type=FieldType.TYPE_STRING)
        scheduler = next(s for f in files.file for s in f.service if s.name == "Scheduler")
        scheduler.method.add(
            name="ListModels", input_type=".ssjf.v1.GetJobRequest", output_type=".ssjf.v1.Job"
        )
        files.file[0].message_type.add(name="BrandNew")

    assert _changed(baseline, add) == []


def test_removing_a_field_is_refused_unless_its_number_is_reserved(baseline):
    def remove(files):
        request = _message(files, "GenerateRequest")
        kept = [f for f in request.field if f.name != "priority"]
        del request.field[:]
        request.field.extend(kept)

    assert any("GenerateRequest.priority" in p for p in _changed(baseline, remove))

    def remove_and_reserve(files):
        remove(files)
        _message(files, "GenerateRequest").reserved_range.add(start=5, end=6)

    assert _changed(baseline, remove_and_reserve) == []


def test_renumbering_retyping_and_renaming_are_refused(baseline):
    def renumber(files):
        next(f for f in _message(files, "GenerateRequest").field if f.name == "prompt").number = 42

    def retype(files):
        field = next(f for f in _message(files, "GenerateRequest").field if f.name == "priority")
        field.type = FieldType.TYPE_STRING

    def rename(files):
        next(f for f in _message(files, "GenerateRequest").field if f.name == "llm").name = "model"

    assert any("prompt" in p and "removed" in p for p in _changed(baseline, renumber))
    assert any("changed type" in p for p in _changed(baseline, retype))
    assert any("renamed to model" in p for p in _changed(baseline, rename))


def test_removing_an_rpc_or_enum_value_or_changing_streaming_is_refused(baseline):
    def drop_rpc(files):
        scheduler = next(s for f in files.file for s in f.service if s.name == "Scheduler")
        kept = [m for m in scheduler.method if m.name != "Cancel"]
        del scheduler.method[:]
        scheduler.method.extend(kept)

    def unstream(files):
        scheduler = next(s for f in files.file for s in f.service if s.name == "Scheduler")
        next(m for m in scheduler.method if m.name == "Generate").server_streaming = False

    def drop_enum_value(files):
        state = next(e for f in files.file for e in f.enum_type if e.name == "JobState")
        kept = [v for v in state.value if v.name != "JOB_STATE_CANCELLED"]
        del state.value[:]
        state.value.extend(kept)

    assert any("Scheduler.Cancel was removed" in p for p in _changed(baseline, drop_rpc))
    assert any("server_streaming" in p for p in _changed(baseline, unstream))
    assert any("JOB_STATE_CANCELLED" in p for p in _changed(baseline, drop_enum_value))


def test_buf_lint_and_breaking_when_buf_is_installed():
    buf = REPO_ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"
    if not buf.exists() and shutil.which("buf") is None:
        pytest.skip("buf is not installed (cd clients/node && npm ci)")
    command = str(buf) if buf.exists() else "buf"
    protos = REPO_ROOT / "protos"
    for args in (["lint", str(protos)], ["breaking", str(protos), "--against", str(BASELINE)]):
        result = subprocess.run([command, *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"buf {args[0]}:\n{result.stdout}{result.stderr}"
