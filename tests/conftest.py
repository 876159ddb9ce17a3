"""Test-wide settings and shared fixtures.

* Profiles. ``ci`` (the default) is sized so that ``python -m pytest -n 2`` runs in minutes on
  two cores; ``python -m pytest -n 2 --nightly`` runs the ``nightly`` profile: 10,000 hypothesis
  examples per property (random, not derandomized) and every registry case on every dtype and
  execution path. ``docs/testing.md`` says what each profile runs. The profile is also in the
  environment (``tests.profiles.PROFILE_VARIABLE``), so the check scripts that tests start in
  subprocesses see it.
* float64 tests need jax_enable_x64; every array here names its dtype, so turning it on globally
  changes no float32 or bf16 result. JAX has two CPU devices (for the sharded path).
* One persistent JAX compilation cache, shared by the pytest-xdist workers, the subprocesses
  the tests start and the next run (see :func:`_share_one_compilation_cache`); Inductor's
  cache beside it. Both under ``~/.cache/label-smoothing-parity`` unless
  ``JAX_COMPILATION_CACHE_DIR`` or ``TORCHINDUCTOR_CACHE_DIR`` is set.
"""

import gc
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

from tests.profiles import PROFILE_VARIABLE


def _set_up_the_frameworks() -> None:
    """Import and configure PyTorch, Triton and JAX for the tests, before collection. The xdist
    controller (``-n 2``), which only hands tests to its workers, skips this: its start is
    the first seconds of every run."""
    _collect_the_oldest_generation_rarely()
    # AOTAutograd's cache (the forward and backward graphs it partitioned, read back by the next
    # run) skips every graph that holds a custom autograd.Function unless told otherwise, and
    # lstorch's losses are autograd.Functions: every torch.compile case partitioned its graph
    # again in every run. Dynamo traces the Function's forward and backward into the graph the
    # cache keys on, so a change to either is a new key (checked by hand: a backward scaled by
    # 1.001 fails the compile rows with the cache warm, as without it). Read when torch's
    # functorch config is imported, so set before torch.
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD", "1")
    # Inductor's cache (its compiled C++, FX graphs and AOTAutograd's graphs) beside JAX's, in
    # the user's cache folder, rather than its default /tmp/torchinductor_$USER, which a reboot
    # or a cleaner of /tmp empties (a cold cache: minutes of C++ compiles). Read when Inductor's
    # config is imported, so set before torch.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_cache_home(), "inductor"))
    import torch

    # torch.compile (the compile path of tests/test_paths.py) compiles in this process instead
    # of starting a pool of compiler processes in every xdist worker (before Inductor loads).
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One thread of PyTorch's intra-op pool per xdist worker (and in the processes it
        # starts): with a worker per core, a second thread each only waits for the core the
        # other worker holds; the suite's tensors are small. About 5% of the suite's time on
        # CI's two cores.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if not torch.cuda.is_available():
        # lstorch's Triton kernels (the Triton execution paths, tests/test_paths.py) run in
        # Triton's interpreter on a CPU; it must be switched on before anything imports Triton.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    # No Python traceback in the location of every operation JAX lowers (JAX keeps up to 100
    # frames each by default, for XLA's error messages and profiles): the suite lowers thousands
    # of small programs, and writing those locations was about a tenth of the twin rows' time.
    # Set before JAX is imported, so the processes the tests start inherit it.
    os.environ.setdefault("JAX_TRACEBACK_IN_LOCATIONS_LIMIT", "0")
    os.environ.setdefault("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "0")

    import jax

    jax.config.update("jax_enable_x64", True)
    # Two CPU devices, so the sharded execution path (tests/test_paths.py) runs in the test
    # process, with its caches, instead of in a subprocess; every other test runs on the first
    # device, as before (set before JAX starts its backend, at the first array).
    jax.config.update("jax_num_cpu_devices", 2)
    _share_one_compilation_cache()


def _collect_the_oldest_generation_rarely() -> None:
    """Python's full garbage collections (generation 2) at most once per 1000 collections of
    generation 1, instead of once per 10.

    A full collection walks every live object, and a test process holds millions: the
    frameworks' modules and JAX's caches of traced, lowered and compiled programs, which grow
    with every case. Each took 0.3 to 0.8 s on CI's two cores, and with Python's default
    thresholds a worker ran 27 to 36 of them: 18 to 28 s of each worker's run
    (``gc.callbacks``, 2026-12-01). The suite's cyclic garbage is short-lived, and
    generations 0 and 1 still reclaim it as before: over the twin rows, the autodiff orders and
    the option derivatives in one process, the resident memory at the end was the same (3.09
    GB) either way, and a final full collection found 22k unreachable objects instead of 15k.
    Nothing a test checks depends on when a cycle is freed."""
    threshold0, threshold1, _ = gc.get_threshold()
    gc.set_threshold(threshold0, threshold1, 1000)


def _cache_home() -> str:
    """``~/.cache/label-smoothing-parity`` (under ``$XDG_CACHE_HOME`` when that is set): the
    folder of the compilation caches the tests keep between runs."""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "label-smoothing-parity")


def _share_one_compilation_cache() -> None:
    """Point JAX's persistent compilation cache at one folder that every test process uses.

    ``JAX_COMPILATION_CACHE_DIR`` names it (``~/.cache/label-smoothing-parity/jax`` unless it is
    set already), so the xdist workers and every subprocess a test starts inherit it: a program
    one of them compiled is read back by the others (several times cheaper than compiling it),
    and by the next run, as Inductor's cache (``~/.cache/label-smoothing-parity/inductor``) is.
    It also catches the programs JAX's in-memory caches evict: the suite compiles more distinct
    small programs (twin cases, dtypes and shapes) than they keep. The key of an entry is the
    program, its compile options and the jax/jaxlib versions: same key, same executable.
    """
    import jax

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_cache_home(), "jax"))
    # Cache every program, however small or quick to compile (the environment variables reach
    # the subprocesses too).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )
    jax.config.update(
        "jax_persistent_cache_min_entry_size_bytes",
        int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
    )


_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
# ci: 25 fixed examples per property (each example is new shapes and options, so new JAX
# programs: about 2 s of a property's time on CI's cores per 5 examples); nightly explores.
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("nightly", max_examples=10_000, **_COMMON)


def pytest_addoption(parser):
    parser.addoption(
        "--nightly",
        action="store_true",
        help="the nightly profile: 10,000 hypothesis examples per property and every registry "
        "case on every dtype and execution path (docs/testing.md)",
    )


def pytest_configure(config):
    if not (config.getoption("numprocesses", None) and not hasattr(config, "workerinput")):
        _set_up_the_frameworks()
    # Before collection, so the test modules' parametrizations see the profile; the xdist
    # workers get the same command line and set it themselves.
    profile = "nightly" if config.getoption("nightly") else os.environ.get(PROFILE_VARIABLE, "ci")
    os.environ[PROFILE_VARIABLE] = profile
    settings.load_profile(profile)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if hasattr(config, "workerinput"):
        _end_the_worker_now()


def _end_the_worker_now() -> None:
    """End an xdist worker at its last hook, without tearing its interpreter down.

    By then the worker has sent every result to the controller (``workerfinished`` goes at the
    end of its session), and the controller waits for the worker's process to end before it
    prints the summary. Tearing down a process that holds JAX's compiled programs and
    PyTorch's and Inductor's caches (JAX's exit handler clearing its backends, the collection
    of the test items, then every module) took 3 to 10 s of every run's wall time on CI's two
    cores, with nothing tested. Nothing is lost: the exit status comes from the reports the
    controller already holds, and the caches a later run reads (JAX's persistent cache,
    Inductor's) are written when a program is compiled, not at exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(params=["jax", "torch"])
def framework(request):
    """``(module, array)`` for each framework: ``lsjax`` with ``jnp.asarray``, ``lstorch``
    with ``torch.as_tensor``."""
    from tests.helpers import FRAMEWORKS

    return FRAMEWORKS[request.param]


# The tests that take many seconds each (most CPU time first), started first so that the two
# xdist workers end together: a long test handed out last keeps one worker busy while the
# other waits.
LONG_FIRST = (
    "tests/test_properties.py::test_every_registered_twin",
    "tests/test_paths.py::test_twin_on_path_equals_plain_path_and_oracle[torch: compile",
    "tests/test_properties.py",
    "tests/test_triton.py::test_the_kernels_equal_the_oracle_in_every_option",
    "tests/test_distributed.py",
    "tests/test_fused.py::test_the_lm_head_example",
    "tests/test_examples.py",
    "tests/test_sharded.py",
    "tests/test_isolation.py",
    "tests/test_bench_gpu.py::test_gpu_benchmark",
)


def pytest_collection_modifyitems(config, items):
    """Deal the long tests in turn to the start of each xdist worker's first batch (the
    ``load`` scheduler gives each worker a batch of ``len(items) // workers // 4`` consecutive
    tests first, then one at a time as they finish); without xdist, run them first."""
    rank = {}
    for item in items:
        for position, prefix in enumerate(LONG_FIRST):
            if item.nodeid.startswith(prefix):
                rank[item.nodeid] = position
                break
    long = sorted((i for i in items if i.nodeid in rank), key=lambda i: rank[i.nodeid])
    rest = [item for item in items if item.nodeid not in rank]
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    batch = max(len(items) // workers // 4, 2)
    ordered = []
    for worker in range(workers):
        ordered += long[worker::workers]
        if worker < workers - 1:
            take = max(batch * (worker + 1) - len(ordered), 0)
            ordered += rest[:take]
            rest = rest[take:]
    items[:] = ordered + rest
