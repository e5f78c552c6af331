"""Backward compatibility of the public ssjf.v1 contract against a saved descriptor set.

``protos/ssjf-v1.binpb`` is the FileDescriptorSet of protos/ as last released. A change is
compatible when a client built against that set still talks to the new servers, on the wire
and in JSON: fields, enum values, messages, services and RPCs may be ADDED; none may be
removed (unless its number is reserved), renumbered, renamed, or change its type, label,
oneof, or streaming. The same rules as ``buf breaking`` with WIRE_JSON, in Python so the test
needs nothing beyond the dev dependencies (buf runs too where npm is: tests/test_protos.py
runs it when clients/node has it installed, or ``npm run lint-protos`` / ``npm run breaking``
in clients/node).

    python -m services.common.protocompat            # check protos/ against the baseline
    python -m services.common.protocompat --save     # adopt protos/ as the new baseline
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from services.common.protogen import PROTO_ROOT

BASELINE = PROTO_ROOT / "ssjf-v1.binpb"
PACKAGE = "ssjf.v1"

Message = descriptor_pb2.DescriptorProto
Enum = descriptor_pb2.EnumDescriptorProto


def compile_descriptor_set(proto_root: Path = PROTO_ROOT) -> descriptor_pb2.FileDescriptorSet:
    """protos/ compiled by protoc into one FileDescriptorSet (no source info: stable bytes)."""
    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        args = ["protoc", f"-I{proto_root}", f"--descriptor_set_out={out}", *protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def load_baseline(path: Path = BASELINE) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


def _messages(files: descriptor_pb2.FileDescriptorSet) -> dict[str, Message]:
    found: dict[str, Message] = {}

    def walk(prefix: str, message: Message) -> None:
        name = f"{prefix}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            walk(name, nested)

    for file in files.file:
        for message in file.message_type:
            walk(file.package, message)
    return found


def _enums(files: descriptor_pb2.FileDescriptorSet) -> dict[str, Enum]:
    found: dict[str, Enum] = {}
    for file in files.file:
        for enum in file.enum_type:
            found[f"{file.package}.{enum.name}"] = enum
        for name, message in _messages(descriptor_pb2.FileDescriptorSet(file=[file])).items():
            for enum in message.enum_type:
                found[f"{name}.{enum.name}"] = enum
    return found


def _reserved(message: Message, number: int) -> bool:
    return any(r.start <= number < r.end for r in message.reserved_range)


def _oneof(message: Message, field: descriptor_pb2.FieldDescriptorProto) -> str:
    # proto3 `optional` is a synthetic oneof: not a real grouping a client depends on.
    if not field.HasField("oneof_index") or field.proto3_optional:
        return ""
    return message.oneof_decl[field.oneof_index].name


def incompatibilities(
    old: descriptor_pb2.FileDescriptorSet, new: descriptor_pb2.FileDescriptorSet
) -> list[str]:
    """Every change from ``old`` to ``new`` that breaks an existing client; [] when none."""
    problems: list[str] = []
    new_messages = _messages(new)
    for name, before in _messages(old).items():
        after = new_messages.get(name)
        if after is None:
            problems.append(f"message {name} was removed")
            continue
        fields_after = {f.number: f for f in after.field}
        for field in before.field:
            where = f"{name}.{field.name} (= {field.number})"
            now = fields_after.get(field.number)
            if now is None:
                if not _reserved(after, field.number):
                    problems.append(f"field {where} was removed without reserving its number")
                continue
            if now.name != field.name:
                problems.append(f"field {where} was renamed to {now.name}")
            if (now.type, now.type_name) != (field.type, field.type_name):
                problems.append(f"field {where} changed type")
            if now.label != field.label:
                problems.append(f"field {where} changed label (repeated/optional)")
            if _oneof(after, now) != _oneof(before, field):
                problems.append(f"field {where} moved into or out of a oneof")
    new_enums = _enums(new)
    for name, before in _enums(old).items():
        after = new_enums.get(name)
        if after is None:
            problems.append(f"enum {name} was removed")
            continue
        values_after = {v.number: v.name for v in after.value}
        for value in before.value:
            if values_after.get(value.number) != value.name:
                problems.append(f"enum value {name}.{value.name} (= {value.number}) was removed")
    new_services = {f"{f.package}.{s.name}": s for f in new.file for s in f.service}
    for file in old.file:
        for service in file.service:
            name = f"{file.package}.{service.name}"
            after = new_services.get(name)
            if after is None:
                problems.append(f"service {name} was removed")
                continue
            methods_after = {m.name: m for m in after.method}
            for method in service.method:
                now = methods_after.get(method.name)
                if now is None:
                    problems.append(f"rpc {name}.{method.name} was removed")
                    continue
                for part in ("input_type", "output_type", "client_streaming", "server_streaming"):
                    if getattr(now, part) != getattr(method, part):
                        problems.append(f"rpc {name}.{method.name} changed its {part}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", action="store_true", help="write protos/ as the baseline")
    args = parser.parse_args()
    current = compile_descriptor_set()
    if args.save:
        BASELINE.write_bytes(current.SerializeToString(deterministic=True))
        print(f"saved {BASELINE.relative_to(PROTO_ROOT.parent)}")
        return
    problems = incompatibilities(load_baseline(), current)
    for problem in problems:
        print(f"incompatible: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"protos/ is backward compatible with {BASELINE.name}")


if __name__ == "__main__":
    main()
