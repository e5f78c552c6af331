"""`make stubs`: clients in other languages generate from protos/, and what they generate
compiles where the compilers are installed (Go: Debian's Go packages in GOPATH mode; C++:
libgrpc++-dev, linked into a tiny client). CI installs neither (too slow for its time limit;
see docs/deploy.md), so those two tests skip there."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow

GEN = REPO_ROOT / "clients" / "gen"
PROTOS = ["common", "predictor", "scheduler", "worker"]


@pytest.fixture(scope="module")
def generated() -> set[str]:
    if shutil.which("protoc") is None:
        pytest.skip("protoc is not installed (apt-get install protobuf-compiler)")
    result = subprocess.run(
        [str(REPO_ROOT / "clients" / "generate-stubs.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    last = [line for line in result.stdout.splitlines() if line.startswith("stubs in")][-1]
    return set(last.split(":", 1)[1].split())


def test_stubs_are_generated_for_every_proto(generated: set[str]):
    expected = {
        "node": ["node/ssjf/v1/Scheduler.ts", "node/scheduler.ts"],
        "go": [f"go/ssjf/v1/{name}.pb.go" for name in PROTOS] + ["go/ssjf/v1/scheduler_grpc.pb.go"],
        "cpp": [f"cpp/ssjf/v1/{name}.pb.cc" for name in PROTOS]
        + ["cpp/ssjf/v1/scheduler.grpc.pb.cc"],
    }
    if not generated:
        pytest.skip("no stub generator is installed")
    for language in generated:
        for path in expected[language]:
            assert (GEN / path).is_file(), f"{language}: {path} was not generated"


def test_go_stubs_compile(generated: set[str]):
    gocode = "/usr/share/gocode"
    if "go" not in generated or shutil.which("go") is None or not os.path.isdir(gocode):
        pytest.skip("needs go and Debian's golang-google-grpc-dev / golang-google-protobuf-dev")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": gocode, "GOCACHE": str(GEN / ".gocache")}
    result = subprocess.run(
        ["go", "build", "./go/ssjf/v1/"], cwd=GEN, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


# A client that only has to link: it builds a Scheduler stub on an insecure channel (never
# run, so no server is needed). Linking proves the generated code matches the installed
# gRPC and protobuf libraries, which a syntax check alone does not.
CPP_CLIENT = """\
#include <grpcpp/grpcpp.h>
#include "ssjf/v1/scheduler.grpc.pb.h"

int main() {
  auto channel = grpc::CreateChannel("127.0.0.1:50051", grpc::InsecureChannelCredentials());
  auto stub = ssjf::v1::Scheduler::NewStub(channel);
  ssjf::v1::GenerateRequest request;
  request.set_llm("smollm2-135m-instruct");
  request.set_prompt("hi");
  return stub && !request.SerializeAsString().empty() ? 0 : 1;
}
"""


def test_cpp_stubs_compile_and_link(generated: set[str], tmp_path):
    if "cpp" not in generated or shutil.which("g++") is None or shutil.which("pkg-config") is None:
        pytest.skip("needs g++ and pkg-config")
    flags = {
        kind: subprocess.run(
            ["pkg-config", f"--{kind}", "grpc++", "protobuf"],
            capture_output=True,
            text=True,
            check=False,
        )
        for kind in ("cflags", "libs")
    }
    if any(r.returncode for r in flags.values()) or not os.path.exists("/usr/include/grpcpp"):
        pytest.skip("needs libgrpc++-dev")
    cflags, libs = flags["cflags"].stdout.split(), flags["libs"].stdout.split()
    (tmp_path / "client.cc").write_text(CPP_CLIENT)
    cpp = GEN / "cpp"
    # scheduler.proto imports common.proto: the client needs both messages' code.
    sources = [str(tmp_path / "client.cc")] + [
        f"ssjf/v1/{name}" for name in ("common.pb.cc", "scheduler.pb.cc", "scheduler.grpc.pb.cc")
    ]
    # One compiler per source, in parallel (the slow part), then one link.
    compiles = [
        subprocess.Popen(
            [
                "g++",
                "-std=c++17",
                "-O0",
                "-I.",
                "-c",
                source,
                "-o",
                str(tmp_path / f"{n}.o"),
                *cflags,
            ],
            cwd=cpp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n, source in enumerate(sources)
    ]
    for source, process in zip(sources, compiles, strict=True):
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{source}:\n{output[-3000:]}"
    binary = tmp_path / "client"
    result = subprocess.run(
        ["g++", "-o", str(binary), *(str(tmp_path / f"{n}.o") for n in range(len(sources))),
         *libs],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert binary.is_file()
