"""`bazel test` entry point: runs the pytest module given as argument (py_test needs a main)."""

import os
import sys

import pytest

if __name__ == "__main__":
    args = ["-q", "-p", "no:cacheprovider", *sys.argv[1:]]
    if "TEST_TMPDIR" in os.environ:  # Bazel's per-test scratch folder
        args.append(f"--basetemp={os.path.join(os.environ['TEST_TMPDIR'], 'pytest')}")
    sys.exit(pytest.main(args))
