# Sourced by the demo scripts: the repository root as working directory, the virtual environment's programs
# first (VENV, default .venv), no analytics, the start time and a step heading.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV_DIR=${VENV:-.venv}
case "$VENV_DIR" in /*) ;; *) VENV_DIR="$PWD/$VENV_DIR" ;; esac
export PATH="$VENV_DIR/bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0 DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
t0=$(date +%s)
step() { printf '\n\033[1m### %s\033[0m\n' "$*"; }
