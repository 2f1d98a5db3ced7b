#!/bin/sh
# The test suite (what CI runs): sets up the environment if needed, then pytest.
. "$(dirname "$0")/env.sh"
exec python -m pytest tests "$@"
