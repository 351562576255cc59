#!/usr/bin/env bash
# Trains tdpo_jax on a Cloud TPU pod slice, end to end:
#   1. create the TPU VM slice,   2. copy this repository to every worker and install it,
#   3. run `python -m tdpo_jax.main --distributed` on every worker (jax.distributed reads the
#      pod's environment), 4. copy worker 0's workdir (logs, images) back, 5. delete the slice.
#
# Usage:
#   launch/tpu_pod.sh --name NAME --zone ZONE --accelerator TYPE [options] [-- MAIN_FLAGS...]
# Options:
#   --project ID            gcloud project (default: gcloud's configured project)
#   --version VERSION       TPU software version (default: by accelerator family)
#   --config PATH           config file and presets (default: configs/sd15.py)
#   --workdir DIR           workdir on the workers; a gs:// bucket keeps checkpoints shared
#                           (default: /tmp/tdpo_run)
#   --local-logs DIR        where worker 0's workdir is copied back (default: ./tpu_logs/NAME)
#   --spot                  create a Spot (preemptible) slice
#   --keep                  do not delete the slice at the end
#   --dry-run               print every gcloud command instead of running it
# Everything after `--` goes to tdpo_jax.main, e.g. `-- --config.num_epochs=10`.
#
# Example (see launch/README.md):
#   launch/tpu_pod.sh --name tdpo-v4 --zone us-central2-b --accelerator v4-32 --dry-run
set -euo pipefail

name=""
zone=""
accelerator=""
project=""
version=""
config="configs/sd15.py"
workdir="/tmp/tdpo_run"
local_logs=""
spot=0
keep=0
dry_run=0
main_flags=()

usage() {
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
  echo "error: $*" >&2
  exit 2
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator) accelerator="${2:?--accelerator needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --local-logs) local_logs="${2:?--local-logs needs a value}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; main_flags=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$accelerator" ]] || die "--accelerator is required (e.g. v4-32, v5litepod-16)"
if [[ -z "$version" ]]; then
  case "$accelerator" in
    v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) die "no default --version for accelerator '$accelerator'; pass --version" ;;
  esac
fi
local_logs="${local_logs:-./tpu_logs/$name}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jax_version="$(sed -n 's/.*"jax\[cpu\]==\([0-9.]*\)".*/\1/p' "$repo_root/setup.py")"
jax_version="${jax_version:-0.10.2}"
archive="/tmp/tdpo_jax_${name}.tar.gz"

common=(--zone="$zone")
if [[ -n "$project" ]]; then
  common+=(--project="$project")
fi

# One shell word, single-quoted where it needs quoting (readable --dry-run output).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, or prints it (one line, copy-pasteable) with --dry-run.
run() {
  if [[ "$dry_run" -eq 1 ]]; then
    local line="" word
    for word in "$@"; do
      line+="${line:+ }$(quote "$word")"
    done
    printf '%s\n' "$line"
  else
    "$@"
  fi
}

# The remote command line of every worker: install, then train. A gs:// workdir needs the
# package's `gcs` extra (etils.epath's GCS filesystem, orbax's bucket check) on every worker.
package="."
if [[ "$workdir" == gs://* ]]; then
  package="'.[gcs]'"
fi
install_cmd="mkdir -p ~/tdpo_jax && tar -xzf ~/tdpo_jax.tar.gz -C ~/tdpo_jax \
&& cd ~/tdpo_jax && python3 -m pip install -q -e ${package} \
&& python3 -m pip install -q 'jax[tpu]==${jax_version}' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
train_cmd="cd ~/tdpo_jax && python3 -m tdpo_jax.main --distributed \
--config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")"
for flag in "${main_flags[@]+"${main_flags[@]}"}"; do
  train_cmd+=" $(printf '%q' "$flag")"
done

teardown() {
  if [[ "$keep" -eq 0 ]]; then
    run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  else
    echo "keeping $name (--keep); delete it with: gcloud compute tpus tpu-vm delete $name --zone=$zone" >&2
  fi
}

create=(gcloud compute tpus tpu-vm create "$name" "${common[@]}"
        --accelerator-type="$accelerator" --version="$version")
if [[ "$spot" -eq 1 ]]; then
  create+=(--spot)
fi

# 1. Create. From here on the slice is deleted on any exit (failure or Ctrl-C) unless --keep.
run "${create[@]}"
if [[ "$dry_run" -eq 0 ]]; then
  trap teardown EXIT
fi

# 2. Install on all workers.
run tar -czf "$archive" -C "$repo_root" --exclude=.git --exclude='*.egg-info' \
  --exclude=__pycache__ --exclude=tpu_logs .
run gcloud compute tpus tpu-vm scp "$archive" "$name:~/tdpo_jax.tar.gz" "${common[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$install_cmd"

# 3. Run on all workers (one process per host; jax.distributed finds the others).
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$train_cmd"

# 4. Copy logs back: process 0 (worker 0) writes metrics, TensorBoard events and images.
run mkdir -p "$local_logs"
if [[ "$workdir" == gs://* ]]; then
  run gcloud storage cp --recursive "$workdir" "$local_logs"
else
  run gcloud compute tpus tpu-vm scp --recurse "$name:$workdir" "$local_logs" "${common[@]}" \
    --worker=0
fi

# 5. Tear down (also on failure, via the EXIT trap).
if [[ "$dry_run" -eq 1 ]]; then
  teardown
fi
