# Sourced by .ci/sanitize, .ci/memcheck and .ci/jax: ci_venv DIR activates the virtual environment the step runs in.
# With GROUPNORM_CI_VENV set (.ci/run sets it to its README step's environment once that step has passed), that one,
# with groupnorm uninstalled so that only the step's own build can be imported: its torch, pytest and the other test
# packages are reused rather than installed again (a fresh environment took 13 s and torch 25-55 s more, in two of
# the three steps). Else a fresh one in DIR, as when a step is run alone.
ci_venv() {
  if [ -n "${GROUPNORM_CI_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$GROUPNORM_CI_VENV/bin/activate"
    python -m pip uninstall --quiet --yes groupnorm > /dev/null 2>&1 || true
  else
    python3 -m venv "$1"
    # shellcheck disable=SC1091
    source "$1/bin/activate"
    python -m pip install --quiet --upgrade pip
  fi
}
