"""The benchmark scripts' own logic (no timing): profile_step's trace and HLO parsing, bench.py's error lines and
the malloc setting every row runs under."""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


HLO = """
ENTRY %main {
  %fusion.12 = f32[8,6,512,512]{3,2,1,0} fusion(%a, %b), kind=kLoop, calls=%fused_computation.12, metadata={op_name="jit(loss)/deberta/encoder/layer_3/attention/self/add"}
  %fusion.13 = f32[8,6,512,512]{3,2,1,0} fusion(%c, %d), kind=kLoop, calls=%fused_computation.13, metadata={op_name="jit(loss)/deberta/encoder/layer_4/attention/self/add"}
  %custom-call.2 = (bf16[4096,384]{1,0}, s8[0]{0}) custom-call(%e, %f), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(loss)/dense/dot_general"}
  ROOT %tuple = (f32[]) tuple(%g)
}
"""


def test_profile_groups_layers_and_counts_only_device_events():
  profile = _load("profile_step")
  described = profile.hlo_instructions(HLO)
  # The two layers' fusions differ only in the layer number: one label, so they are summed together.
  assert described["fusion.12"] == described["fusion.13"]
  assert "kLoop" in described["fusion.12"] and "layer_N/attention/self/add" in described["fusion.12"]
  assert "__cublas$lt$matmul" in described["custom-call.2"]
  trace = {"traceEvents": [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
      {"ph": "X", "pid": 1, "name": "fusion.12", "dur": 999.0},  # the host-side launch: not counted
      {"ph": "X", "pid": 7, "name": "loop_add_fusion", "dur": 30.0, "args": {"hlo_op": "fusion.12"}},
      {"ph": "X", "pid": 7, "name": "loop_add_fusion", "dur": 50.0, "args": {"hlo_op": "fusion.13"}},
  ]}
  events, where = profile.device_events(trace)
  assert where == "device" and [e["dur"] for e in events] == [30.0, 50.0]
  assert [profile.kernel_key(e) for e in events] == ["fusion.12", "fusion.13"]
  # On the CPU (no device process) the host's XLA ops count, the runtime's bookkeeping does not.
  cpu_trace = {"traceEvents": [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "fusion.12", "dur": 5.0},
      {"ph": "X", "pid": 1, "name": "ThunkExecutor::Execute", "dur": 99.0},
  ]}
  events, where = profile.device_events(cpu_trace)
  assert where == "host" and [e["name"] for e in events] == ["fusion.12"]


def test_bench_reports_the_exception_line_of_a_failed_row(monkeypatch):
  """A row that raises: the table gets the exception line, not JAX's traceback-filtering notice after it."""
  bench = _load("bench")
  failing = ("import sys; sys.stderr.write('Traceback (most recent call last):\\n  File x\\n"
             "ValueError: attention_impl=flash has no kernel for the cpu backend\\n--------------------\\n"
             "For simplicity, JAX has removed its internal frames\\n'); sys.exit(1)")
  real_popen = subprocess.Popen
  # _spawn runs `python bench.py --child SPEC`; run the failing program in its place.
  monkeypatch.setattr(bench.subprocess, "Popen", lambda cmd, **kw: real_popen([sys.executable, "-c", failing], **kw))
  result = bench._spawn({"row": "ours_flash", "size": "xsmall", "length": 8, "mode": "fwd"}, dict(os.environ), 60)
  assert result["error"] == "exit code 1: ValueError: attention_impl=flash has no kernel for the cpu backend"


def test_bench_gives_every_row_the_same_malloc_setting(monkeypatch):
  """Both frameworks run under one GLIBC_TUNABLES: ours by default, the user's if set, none on request."""
  from debertax.compile_options import CPU_MALLOC_TUNABLES
  bench = _load("bench")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  args = type("Args", (), {"no_malloc_tunables": False})()
  env, setting = bench._child_env(args)
  assert env["GLIBC_TUNABLES"] == CPU_MALLOC_TUNABLES and "set by bench.py" in setting
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  env, setting = bench._child_env(args)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and "from the environment" in setting
  args.no_malloc_tunables = True
  env, _ = bench._child_env(args)
  assert "GLIBC_TUNABLES" not in env
