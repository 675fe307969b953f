"""The exit codes of ``v2pe-train`` (every rank and the self-launching parent return the same one).

A job script or scheduler decides from the code alone whether to requeue:

- ``SUCCESS`` (0): the recipe's steps are done (or a ``train.exit_after_steps`` /
  ``train.wallclock_minutes`` budget ended the job after saving).
- ``ERROR`` (1): a real error (an exception); do not requeue blindly.
- ``USAGE`` (2): the recipe or the command line is wrong; nothing ran.
- ``RESUME`` (75): a signal (SIGTERM, SIGUSR1, SIGINT) stopped the run after a complete
  checkpoint; running the same command again continues it. 75 is ``EX_TEMPFAIL`` from
  ``sysexits.h`` ("temporary failure, the user is invited to retry"), the one conventional code with
  that meaning, and it is what Slurm's ``RequeueExit=75`` or a ``[ $? -eq 75 ] && scontrol requeue``
  line in an sbatch script keys on. It cannot be mistaken for Python's own 1 (uncaught exception)
  or argparse's 2, nor for 128+N (killed by signal N).
- ``NONFINITE`` (65): ``train.max_nonfinite_steps`` steps in a row had a non-finite loss or grad
  norm; the run saved what it had and stopped. 65 is ``EX_DATAERR``: rerunning unchanged would
  diverge again, so it must not be a requeue code.
"""

SUCCESS = 0
ERROR = 1
USAGE = 2
NONFINITE = 65
RESUME = 75
