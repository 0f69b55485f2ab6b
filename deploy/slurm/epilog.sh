#!/bin/sh
# carbond Slurm Epilog (slurm.conf: Epilog=/etc/slurm/carbond-epilog.sh). Tells the node's carbond daemon the job has
# ended: <spool>/job_<id>.end, written to a temporary file and renamed into place. carbond then writes the job's line
# to its ledger once the tick covering the end is in. It never fails: every path ends in `exit 0` (a failing Epilog
# drains the node).
#
# Optional, off by default: with CARBOND_SLURM_ADMIN_COMMENT=1 the job's one-line carbon summary
# (`carbond slurm report --oneline`) goes into its AdminComment (or the field CARBOND_SLURM_COMMENT_FIELD names,
# e.g. Comment), with one `scontrol update` per job:
#   - as the node Epilog, only for single-node jobs (SLURM_JOB_NUM_NODES 1), from this node's ledger;
#   - as EpilogSlurmctld (once per job, on the controller), for any job, from the source CARBOND_SLURM_REPORT_ARGS
#     names (`--nodes-dir /shared/carbond` or `--prometheus http://prometheus:9090`); no spool file there.
# The summary waits for the ledger line (up to CARBOND_SLURM_REPORT_WAIT seconds, default 60) in the background, so
# the node is released at once.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

spool="${CARBOND_SLURM_SPOOL:-/run/carbond/slurm}"
id="${SLURM_JOB_ID:-}"
case "$id" in
  '' | *[!0-9]*) exit 0 ;;
esac
context="${SLURM_SCRIPT_CONTEXT:-epilog_slurmd}"

if [ "$context" != "epilog_slurmctld" ] && [ -d "$spool" ] && [ -w "$spool" ]; then
  now=$(date +%s 2>/dev/null)
  case "$now" in
    '' | *[!0-9]*) now=null ;;
  esac
  tmp="$spool/.job_$id.end.$$"
  if printf '{"job_id": "%s", "end": %s}\n' "$id" "$now" >"$tmp" 2>/dev/null; then
    mv -f "$tmp" "$spool/job_$id.end" 2>/dev/null || rm -f "$tmp"
  else
    rm -f "$tmp" 2>/dev/null
  fi
fi

comment() {
  carbond="${CARBOND_BIN:-carbond}"
  field="${CARBOND_SLURM_COMMENT_FIELD:-AdminComment}"
  # shellcheck disable=SC2086 # the report arguments are words the site chose
  line=$("$carbond" slurm report --oneline --wait "${CARBOND_SLURM_REPORT_WAIT:-60}" $CARBOND_SLURM_REPORT_ARGS "$id" \
    2>/dev/null) || return 0
  [ -n "$line" ] || return 0
  "${SCONTROL:-scontrol}" update "job=$id" "$field=$line" >/dev/null 2>&1
  return 0
}

if [ "${CARBOND_SLURM_ADMIN_COMMENT:-0}" = 1 ]; then
  if [ "$context" = "epilog_slurmctld" ] || [ "${SLURM_JOB_NUM_NODES:-1}" = 1 ]; then
    if [ "${CARBOND_SLURM_COMMENT_FOREGROUND:-0}" = 1 ]; then
      comment
    else  # in the background: the node is released while the ledger line is awaited
      (comment) </dev/null >/dev/null 2>&1 &
    fi
  fi
fi
exit 0
