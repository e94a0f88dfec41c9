"""GPU tests (a package, so that tests/gpu/conftest.py does not shadow tests/conftest.py as module `conftest`)."""
