# Sourced by the sbatch templates right after they start `srun ... &`: waits for that srun, and on USR1 (the
# time-limit warning of --signal=B:USR1@N) or SIGTERM (preemption) sends SIGTERM to every process of the job's
# steps (torchrun and its ranks, on every node; not to srun, which would cancel the step, nor to this script);
# the recipe saves a checkpoint at the step it is on and exits 0. After
# USR1 this script requeues the job; after SIGTERM SLURM itself does when it preempted the job (PreemptMode=REQUEUE),
# and a job cancelled with scancel stays cancelled. SLURM_JOB_ID survives a requeue, so RUN_DIR does, and the
# requeued job resumes from the checkpoint.
SRUN_PID=$!
STOP_SIGNAL=
stop_training() {
	STOP_SIGNAL=$1
	echo "got $1: the run saves a checkpoint at its current step, then the job is requeued"
	scancel --signal=TERM "$SLURM_JOB_ID"
}
trap 'stop_training USR1' USR1
trap 'stop_training TERM' TERM

# `wait` returns early when a trapped signal arrives: wait again until srun has really ended.
STATUS=0
while kill -0 "$SRUN_PID" 2>/dev/null; do
	wait "$SRUN_PID"
	STATUS=$?
done
if [ "$STOP_SIGNAL" = USR1 ]; then
	scontrol requeue "$SLURM_JOB_ID"
	exit 0
fi
exit "$STATUS"
