#!/usr/bin/env bash
# The retrain workflow's per-run folders on the kocr-dvc-cache volume (.github/workflows/retrain.yml,
# docs/gpu-server.md section 6). actions/checkout cleans the workspace at every attempt, and with it
# what a killed attempt left for the next one (train.state_dir, tuning/optuna.db): such a path is a
# link to a folder of this workflow run on the volume, which every attempt of the run (same run id)
# reaches again; the folder is removed once dvc repro has passed.
#
#   scripts/retrain_keep.sh keep ROOT [PATH [NAME]]
#       Remove ROOT's folders untouched for over 30 days (a run can be re-run for 30 days after it
#       started: older folders are of runs that never will be), make ROOT/<owner>_<repo>-<run id>
#       ($GITHUB_REPOSITORY, $GITHUB_RUN_ID), and link PATH (relative to the checkout) to that
#       folder, or to NAME inside it; the folder goes to $GITHUB_OUTPUT as `dir`. Without PATH only
#       the old folders go. An absolute PATH is outside the checkout, which the clean leaves alone:
#       nothing is linked.
#   scripts/retrain_keep.sh drop DIR
#       Remove DIR, the folder `keep` made (its `dir` output).
set -euo pipefail

keep() {
  local root=$1 path=${2:-} name=${3:-}
  mkdir -p "$root"
  find "$root" -mindepth 1 -maxdepth 1 -mtime +30 -exec rm -rf {} +
  [ -n "$path" ] || return 0
  case "$path" in
    /*) echo "${path} is outside the checkout: left as it is"; return 0 ;;
  esac
  local folder="${root}/${GITHUB_REPOSITORY//\//_}-${GITHUB_RUN_ID}"
  local target="${folder}${name:+/${name}}"
  mkdir -p "$folder" "$(dirname "$path")"
  rm -rf "$path"
  ln -s "$target" "$path"
  local kept=0
  if [ -e "$target" ]; then
    kept=$(find "$target" -type f -size +0c | wc -l)
  fi
  if [ "$kept" -gt 0 ]; then
    echo "${path} -> ${target}: holds what an earlier attempt left (${kept} non-empty files)"
  else
    echo "${path} -> ${target}: new"
  fi
  echo "dir=${folder}" >> "$GITHUB_OUTPUT"
}

case "${1:-}" in
  keep) [ "$#" -ge 2 ] && [ "$#" -le 4 ] || { echo "usage: $0 keep ROOT [PATH [NAME]]" >&2; exit 2; }
        shift; keep "$@" ;;
  drop) [ "$#" -eq 2 ] && [ -n "$2" ] || { echo "usage: $0 drop DIR" >&2; exit 2; }
        rm -rf -- "$2" ;;
  *) echo "usage: $0 keep ROOT [PATH [NAME]] | drop DIR" >&2; exit 2 ;;
esac
