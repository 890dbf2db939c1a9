#!/usr/bin/env bash
# Submit examples/quickstart.py to a running Ray cluster through the jobs API.
#
# Usage (from the project root):
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/submit_job.sh [quickstart args...]
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/submit_job.sh --replicates 200
#
# RAY_ADDRESS   the cluster's jobs API (the dashboard port, 8265), e.g. after
#               `ray dashboard cluster/aws.yaml` has tunnelled it to localhost. Required.
#
# What it does: uploads the current directory -- the project, crystallize itself included
# (crystallize/ and crystallize_ray/ at its root; it is not on PyPI under this name) -- as
# the job's working directory, where the driver and every worker import it from; has Ray
# pip-install crystallize's own dependencies (read from pyproject.toml) into the job's
# environment; and runs the quickstart as the job's driver on the head node. Inside the job Ray sets RAY_ADDRESS for the driver, so
# RayExecution joins the cluster instead of starting a local Ray. `ray job submit` waits
# and streams the driver's output; Ctrl-C stops following, not the job
# (`ray job stop <id>` does).
#
# Optional environment:
#   CRYSTALLIZE_CACHE_DIR   a path every node mounts (NFS, EFS); passed to the job so the
#                           step cache is shared across nodes. Without it the driver's
#                           ./.cache is a per-job temporary directory on the head.
#   CRYSTALLIZE_PIP         requirement specs, separated by spaces, that the job's
#                           environment pip-installs (default: the dependencies in
#                           pyproject.toml); set it empty when the nodes already have
#                           them (clusters from cluster/*.yaml install the project).
#   CRYSTALLIZE_DRY_RUN     set: print the `ray job submit` command (one argument per
#                           line) instead of running it.
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH
#                           the cluster's token (or a file holding it) when it runs with
#                           token authentication; RAY_AUTH_MODE is then set to "token".
#                           A token in ~/.ray/auth_token needs RAY_AUTH_MODE=token set
#                           by you.
set -euo pipefail

if [[ -z "${RAY_ADDRESS:-}" ]]; then
    echo "submit_job.sh: set RAY_ADDRESS to the cluster's jobs API, e.g." >&2
    echo "  RAY_ADDRESS=http://127.0.0.1:8265 $0   (after: ray dashboard cluster/aws.yaml)" >&2
    exit 2
fi
if [[ ! -f examples/quickstart.py ]]; then
    echo "submit_job.sh: run it from the project root (examples/quickstart.py not found in $PWD)" >&2
    exit 2
fi
if ! command -v ray >/dev/null 2>&1; then
    echo "submit_job.sh: the 'ray' command is not on PATH: pip install -e '.[ray]' (from the project root)" >&2
    exit 2
fi

# A token given explicitly only makes sense in token mode.
if [[ -n "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" && -z "${RAY_AUTH_MODE:-}" ]]; then
    export RAY_AUTH_MODE=token
fi

# crystallize's own dependencies, as pyproject.toml lists them (the code itself travels
# in the working directory).
project_deps() {
    python3 - <<'PY'
import re
text = open("pyproject.toml").read()
try:
    import tomllib
    deps = tomllib.loads(text)["project"]["dependencies"]
except ModuleNotFoundError:  # Python < 3.11: the list is simple enough to read
    deps = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1))
print(" ".join(deps))
PY
}
if [[ -z "${CRYSTALLIZE_PIP+set}" ]]; then
    pip_spec="$(project_deps)"  # unset: the project's dependencies
else
    pip_spec="$CRYSTALLIZE_PIP"  # set empty: none
fi
for value in "$pip_spec" "${CRYSTALLIZE_CACHE_DIR:-}"; do
    if [[ "$value" == *[\"\\]* ]]; then
        echo "submit_job.sh: CRYSTALLIZE_PIP and CRYSTALLIZE_CACHE_DIR may not contain quotes or backslashes" >&2
        exit 2
    fi
done
parts=()
if [[ -n "$pip_spec" ]]; then
    read -r -a specs <<< "$pip_spec"
    parts+=("\"pip\": [$(printf '"%s",' "${specs[@]}" | sed 's/,$//')]")
fi
[[ -n "${CRYSTALLIZE_CACHE_DIR:-}" ]] && parts+=("\"env_vars\": {\"CRYSTALLIZE_CACHE_DIR\": \"$CRYSTALLIZE_CACHE_DIR\"}")
runtime_env="{$(IFS=,; echo "${parts[*]:-}")}"

command=(ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env"
         -- python examples/quickstart.py "$@")
if [[ -n "${CRYSTALLIZE_DRY_RUN:-}" ]]; then  # print the command, one argument per line
    printf '%s\n' "${command[@]}"
    exit 0
fi
exec "${command[@]}"
