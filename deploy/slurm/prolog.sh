#!/bin/sh
# carbond Slurm Prolog (slurm.conf: Prolog=/etc/slurm/carbond-prolog.sh, with PrologFlags=Alloc so it runs when the
# allocation starts on each node, not at its first step). Hands the node's carbond daemon the job's metadata through
# a node-local spool directory: <spool>/job_<id>.json, written to a temporary file and renamed into place, so carbond
# never reads half a file. It never fails the job: every path ends in `exit 0` (a failing Prolog drains the node).
#
# Slurm gives the node Prolog SLURM_JOB_ID, SLURM_JOB_UID, SLURM_JOB_USER, SLURM_JOB_ACCOUNT, SLURM_JOB_PARTITION,
# SLURM_JOB_NUM_NODES, SLURM_NODELIST (22.05; SLURM_JOB_NODELIST in some releases), SLURMD_NODENAME and
# SLURM_CLUSTER_NAME; SLURM_JOB_NAME is only given to PrologSlurmctld and the srun/task prologs, so "name" is empty
# unless the site's environment sets it. Slurm sets no PATH for prologs.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

spool="${CARBOND_SLURM_SPOOL:-/run/carbond/slurm}"
id="${SLURM_JOB_ID:-}"
case "$id" in
  '' | *[!0-9]*) exit 0 ;;  # no job, or not a job ID: nothing to hand over
esac
[ -d "$spool" ] && [ -w "$spool" ] || exit 0  # carbond not installed or not running here: nothing to do

# A JSON string's body: backslashes and quotes escaped, tabs and carriage returns as spaces, other control
# characters dropped, lines joined with \n.
json_str() {
  printf '%s' "$1" | tr '\011\015' '  ' | tr -d '\001-\010\013\014\016-\037' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' \
    | awk 'NR > 1 { printf "%s", "\\n" } { printf "%s", $0 }'
}

# A JSON number, or null when the value is not a plain unsigned integer.
json_int() {
  case "$1" in
    '' | *[!0-9]*) printf 'null' ;;
    *) printf '%s' "$1" ;;
  esac
}

now=$(date +%s 2>/dev/null)
tmp="$spool/.job_$id.json.$$"
if {
  printf '{"job_id": "%s", ' "$id"
  printf '"user": "%s", ' "$(json_str "${SLURM_JOB_USER:-}")"
  printf '"uid": %s, ' "$(json_int "${SLURM_JOB_UID:-}")"
  printf '"account": "%s", ' "$(json_str "${SLURM_JOB_ACCOUNT:-}")"
  printf '"partition": "%s", ' "$(json_str "${SLURM_JOB_PARTITION:-}")"
  printf '"name": "%s", ' "$(json_str "${SLURM_JOB_NAME:-}")"
  printf '"nodes": "%s", ' "$(json_str "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}")"
  printf '"num_nodes": %s, ' "$(json_int "${SLURM_JOB_NUM_NODES:-}")"
  printf '"node": "%s", ' "$(json_str "${SLURMD_NODENAME:-}")"
  printf '"cluster": "%s", ' "$(json_str "${SLURM_CLUSTER_NAME:-}")"
  printf '"start": %s}\n' "$(json_int "$now")"
} >"$tmp" 2>/dev/null; then
  mv -f "$tmp" "$spool/job_$id.json" 2>/dev/null || rm -f "$tmp"
else
  rm -f "$tmp" 2>/dev/null
fi
exit 0
