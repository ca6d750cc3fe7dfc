"""Registers the ``notebooks`` marker (deselect these slow tests with ``-m "not notebooks"``)."""


def pytest_configure(config):
    """Register the marker, so that ``--strict-markers`` accepts it."""
    config.addinivalue_line(
        "markers", "notebooks: executes the tutorial notebooks of tutorials/ (slow; deselect with -m 'not notebooks')")
