"""`make stubs`: clients in other languages generate from protos/, and what they generate
compiles where the compilers are installed (Go: Debian's Go packages in GOPATH mode; C++:
libgrpc++-dev)."""

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


def test_cpp_stubs_compile(generated: set[str]):
    if "cpp" not in generated or shutil.which("g++") is None:
        pytest.skip("needs g++")
    if not os.path.exists("/usr/include/grpcpp/grpcpp.h"):
        pytest.skip("needs libgrpc++-dev")
    cpp = GEN / "cpp"
    for source in ["ssjf/v1/scheduler.pb.cc", "ssjf/v1/scheduler.grpc.pb.cc"]:
        result = subprocess.run(
            ["g++", "-std=c++17", "-fsyntax-only", "-I.", source], cwd=cpp,
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{source}:\n{result.stderr[-3000:]}"
