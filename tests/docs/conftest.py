"""Settings of the documentation tests: the ``docs`` marker and a non-interactive Matplotlib backend."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    """Register the ``docs`` marker (no ini file needed)."""
    config.addinivalue_line("markers", "docs: runs the Python code blocks of README.md and docs/ (slow)")
