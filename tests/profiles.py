"""The test profile's name in the environment, in a module that imports no framework (the
xdist controller reads it in ``conftest.py`` without importing PyTorch or JAX)."""

# Set by conftest.py from the command line (``--nightly``) before the test modules are
# collected, and inherited by the subprocesses the tests start.
PROFILE_VARIABLE = "LABEL_SMOOTHING_TEST_PROFILE"
