#!/usr/bin/env bash
# Run a sprintjax training job on a Cloud TPU VM slice (single- or multi-host), end to end:
# create (or queue) the slice, copy this checkout, install, start on every worker, collect the logs.
#
#   PROJECT=my-proj ZONE=us-east5-a ACCELERATOR=v5p-128 RUNTIME=v2-alpha-tpuv5 \
#     launch/tpu_vm.sh my-slice configs/sana_sprint_600m_1024.py /gcs/bucket/runs/sprint600 \
#       --config.train.teacher_checkpoint=/gcs/bucket/teacher --config.data.dir=/gcs/bucket/records
#
# Assumes: gcloud is installed and authenticated with TPU quota in ZONE; WORKDIR, the teacher and the data are
# POSIX paths that every worker sees the same way (sprintjax writes plain files: a GCS bucket mounted with
# Cloud Storage FUSE at the same mount point on each worker, or a Filestore share; gs:// URLs are not read
# directly); python3 (>= 3.11) with venv on the TPU VM image.
# Options (environment): QUEUED=1 uses a queued resource (waits for capacity), SPOT=1 requests spot capacity
# (preemptible: rerun this script with SKIP_CREATE=1 to resume from the last checkpoint), DELETE=1 deletes the
# slice when the job ends. The trainer handles SIGTERM/preemption by saving a checkpoint and exiting.
set -euo pipefail
NAME=${1:?slice name}; CONFIG=${2:?config file[:variant]}; WORKDIR=${3:?workdir (a shared path)}; shift 3
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR, e.g. v5p-128}"
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
G=(gcloud --project "$PROJECT")
spot=(); [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)

if [[ "${SKIP_CREATE:-0}" != 1 ]]; then
  if [[ "${QUEUED:-0}" == 1 ]]; then
    "${G[@]}" compute tpus queued-resources create "$NAME" --node-id "$NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "${spot[@]}"
    until [[ "$("${G[@]}" compute tpus queued-resources describe "$NAME" --zone "$ZONE" \
               --format='value(state.state)')" == ACTIVE ]]; do echo "waiting for capacity ..."; sleep 60; done
  else
    "${G[@]}" compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
      --version "$RUNTIME" "${spot[@]}"
  fi
fi

ssh_all() { "${G[@]}" compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"; }

# Copy exactly the committed tree, then install the pinned environment without the PyTorch side
# (training needs no torch; the lock's libtpu makes jax use the TPU).
archive=$(mktemp -t sprintjax.XXXX.tar.gz)
git archive --format=tar.gz -o "$archive" HEAD
"${G[@]}" compute tpus tpu-vm scp "$archive" "$NAME":sprintjax.tar.gz --zone "$ZONE" --worker=all
rm -f "$archive"
ssh_all 'set -e; rm -rf sprintjax && mkdir sprintjax && tar xzf sprintjax.tar.gz -C sprintjax && cd sprintjax &&
  python3 -m venv .venv && grep -v -E "^(torch|diffusers|transformers|tokenizers)==" requirements.txt > /tmp/req.txt &&
  .venv/bin/pip install -q -r /tmp/req.txt && .venv/bin/pip install -q --no-deps -e .'

# Start on every worker; jax.distributed.initialize() auto-detects the slice (--distributed).
args=$(printf ' %q' "$@")
ssh_all "cd sprintjax && nohup .venv/bin/sprintjax train --config $CONFIG --workdir $WORKDIR --distributed$args \
  > train.log 2>&1; echo \$? > train.exit" || true

mkdir -p "logs/$NAME"
n=$("${G[@]}" compute tpus tpu-vm describe "$NAME" --zone "$ZONE" --format='value(networkEndpoints.len())' || echo 1)
for ((w = 0; w < ${n:-1}; w++)); do
  "${G[@]}" compute tpus tpu-vm scp "$NAME":sprintjax/train.log "logs/$NAME/worker-$w.log" --zone "$ZONE" \
    --worker="$w" || echo "could not fetch the log of worker $w"
done
echo "logs in logs/$NAME/"
if [[ "${DELETE:-0}" == 1 ]]; then "${G[@]}" compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet; fi
