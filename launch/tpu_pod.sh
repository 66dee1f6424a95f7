#!/usr/bin/env bash
# Run a jaxalign stage on every worker of a TPU VM pod slice (the same program on every host).
#
#   TPU=my-pod ZONE=us-central2-b TYPE=v5p-32 BUCKET=gs://my-bucket \
#     bash launch/tpu_pod.sh --create -- --config=configs/sft.py --config.model.init=gs://.../model
#
# --create  creates the slice first (gcloud compute tpus tpu-vm create).
# Everything after `--` is passed to launch/train.py on every worker; --workdir defaults to $BUCKET/runs/$RUN.
# Every path (workdir, model.init, data.train, ...) may be gs://. After a preemption, rerun the same command
# (with the same RUN, or an explicit --workdir): every worker restores the latest checkpoint from the bucket.
# Without RUN the workdir is named by the date, and a rerun starts a new run. See docs/scaling.md.
# jax.distributed initialises itself on TPU pods (launch/train.py --distributed=auto).
set -euo pipefail
: "${TPU:?set TPU (the slice name)}" "${ZONE:?set ZONE}"
TYPE=${TYPE:-v5p-8}
VERSION=${VERSION:-v2-alpha-tpuv5}
RUN=${RUN:-$(date +%Y%m%d-%H%M%S)}
CREATE=0
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --create) CREATE=1; shift ;;
    --) shift; ARGS=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
WORKDIR_ARG=()
if [[ " ${ARGS[*]:-} " != *" --workdir="* ]]; then
  : "${BUCKET:?set BUCKET or pass --workdir=...}"
  WORKDIR_ARG=("--workdir=$BUCKET/runs/$RUN")
  echo "workdir: $BUCKET/runs/$RUN (to resume after a preemption: rerun with RUN=$RUN)" >&2
fi
if [[ $CREATE == 1 ]]; then
  gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION"
fi
# Copy the code (this checkout) to every worker and install it with the TPU build of JAX.
tar czf /tmp/jaxalign.tgz --exclude=.git --exclude=runs .
gcloud compute tpus tpu-vm scp /tmp/jaxalign.tgz "$TPU":~/ --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e; mkdir -p ~/jaxalign && tar xzf ~/jaxalign.tgz -C ~/jaxalign && cd ~/jaxalign &&
  python3 -m pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# The same command on every worker; each feeds its slice of every global batch.
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd ~/jaxalign && python3 launch/train.py ${ARGS[*]:-} ${WORKDIR_ARG[*]:-}"
