"""The exit codes of ``v2pe-train`` (every rank and the self-launching parent return the same one).

A job script or scheduler decides from the code alone whether to requeue:

- ``SUCCESS`` (0): the recipe's steps are done (or a ``train.exit_after_steps`` /
  ``train.wallclock_minutes`` budget ended the job after saving).
- ``ERROR`` (1): a real error (an exception); do not requeue blindly.
- ``USAGE`` (2): the recipe or the command line is wrong; nothing ran.
- ``RESUME`` (75): a signal (SIGTERM, SIGUSR1, SIGINT) stopped the run after it saved a complete
  checkpoint of steps it trained; running the same command again continues from there. 75 is
  ``EX_TEMPFAIL`` from ``sysexits.h`` ("temporary failure, the user is invited to retry"), the one
  conventional code with that meaning, and it is what Slurm's ``RequeueExit=75`` or a
  ``[ $? -eq 75 ] && scontrol requeue`` line in an sbatch script keys on. It cannot be mistaken for
  Python's own 1 (uncaught exception) or argparse's 2, nor for 128+N (killed by signal N).
  Because a requeue on 75 always resumes later than the attempt that asked for it, requeueing on 75
  cannot loop without progress.
- ``stopped(N)`` = 128 + N (130 SIGINT, 138 SIGUSR1, 143 SIGTERM): signal N stopped the run and
  nothing new was saved: either ``checkpoint.dir`` is not set (the steps it trained are lost), or the
  signal came before the first step (while starting: importing, building, loading). Running again
  starts where this attempt started. It is the code a shell reports for a process that signal N
  terminated, and it must not be a requeue code: a Slurm job whose time limit is shorter than its
  ``--signal`` lead is signalled at every start, and requeueing it would repeat that forever.
- ``NONFINITE`` (65): ``train.max_nonfinite_steps`` steps in a row had a non-finite loss or grad
  norm; the run saved what it had and stopped. 65 is ``EX_DATAERR``: rerunning unchanged would
  diverge again, so it must not be a requeue code.
"""

import signal as _signal

SUCCESS = 0
ERROR = 1
USAGE = 2
NONFINITE = 65
RESUME = 75

# The signals that ask a run to stop (``runtime.signals.STOP_SIGNALS``).
STOP_SIGNALS = (_signal.SIGTERM, _signal.SIGUSR1, _signal.SIGINT)


def stopped(signum: int) -> int:
    """The exit code of a run that stop signal ``signum`` ended with nothing new saved."""
    return 128 + int(signum)


def stopped_by(code: int) -> int | None:
    """The stop signal whose :func:`stopped` code ``code`` is, else None."""
    return code - 128 if code - 128 in STOP_SIGNALS else None
