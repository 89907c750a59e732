"""Train a dense or MoE language model from a config file.

  python experiments/train.py --config=configs/lm.py:switch-cpu --workdir=/tmp/switch \
      [--config.train.num_steps=400 --config.moe.num_experts=16 ...]

Multi-process (TPU pod, GPU cluster): add --distributed on every process; on a plain set of hosts also
--coordinator_address=HOST:PORT --num_processes=N --process_id=I. Each process reads its slice of the data;
process 0 writes metrics; checkpoints are written collectively. Start-up waits at most
--config.train.startup_timeout_s for every process to connect, printing who it waits for. A process that stops
responding later (killed, its machine gone) is noticed by the others within --config.train.peer_timeout_s: each
stops with one line naming it (exit 1), instead of JAX's fatal abort with a thread dump (`_watch_peers`). Process
0 hosts JAX's coordination service: when it is gone JAX aborts the others at once from C++, so with --distributed
the trainer runs as a child of a small supervisor that turns that abort into one line, exit 1 (`_supervise`).

Resumes automatically from the latest checkpoint in --workdir. Exit status: 0 done (or preempted and saved, or
already finished), 1 non-finite loss or failed checkpoint, 2 invalid config or input (one line on stderr naming
the field, path or argument), 128 + signal number when SIGTERM/SIGINT arrived before training started or a second
Ctrl-C cut it short. What a user does after each kind of stop: docs/faults.md.
"""

import os
import re
import signal
import sys
import threading
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:switch-cpu.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Initialise jax.distributed for a multi-process run. Without the three flags below, JAX detects the "
    "cluster itself (TPU pods, SLURM, Open MPI, Kubernetes).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, e.g. 10.0.0.1:1234.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False,
    "Check the config, connect the processes (with --distributed), resolve the config for the devices found, build "
    "the mesh and print what this process would run, then exit without compiling, reading data or writing "
    "--workdir.")
flags.mark_flags_as_required(["config", "workdir"])

STARTUP_REPORT_EVERY_S = 10  # how often a waiting process says whom it waits for
# Key-value directories of JAX's coordination service: each process's heartbeat counter, and why it ended.
HEARTBEAT_KEYS, ENDED_KEYS = "moe_jax/heartbeat/", "moe_jax/ended/"
SUPERVISED = "MOE_JAX_TRAIN_SUPERVISED"  # set for the trainer process a supervisor started (`_supervise`)
JAX_ABORT = "Terminating process because the JAX distributed service detected fatal errors"  # jaxlib's LOG(FATAL)


def _fail(message: str, status: int = 2) -> None:
  print(message, file=sys.stderr, flush=True)
  _say_ended(message)
  sys.exit(status)


def _coordination():
  """JAX's state of the multi-process run: `.client` (None outside one) of the coordination service, and this
  process's `.process_id`. Private to jax, as `jax.experimental.multihost_utils` uses it: JAX has no public
  key-value store."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel

  return distributed.global_state


def _say_ended(message: str) -> None:
  """Tell the other processes why this one ends ('' when it completed), so they name the cause, not a silence."""
  state = _coordination() if "jax" in sys.modules else None  # flags may not be parsed yet: ask jax
  if state is not None and state.client is not None:
    try:
      state.client.key_value_set(f"{ENDED_KEYS}{state.process_id}", message or "-", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # the service itself is gone: nobody to tell
      pass


def _watch_peers(client, me: int, count: int, timeout_s: int) -> None:
  """Every timeout_s / 10 seconds, bump this process's heartbeat counter in the coordination service's key-value
  store and read the others'. A process whose counter has not moved for `timeout_s` seconds (by this process's
  clock: no clocks are compared across machines), or that ended with an error, or a coordination service that
  cannot be reached (process 0 gone) ends this process with one line and exit status 1.

  Why: a process killed mid-run leaves its peers blocked in a collective until JAX's own heartbeat timeout, which
  aborts them from C++ (LOG(FATAL), SIGABRT, a thread dump), with no Python hook: jaxlib 0.10's
  `missed_heartbeat_callback` cannot be given a Python function (absl::Status has no Python conversion; the
  process terminates with std::bad_cast). So this watch runs first: JAX's timeout is set to twice `timeout_s`
  plus a margin (`_initialize_distributed`). The thread keeps beating while the main thread compiles, saves or
  waits in a collective, so only a process that is gone (or frozen) falls silent. Nothing is saved on the way
  out: every checkpoint needs all processes; the run resumes from the last one."""
  every = max(timeout_s / 10, 0.5)
  last_change = {peer: (None, time.monotonic()) for peer in range(count) if peer != me}
  while True:
    try:
      client.key_value_increment(f"{HEARTBEAT_KEYS}{me}", 1)
      beats = {key.rsplit("/", 1)[-1]: value for key, value in client.key_value_dir_get(HEARTBEAT_KEYS)}
      ended = {key.rsplit("/", 1)[-1]: value for key, value in client.key_value_dir_get(ENDED_KEYS)}
    except Exception as error:  # pylint: disable=broad-except  # jax raises JaxRuntimeError for any RPC failure
      reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
      _peer_lost(f"the coordination service ({_COORDINATOR.value or 'process 0'}) cannot be reached: process 0 "
                 f"is gone or its machine failed ({reason})")
    now = time.monotonic()
    for peer, (seen, since) in last_change.items():
      why = ended.get(str(peer))
      if why is not None:
        if why != "-":
          _peer_lost(f"process {peer} stopped: {why}")
        continue
      beat = beats.get(str(peer))
      if beat != seen:
        last_change[peer] = (beat, now)
      elif now - since > timeout_s:
        _peer_lost(f"process {peer} stopped responding: no heartbeat for {now - since:.0f} s "
                   f"(train.peer_timeout_s={timeout_s}); killed, or its machine failed")
    time.sleep(every)


def _peer_lost(message: str) -> None:
  print(f"training stopped: {message}. This process stops too, without saving (a checkpoint needs every "
        "process); run the same command on every process to resume from the last checkpoint",
        file=sys.stderr, flush=True)
  os._exit(1)  # the main thread may be blocked in a collective that will never complete


def _exit_during_startup(signum, frame):
  """Until the trainer installs its own handlers: a clean line instead of a silent -15 or a traceback."""
  _fail(f"{signal.Signals(signum).name} during start-up: stopped before the first step; the workdir's "
        "checkpoints are unchanged", 128 + signum)


def _check_coordinator(address: str | None) -> None:
  if address is None:
    return
  match = re.fullmatch(r"(.+):(\d+)", address)
  if not match or not 0 < int(match.group(2)) < 65536:
    _fail(f"--coordinator_address={address!r} must be HOST:PORT with a port in [1, 65535], e.g. 10.0.0.1:1234")


def _initialize_distributed(jax, timeout_s: int, peer_timeout_s: int) -> None:
  """jax.distributed.initialize, reporting whom this process waits for, and giving up after `timeout_s` with
  one line (jax's own deadline, set later, would abort the process with a C++ stack trace); then the watch of
  the other processes (`_watch_peers`), which must notice a lost process before jax's heartbeat timeout does."""
  connected = threading.Event()
  start = time.monotonic()
  me, count = _PROCESS_ID.value, _NUM_PROCESSES.value
  who = (f"the other processes of {count} (ids {sorted(set(range(count)) - {me})})" if count and me is not None
         else "the other processes")
  every = min(STARTUP_REPORT_EVERY_S, max(timeout_s / 4, 1))

  def watch():
    while not connected.wait(every):
      waited = time.monotonic() - start
      if waited >= timeout_s:
        print(f"start-up failed: {who} did not connect to {_COORDINATOR.value or 'the coordinator'} within "
              f"train.startup_timeout_s={timeout_s} s; start every process with the same --coordinator_address",
              file=sys.stderr, flush=True)
        os._exit(1)  # the main thread is blocked inside jax's connect; nothing was written yet
      print(f"process {me}: waiting for {who} to connect to {_COORDINATOR.value or 'the coordinator'} "
            f"({waited:.0f} s of train.startup_timeout_s={timeout_s})", flush=True)

  threading.Thread(target=watch, daemon=True).start()
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=count, process_id=me,
                             initialization_timeout=timeout_s + STARTUP_REPORT_EVERY_S * 3,
                             heartbeat_timeout_seconds=2 * peer_timeout_s + 10)
  connected.set()
  state = _coordination()
  threading.Thread(target=_watch_peers, args=(state.client, state.process_id, state.num_processes, peer_timeout_s),
                   daemon=True, name="watch-peers").start()


def _supervise() -> int:
  """Run this command again as a child process (the trainer) and pass its stderr through, until JAX aborts it.

  Why: when process 0, which hosts JAX's coordination service, is gone, JAX aborts every other process at once
  from C++ (LOG(FATAL) "Terminating process because the JAX distributed service detected fatal errors", a
  check-failure trace, SIGABRT and Python's thread dump), before any Python code of the process can run, and
  jaxlib 0.10 takes no Python callback for it (`_watch_peers`). From outside, the abort is one recognisable line.
  The supervisor stops passing stderr on at that line and ends with one line of its own naming the cause, exit
  status 1; otherwise it exits with the trainer's status. The trainer runs in its own session, so Ctrl-C and
  SIGTERM reach it once, forwarded by the supervisor, and it is killed if the supervisor dies (Linux
  PR_SET_PDEATHSIG), so it never outlives it."""
  import ctypes  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel

  def die_with_the_supervisor():
    try:
      ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a killed supervisor leaves the trainer to end by itself
      pass

  trainer = subprocess.Popen([sys.executable, *sys.argv], env={**os.environ, SUPERVISED: "1"},
                             stderr=subprocess.PIPE, start_new_session=True, preexec_fn=die_with_the_supervisor)
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda signum, frame: trainer.send_signal(signum))
  cause = None
  for raw in trainer.stderr:
    line = raw.decode("utf-8", errors="replace")
    if cause is None and JAX_ABORT in line:
      cause = line.partition("absl::Status:")[2].strip() or "no status given"
    if cause is None:
      sys.stderr.write(line)
      sys.stderr.flush()
  status = trainer.wait()
  if cause is not None:
    print(f"training stopped: JAX's coordination service ended this process ({cause}): process 0, which hosts it, "
          "or another process is gone. Run the same command on every process to resume from the last checkpoint",
          file=sys.stderr, flush=True)
    return 1
  return status if status >= 0 else 128 - status


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value and os.environ.get(SUPERVISED) != "1":
    sys.exit(_supervise())
  if not flags.FLAGS["verbosity"].present:  # orbax and tfds log every step at INFO; keep the progress readable
    logging.set_verbosity(logging.WARNING)
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, _exit_during_startup)
  _check_coordinator(_COORDINATOR.value)
  import jax

  from moe_jax import config_lib, fileio, train
  from moe_jax.checkpoint import CheckpointError

  fileio.quiet_library_tracebacks()  # a full disk under orbax's save threads: its log line, not a traceback each

  config = _CONFIG.value
  try:
    config_lib.validate(config)  # every bad field fails here, before anything is built
  except ValueError as error:
    _fail(f"invalid configuration: {error}")
  if _DISTRIBUTED.value:
    _initialize_distributed(jax, config.train.startup_timeout_s, config.train.peer_timeout_s)
  elif _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value is not None:
    _fail("--coordinator_address/--num_processes/--process_id need --distributed")

  if _DRY_RUN.value:
    try:
      dry_run(jax, config)
    except ValueError as error:
      _fail(f"invalid configuration: {error}")
    _say_ended("")
    return
  try:
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.Interrupted as stop:
    _fail(str(stop), 128 + stop.signum)
  except (ValueError, FileNotFoundError) as error:  # bad config or input, refused before anything compiled
    _fail(f"invalid configuration or input: {error}")
  except (train.NonFiniteLossError, CheckpointError, fileio.EnvironmentFailure) as error:
    _fail(f"training stopped: {error}", 1)
  _say_ended("")
  evaluated = f"; eval cross-entropy {result.eval_loss:.4f}" if result.eval_loss is not None else ""
  print(f"{result.status} at step {result.step}{evaluated}; wall time {result.wall_time_s:.0f} s; "
        f"workdir {result.workdir}")


def dry_run(jax, config) -> None:
  """Print this process's view of the run: host, devices, the command every process runs, the resolved mesh
  (and which axes cross hosts), its share of the batch. The coordinator is process 0 (its log is enough for a
  single-host check; on a pod each host prints its own lines, prefixed by its process index)."""
  import socket

  from moe_jax import parallel
  from moe_jax import resolve as resolve_lib

  run = resolve_lib.resolve(config, jax.device_count())
  prefix = f"[process {jax.process_index()}/{jax.process_count()} on {socket.gethostname()}]"
  mesh = parallel.create_mesh_for(run.config.mesh)
  lines = [f"dry run: {jax.process_count()} process(es), {jax.device_count()} {jax.default_backend()} devices, "
           f"{jax.local_device_count()} on this host",
           "command (the same on every host): " + " ".join(sys.argv),
           *(decision.line() for decision in run.decisions),
           *parallel.describe_mesh(mesh),
           f"batch: {run.config.train.batch_size} sequences of {run.config.train.seq_len} tokens, "
           f"{run.config.train.batch_size // jax.process_count()} read by this process",
           f"workdir: {os.path.abspath(_WORKDIR.value)} (not touched by a dry run)"]
  for line in lines:
    print(prefix, line, flush=True)


def _fail_to_load(error: Exception, argv: list[str]) -> None:
  reason = str(error.__cause__ or error).strip().splitlines()[-1].strip()  # config_flags' last line is the cause
  given = [a.partition("=")[2] for a in argv if a.startswith("--config=")]
  _fail(f"invalid configuration: --config={given[-1] if given else None!r}: {reason}")


def parse_flags(argv):
  """absl's parser, but every bad flag or config is a one-line error rather than a traceback."""
  try:
    parsed = flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    # config_flags nests reprs ("'\\'top_kk\\'\\nDid you mean ...'"): keep the words, not the quoting.
    text = str(error)
    while text[:1] in ("'", '"') and text[-1:] == text[:1]:
      text = text[1:-1].encode().decode("unicode_escape")
    field, _, hint = text.partition("\n")
    _fail(f"invalid configuration: unknown config field {field.strip(chr(39))!r}"
          f"{'; ' + hint.strip() if hint.strip() else ''} (fields are listed in docs/config.md)")
  except flags.Error as error:  # a value of the wrong type, a missing required flag, a config file that fails
    _fail(f"invalid configuration: {str(error).strip().splitlines()[-1]}")
  except (OSError, ValueError) as error:  # a missing config file, met while applying a --config.* override
    _fail_to_load(error, argv)
  try:
    config = _CONFIG.value
    config.train  # loaded lazily: a missing file or an unknown variant surfaces at the first field read
  except (OSError, ValueError) as error:
    _fail_to_load(error, argv)
  return parsed


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
