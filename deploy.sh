#!/usr/bin/env bash
# Deploy system <n> (1 throughput, 2 balanced, 3 accuracy) as the Modal app <id>-system-<n>.
#
#   ANDREW_ID=<id> ./deploy.sh <n> [--dry-run] [--id <id>] [--model <hf-id>]
#
# The id comes from, first found: --id, $ANDREW_ID, the file `andrew_id` beside this script, or
# this script's folder when it is named <id>_<n> (the course runs ./<andrewid>_<n>/deploy.sh);
# that folder name also gives <n> when no number is passed. --model (or $MODEL) overrides the
# model, e.g. for system 3: a Hugging Face Hub id (the image downloads it at build time; a local
# dir is refused). --dry-run prints the command and every setting, and deploys nothing.
# The Modal app itself is deploy/modal_app.py; docs/DEPLOY.md says how it is called and checked.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage="usage: ANDREW_ID=<id> $0 <1|2|3> [--dry-run] [--id <id>] [--model <hf-id>]"
die() {
  printf 'deploy.sh: %s\n%s\n' "$1" "$usage" >&2
  exit 2
}

system="" id="${ANDREW_ID:-}" model="${MODEL:-}" dry_run=0
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --id | --model)
      (($# >= 2)) || die "$1 needs a value"
      if [[ $1 == --id ]]; then id="$2"; else model="$2"; fi
      shift
      ;;
    -h | --help)
      echo "$usage"
      exit 0
      ;;
    -*) die "unknown option: $1" ;;
    *)
      [[ -z $system ]] || die "one system number only, got '$system' and '$1'"
      system="$1"
      ;;
  esac
  shift
done

folder="$(basename "$here")"
if [[ $folder =~ ^([a-z0-9]+)_([123])$ ]]; then
  id="${id:-${BASH_REMATCH[1]}}"
  system="${system:-${BASH_REMATCH[2]}}"
fi
if [[ -z $id && -f "$here/andrew_id" ]]; then
  id="$(tr -d '[:space:]' <"$here/andrew_id")"
fi

case "$system" in
  1) profile=throughput ;;
  2) profile=balanced ;;
  3) profile=accuracy ;;
  "") die "no system number: pass 1 (throughput), 2 (balanced) or 3 (accuracy)" ;;
  *) die "bad system number '$system': expected 1 (throughput), 2 (balanced) or 3 (accuracy)" ;;
esac
[[ -n $id ]] || die "no Andrew ID: set ANDREW_ID, pass --id, or write it to $here/andrew_id"
id="$(printf '%s' "$id" | tr '[:upper:]' '[:lower:]')" # not ${id,,}: macOS has bash 3.2
[[ $id =~ ^[a-z0-9][a-z0-9-]*$ ]] || die "bad Andrew ID '$id': letters, digits and '-' only"

# The image build runs snapshot_download(MODEL) on Modal's builder, where a local dir is absent.
if [[ -n $model && (-d $model || $model == /* || $model == .*) ]]; then
  die "--model '$model' is a local path: pass a Hugging Face Hub id (e.g. Qwen/Qwen3-8B), which the image downloads at build time"
fi

export DEPLOY_APP_NAME="$id-system-$system" DEPLOY_PROFILE="$profile"
if [[ -n $model ]]; then export DEPLOY_MODEL="$model"; fi
python="${PYTHON:-$here/.venv/bin/python}"
[[ -x $python ]] || python=python3
app_module="$here/deploy/modal_app.py"
command=("$python" -m modal deploy "$app_module")

if ((dry_run)); then
  echo "command: DEPLOY_APP_NAME=$DEPLOY_APP_NAME DEPLOY_PROFILE=$DEPLOY_PROFILE" \
    "${DEPLOY_MODEL:+DEPLOY_MODEL=$DEPLOY_MODEL }${command[*]}"
  exec "$python" "$app_module"
fi
exec "${command[@]}"
