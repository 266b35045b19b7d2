import os
import sys
import tempfile

# Tests run on the CPU; 8 simulated devices let the sharding tests build real meshes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling the same small steps again (every pretraining or fine-tuning run
# builds its own jitted functions). JAX's persistent compilation cache shares the executables between the
# tests, the two xdist workers and the subprocesses the tests start (they inherit this environment); it is
# keyed by the HLO, the flags and the jax version, so a changed program compiles afresh.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"debertax-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
