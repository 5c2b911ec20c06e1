# shellcheck shell=bash
# Shared by the vlmtrain SLURM scripts: training arguments, stop-signal forwarding, requeue on exit 75.
#
# The batch scripts source this file and then call, in order:
#   vlm_trap_stop_signal   catch SIGUSR1 in the batch shell (sent by `#SBATCH --signal=B:USR1@...`)
#   vlm_enter_repo         cd into the checkout, activate VENV, check launch/train.py is there
#   vlm_train_args         fill VLM_TRAIN_ARGS from the knobs (STAGES, CONFIGS, DS_CONFIG, ...)
#   vlm_run MODE CMD...    run the training in the background, forward SIGUSR1 to it, wait,
#                          `scontrol requeue` when it exits 75, and exit with its status.
#
# Signal path: Slurm signals only the batch shell (B:); the shell forwards SIGUSR1 to the training
# processes; the trainer (vlmtrain.train.trainer.PreemptionFlag) finishes its optimizer step, writes a
# checkpoint on every rank and exits with PREEMPTED_EXIT_CODE = 75. Launchers (deepspeed, torchrun) are
# started with SIGUSR1 ignored, so only the trainer, which installs its own handler, acts on it; the
# ignored disposition is inherited across fork and exec, the trainer's handler replaces it.

readonly VLM_PREEMPTED_EXIT_CODE=75 # vlmtrain.train.trainer.PREEMPTED_EXIT_CODE

# Prefix for a command that must not die of SIGUSR1 before the trainer installs its handler.
VLM_IGNORE_USR1=(bash -c 'trap "" USR1; exec "$@"' vlmtrain-ignore-usr1)

VLM_STOP_REQUESTED=0 # set by the SIGUSR1 trap
VLM_SIGNAL_TARGET="" # "PID" (srun forwards it to the whole step) or "-PGID" (a process group)

vlm_log() {
	echo "[vlmtrain-slurm $(date '+%F %T')] $*"
}

vlm_die() {
	echo "[vlmtrain-slurm] error: $*" >&2
	exit 2
}

vlm_forward_stop_signal() {
	[[ -n $VLM_SIGNAL_TARGET ]] || return 0
	if kill -s USR1 -- "$VLM_SIGNAL_TARGET" 2>/dev/null; then
		vlm_log "forwarded SIGUSR1 to ${VLM_SIGNAL_TARGET}"
	else
		vlm_log "could not signal ${VLM_SIGNAL_TARGET} (already exited?)"
	fi
}

vlm_on_stop_signal() {
	vlm_log "received SIGUSR1: asking the trainer to checkpoint and exit ${VLM_PREEMPTED_EXIT_CODE}"
	VLM_STOP_REQUESTED=1
	vlm_forward_stop_signal
}

# Install the trap first thing: without it bash's default action for SIGUSR1 kills the batch shell.
vlm_trap_stop_signal() {
	trap vlm_on_stop_signal USR1
}

# cd into the checkout that holds launch/train.py and ds_configs/; sbatch runs a copy of the script
# from a spool directory, so the checkout comes from VLMTRAIN_DIR or the submission directory.
vlm_enter_repo() {
	local repo=${VLMTRAIN_DIR:-${SLURM_SUBMIT_DIR:-}}
	[[ -n $repo ]] || vlm_die "set VLMTRAIN_DIR to the vlmtrain checkout (or submit from it)"
	cd "$repo" || vlm_die "cannot cd into VLMTRAIN_DIR=$repo"
	[[ -f launch/train.py ]] ||
		vlm_die "$repo has no launch/train.py; submit from the vlmtrain checkout or set VLMTRAIN_DIR"
	if [[ -n ${VENV:-} ]]; then
		[[ -f $VENV/bin/activate ]] || vlm_die "VENV=$VENV has no bin/activate"
		# shellcheck disable=SC1091
		source "$VENV/bin/activate"
	fi
}

# GPUs per node: GPUS_PER_NODE, else what Slurm allocated (--gpus-per-node / --gres=gpu:N).
vlm_gpus_per_node() {
	local n=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
	[[ $n =~ ^[1-9][0-9]*$ ]] ||
		vlm_die "GPUs per node unknown (got '${n}'): request GPUs with --gpus-per-node or set GPUS_PER_NODE"
	echo "$n"
}

# First host of the allocation: rendezvous / process-group master.
vlm_master_addr() {
	local hosts
	# mapfile instead of `| head -n1`: with pipefail an early-closing head can fail the pipeline.
	mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
	[[ ${#hosts[@]} -gt 0 && -n ${hosts[0]} ]] ||
		vlm_die "scontrol show hostnames '$SLURM_JOB_NODELIST' returned no host"
	echo "${hosts[0]}"
}

# MASTER_PORT, else one derived from the job id: stable across requeues, different for concurrent
# jobs, and below the Linux ephemeral range (32768+) so outgoing connections do not take it.
vlm_master_port() {
	echo "${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
}

# The arguments of `launch/train.py` from the knobs; --resume auto continues a requeued job.
vlm_train_args() {
	local items item
	[[ -n ${RUN_DIR:-} ]] || vlm_die "set RUN_DIR (on storage every node and every requeue sees)"
	[[ -n ${STAGES:-}${CONFIGS:-} ]] ||
		vlm_die "nothing to train: set STAGES (e.g. 0-3) and/or CONFIGS (stage config JSON files)"
	VLM_TRAIN_ARGS=(--run-dir "$RUN_DIR" --resume auto)
	# `${a[@]+"${a[@]}"}`: an empty array under `set -u` is an error in bash < 4.4.
	read -r -a items <<<"${STAGES:-}"
	for item in ${items[@]+"${items[@]}"}; do VLM_TRAIN_ARGS+=(--stage "$item"); done
	read -r -a items <<<"${CONFIGS:-}"
	for item in ${items[@]+"${items[@]}"}; do VLM_TRAIN_ARGS+=(--config "$item"); done
	if [[ -n ${DS_CONFIG:-} ]]; then VLM_TRAIN_ARGS+=(--set "train.ds_config=$DS_CONFIG"); fi
	if [[ -n ${ENGINE:-} ]]; then VLM_TRAIN_ARGS+=(--engine "$ENGINE"); fi
	read -r -a items <<<"${OVERRIDES:-}"
	for item in ${items[@]+"${items[@]}"}; do VLM_TRAIN_ARGS+=(--set "$item"); done
}

# Wait until PID exits and return its status. A trapped signal interrupts `wait` (status > 128) while
# the child runs on, so wait again. Once a stop was requested, poll instead and forward SIGUSR1 again
# every VLM_RESIGNAL_EVERY seconds: a signal that landed while the trainer had no handler installed yet
# (model loading, between two stages) was ignored, and the next one is not.
vlm_wait() {
	local pid=$1 every=${VLM_RESIGNAL_EVERY:-30} polled=0 status=0
	while kill -0 "$pid" 2>/dev/null; do
		if ((VLM_STOP_REQUESTED)); then
			sleep 1 || true
			polled=$((polled + 1))
			if ((polled % every == 0)) && kill -0 "$pid" 2>/dev/null; then vlm_forward_stop_signal; fi
		else
			wait "$pid" || true
		fi
	done
	wait "$pid" || status=$? # bash keeps the status of a reaped background child for `wait`
	return "$status"
}

# vlm_run MODE CMD...: run CMD, forward SIGUSR1 to it, requeue on exit 75, exit with CMD's status.
#   MODE=group  CMD runs in a new session (setsid) with SIGUSR1 ignored; the signal goes to its whole
#               process group (launcher, ranks and their data-loader workers).
#   MODE=srun   CMD is an srun step; srun forwards the signal to every process of the step.
vlm_run() {
	local mode=$1 pid status=0
	shift
	vlm_log "running: $*"
	case $mode in
	group)
		# The subshell ignores USR1 before it becomes a process group, so a signal can never find the
		# group without the ignore in place.
		(
			trap '' USR1
			exec setsid "$@"
		) &
		pid=$!
		VLM_SIGNAL_TARGET="-$pid"
		;;
	srun)
		"$@" &
		pid=$!
		VLM_SIGNAL_TARGET="$pid"
		;;
	*) vlm_die "vlm_run: unknown mode '$mode' (group or srun)" ;;
	esac
	vlm_wait "$pid" || status=$?
	VLM_SIGNAL_TARGET=""
	vlm_finish "$status"
}

vlm_finish() {
	local status=$1
	if ((status == VLM_PREEMPTED_EXIT_CODE)); then
		vlm_log "training checkpointed and stopped (exit ${status}): requeueing job ${SLURM_JOB_ID}"
		if ! scontrol requeue "$SLURM_JOB_ID"; then
			vlm_log "scontrol requeue failed: resubmit with the same RUN_DIR (${RUN_DIR}) to resume"
		fi
	elif ((status != 0)); then
		vlm_log "training failed with exit status ${status}: not requeueing"
	else
		vlm_log "training finished"
	fi
	exit "$status"
}
