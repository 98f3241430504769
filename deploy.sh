#!/usr/bin/env bash
# Deploy system <n> (1 throughput, 2 balanced, 3 accuracy) as the Modal app <id>-system-<n>.
#
#   ./deploy.sh [<n>] [--id <id>] [--model <hf-id>] [--max-containers <N>]
#               [--reasoning-budget <tokens>] [--dry-run]
#
# The course runs ./<andrewid>_<n>/deploy.sh with no arguments: the folder name gives both.
# The Andrew ID is the first found of: --id, $ANDREW_ID, the first line of deploy/andrew_id.txt
# that is not blank or a comment, the folder name <id>_<n> (any case: ABC_2 gives abc).
# The system number is the first found of: the <n> argument, the folder name <id>_<n>.
# --model overrides the profile's model (a Hugging Face Hub id: a local dir is refused, because
# Modal downloads the weights); --max-containers lets Modal run N 2-GPU containers (default 1);
# --reasoning-budget sets server.py's thinking budget (default: the profile's).
#
# The Modal client is the first that works of: the `modal` command, .venv/bin/python -m modal,
# python3 -m modal; it must be version MIN_MODAL or later. deploy.sh then runs, side by side,
# `modal run --detach deploy/weights.py` (fills the weights volume, and goes on if deploy.sh is
# stopped) and `modal deploy deploy/modal_app.py` (builds the image, deploys). As soon as the
# deploy returns it finds the URL (the SDK, else the deploy's output, else the workspace from
# `modal profile current`), wakes the container with GET /ready and waits for a 200, then prints
# the URL and how to call it. --dry-run prints every setting (deploy/systems.py) and the expected
# timeline (deploy/timeline.py), with python3, and deploys nothing. docs/DEPLOY.md says why.
set -euo pipefail

MIN_MODAL=1.2.0 # the app's oldest needs: env= on functions (1.2.0), startup_timeout (1.1.4)
READY_WAIT_S=900
READY_POLL_S=2      # between /ready requests that came back without a 200
DEPLOY_COLUMNS=400  # for `modal deploy`: room for a 64-character workspace in the URL's line
ENDPOINT=completion # deploy/systems.py's ENDPOINT: the URL's label is <app>-<function>
URL_PATTERN='https://[A-Za-z0-9.-]+\.modal\.run'

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage="usage: $0 [<1|2|3>] [--id <id>] [--model <hf-id>] [--max-containers <N>] [--reasoning-budget <tokens>] [--dry-run]"
die() { # a bad invocation: status 2 and the usage
  printf 'deploy.sh: %s\n%s\n' "$1" "$usage" >&2
  exit 2
}
fail() { # anything else: one line, status 1
  printf 'deploy.sh: %s\n' "$1" >&2
  exit 1
}
older() { # is version $1 (x.y.z) older than $2?
  local a b i
  IFS=. read -r -a a <<<"$1"
  IFS=. read -r -a b <<<"$2"
  for i in 0 1 2; do
    ((a[i] == b[i])) || return $((a[i] > b[i]))
  done
  return 1
}

system_arg="" id_arg="" model="" max_containers=1 reasoning_budget="" dry_run=0
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --id | --model | --max-containers | --reasoning-budget)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --id) id_arg="$2" ;;
        --model) model="$2" ;;
        --max-containers) max_containers="$2" ;;
        *) reasoning_budget="$2" ;;
      esac
      shift
      ;;
    -h | --help)
      echo "$usage"
      exit 0
      ;;
    -*) die "unknown option: $1" ;;
    *)
      [[ -z $system_arg ]] || die "one system number only, got '$system_arg' and '$1'"
      system_arg="$1"
      ;;
  esac
  shift
done

folder="$(basename "$here")"
folder_id="" folder_system=""
if [[ $folder =~ ^([A-Za-z0-9]+)_([0-9]+)$ ]]; then
  folder_id="${BASH_REMATCH[1]}" folder_system="${BASH_REMATCH[2]}"
fi
id_file="$here/deploy/andrew_id.txt"
file_id=""
if [[ -f $id_file ]]; then
  file_id="$(awk '{ sub(/#.*/, ""); gsub(/[[:space:]]/, "") } NF { print; exit }' "$id_file")"
fi

if [[ -n $id_arg ]]; then
  id="$id_arg" id_from="--id"
elif [[ -n ${ANDREW_ID:-} ]]; then
  id="$ANDREW_ID" id_from="\$ANDREW_ID"
elif [[ -n $file_id ]]; then
  id="$file_id" id_from="deploy/andrew_id.txt"
elif [[ -n $folder_id ]]; then
  id="$folder_id" id_from="folder name $folder"
else
  die "no Andrew ID: pass --id <id>, write it in $id_file, or run from a folder named <id>_<n>"
fi
if [[ -n $system_arg ]]; then
  system="$system_arg" system_from="argument"
elif [[ -n $folder_system ]]; then
  system="$folder_system" system_from="folder name $folder"
else
  die "no system number: pass 1 (throughput), 2 (balanced) or 3 (accuracy)"
fi

case "$system" in
  1) profile=throughput ;;
  2) profile=balanced ;;
  3) profile=accuracy ;;
  *) die "bad system number '$system': expected 1 (throughput), 2 (balanced) or 3 (accuracy)" ;;
esac
id="$(printf '%s' "$id" | tr '[:upper:]' '[:lower:]')" # not ${id,,}: macOS has bash 3.2
[[ $id =~ ^[a-z0-9][a-z0-9-]*$ ]] || die "bad Andrew ID '$id' (from $id_from): letters, digits and '-' only"
[[ $max_containers =~ ^[1-9][0-9]*$ ]] || die "bad --max-containers '$max_containers': a whole number >= 1"
[[ -z $reasoning_budget || $reasoning_budget =~ ^[1-9][0-9]*$ ]] ||
  die "bad --reasoning-budget '$reasoning_budget': a whole number of thought tokens >= 1"
# Modal's builder downloads the weights, where a local checkpoint dir does not exist.
if [[ -n $model && (-d $model || $model == /* || $model == .*) ]]; then
  die "--model '$model' is a local path: pass a Hugging Face Hub id (e.g. Qwen/Qwen3-8B)"
fi

app="$id-system-$system"
export DEPLOY_APP_NAME="$app" DEPLOY_PROFILE="$profile" DEPLOY_MODEL="$model" \
  DEPLOY_MAX_CONTAINERS="$max_containers" DEPLOY_REASONING_BUDGET="$reasoning_budget"

if command -v modal >/dev/null 2>&1; then
  modal_cmd=(modal)
elif [[ -x $here/.venv/bin/python ]] && "$here/.venv/bin/python" -c 'import modal' >/dev/null 2>&1; then
  modal_cmd=("$here/.venv/bin/python" -m modal)
elif command -v python3 >/dev/null 2>&1 && python3 -c 'import modal' >/dev/null 2>&1; then
  modal_cmd=(python3 -m modal)
else
  fail "no Modal client: install it (pip install 'modal>=$MIN_MODAL', or pipx install modal), then run: modal setup"
fi
version_text="$("${modal_cmd[@]}" --version 2>&1)" || fail "'${modal_cmd[*]} --version' failed: $version_text"
[[ $version_text =~ ([0-9]+)\.([0-9]+)\.([0-9]+) ]] ||
  fail "cannot read the Modal client's version from '${modal_cmd[*]} --version': $version_text"
version="${BASH_REMATCH[0]}"
if older "$version" "$MIN_MODAL"; then
  fail "Modal client $version is older than $MIN_MODAL, which deploy/modal_app.py needs: pip install -U 'modal>=$MIN_MODAL'"
fi

weights_module="$here/deploy/weights.py"
app_module="$here/deploy/modal_app.py"
echo "id: $id (from $id_from)"
echo "system: $system (from $system_from)"
echo "modal_client: ${modal_cmd[*]} $version (needs >= $MIN_MODAL)"
echo "commands: ${modal_cmd[*]} run --detach $weights_module & ${modal_cmd[*]} deploy $app_module"
if ((dry_run)); then
  command -v python3 >/dev/null 2>&1 || fail "the dry run needs python3 (any 3.9 or later)"
  python3 "$here/deploy/systems.py"
  python3 "$here/deploy/stages.py"
  exec python3 "$here/deploy/timeline.py"
fi
command -v curl >/dev/null 2>&1 || fail "no curl: deploy.sh needs it to wake the container and wait for /ready"

# The fill is detached: it goes on in Modal if deploy.sh is stopped, and the container waits for
# its marker, not for deploy.sh. Only its local client runs here, watched while /ready is polled.
logs="$(mktemp -d "${TMPDIR:-/tmp}/deploy-$app.XXXXXX")"
"${modal_cmd[@]}" run --detach "$weights_module" >"$logs/weights.log" 2>&1 &
weights_pid=$!
weights_done=0
weights_check() { # stop at once if the fill's client failed; print its result once it is done
  if ((weights_done)) || kill -0 "$weights_pid" 2>/dev/null; then
    return 0
  fi
  weights_done=1
  if wait "$weights_pid"; then
    grep "^weights: " "$logs/weights.log" || true
  else
    tail -n 20 "$logs/weights.log" >&2
    fail "the weights step failed (its last lines are above); the container waits for the weights: run deploy.sh again"
  fi
}
# Piped, the client wraps its output at 80 columns, which can fold the URL in two: a wide
# COLUMNS keeps each line whole (docs/DEPLOY.md).
if ! COLUMNS=$DEPLOY_COLUMNS "${modal_cmd[@]}" deploy "$app_module" 2>&1 | tee "$logs/deploy.log"; then
  fail "modal deploy failed (its output is above); the detached weights fill goes on (log: $logs/weights.log)"
fi

sdk_url() { # Modal's own record of the URL, from the SDK of the Python that runs the client
  local python line
  if [[ ${modal_cmd[0]} != modal ]]; then
    python="${modal_cmd[0]}"
  elif line="$(head -n 1 "$(command -v modal)")" && [[ $line =~ ^#!(/[^[:space:]]*/python[0-9.]*)$ ]]; then
    python="${BASH_REMATCH[1]}" # a pip, pipx or uv console script names its interpreter
  else
    return 1
  fi
  "$python" -c 'import sys, modal; print(modal.Function.from_name(*sys.argv[1:]).get_web_url())' \
    "$app" "$ENDPOINT"
}
printed_url() { grep -Eo "$URL_PATTERN" "$logs/deploy.log" | head -n 1; }
profile_url() { # `modal setup` names the profile after the workspace
  local workspace
  workspace="$("${modal_cmd[@]}" profile current)" && [[ $workspace =~ ^[A-Za-z0-9][A-Za-z0-9-]*$ ]] &&
    printf 'https://%s--%s-%s.modal.run\n' "$workspace" "$app" "$ENDPOINT"
}
url=""
for source in sdk_url printed_url profile_url; do
  candidate="$("$source" 2>>"$logs/url.log" || true)"
  if [[ $candidate =~ ^$URL_PATTERN$ ]]; then
    url="$candidate"
    break
  fi
done
[[ -n $url ]] || fail "deployed $app, but found no URL for it (see $logs/url.log): the first request to https://<workspace>--$app-$ENDPOINT.modal.run wakes it"
case "$source" in
  sdk_url) url_from="the Modal SDK" ;;
  printed_url) url_from="modal deploy's output" ;;
  *) url_from="modal profile current, taken as the workspace" ;;
esac

echo "deploy.sh: $url (from $url_from): waking the container, waiting up to ${READY_WAIT_S}s for /ready (every replica loaded)"
deadline=$((SECONDS + READY_WAIT_S))
while :; do
  weights_check
  status="$(curl -s -o /dev/null -w '%{http_code}' --max-time 60 "$url/ready" || true)"
  [[ $status != 200 ]] || break
  ((SECONDS < deadline)) || fail "$url/ready did not answer 200 within ${READY_WAIT_S}s (last: $status): see modal app logs $app"
  sleep "$READY_POLL_S"
done
weights_check

cat <<EOF

endpoint: $url
health:   curl -s $url/health
try it:   curl -s $url/v1/completions -H 'Content-Type: application/json' -d '{"prompt": ["What is 2+2?", "Name a prime."], "max_tokens": 64}'
course client: set url = "$url" in the course's hit_endpoint.py or request/make_requests.py, then: python make_requests.py
this repo's replay of the course schedule: python -m loadtest replay --url $url --out out/replay-$app
logs: modal app logs $app    stop: modal app stop $app
EOF
