"""One command on several hosts over ssh, as the processes of one multi-host JAX job.

  python launch/ssh_fanout.py --hosts=gpu1,gpu2 --cwd=ifam_jax -- \
      .venv/bin/python -m ifam_jax.main --config=configs/imagenet.py:... --workdir=/shared/in1k

Host i runs the command with IFAM_MULTIHOST=1, JAX_COORDINATOR_ADDRESS=<first host>:<port>,
JAX_NUM_PROCESSES=<number of hosts> and JAX_PROCESS_ID=i, which is what ifam_jax.main hands to
jax.distributed.initialize(). Output comes back line by line, prefixed with the host. When one
host fails the others are stopped: the job cannot go on without it. Standard library only.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

# -tt: a terminal on the remote side, so the remote processes end when the connection does.
DEFAULT_SSH = 'ssh -tt'


def commands(hosts: Sequence[str], command: Sequence[str], port: int, ssh: str = DEFAULT_SSH,
             cwd: str | None = None, coordinator: str | None = None,
             env: Sequence[str] = ()) -> list[list[str]]:
  """The ssh invocation for each host. `cwd` is relative to the remote home directory."""
  if not hosts:
    raise ValueError('no hosts')
  if not command:
    raise ValueError('no command: give it after --')
  if any('=' not in e for e in env):
    raise ValueError(f'--env takes KEY=VALUE, got {[e for e in env if "=" not in e]}')
  address = f'{coordinator or hosts[0].rpartition("@")[2]}:{port}'
  result = []
  for i, host in enumerate(hosts):
    variables = ['IFAM_MULTIHOST=1', f'JAX_COORDINATOR_ADDRESS={address}',
                 f'JAX_NUM_PROCESSES={len(hosts)}', f'JAX_PROCESS_ID={i}',
                 'PYTHONUNBUFFERED=1', *env]
    remote = shlex.join(['exec', 'env', *variables, *command])
    if cwd:
      remote = f'cd {shlex.quote(cwd)} && {remote}'
    result.append([*shlex.split(ssh), host, remote])
  return result


def _relay(stream, prefix: str, lock: threading.Lock) -> None:
  for line in stream:
    text = line.decode(errors='replace').rstrip('\r\n')
    with lock:
      print(f'{prefix}{text}', flush=True)


def run(argvs: Sequence[Sequence[str]], labels: Sequence[str]) -> int:
  """Runs all at once; returns the first failure's exit status (0 when all succeed)."""
  procs = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for argv in argvs]
  lock = threading.Lock()
  relays = [threading.Thread(target=_relay, args=(p.stdout, f'[{label}] ', lock))
            for p, label in zip(procs, labels)]
  for relay in relays:
    relay.start()
  status, pending = 0, set(range(len(procs)))
  try:
    while pending:
      for i in sorted(pending):
        code = procs[i].poll()
        if code is None:
          continue
        pending.discard(i)
        if code and not status:
          status = code
          print(f'ssh_fanout: {labels[i]} exited with status {code}; stopping the others',
                file=sys.stderr, flush=True)
          for p in procs:
            if p.poll() is None:
              p.terminate()
      time.sleep(0.05)
  except KeyboardInterrupt:
    for p in procs:
      p.terminate()
    status = 130
  for p in procs:
    p.wait()
  for relay in relays:
    relay.join()
  return status


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--hosts', default='', help='comma-separated ssh destinations, [user@]host')
  p.add_argument('--hostfile', help='one ssh destination per line (# comments)')
  p.add_argument('--port', type=int, default=8476, help="the coordinator's port on the first host")
  p.add_argument('--coordinator', help='address of the first host as the others reach it '
                 '(default: its ssh name)')
  p.add_argument('--cwd', help='remote working directory, relative to the home directory')
  p.add_argument('--env', action='append', default=[], help='KEY=VALUE for every host')
  p.add_argument('--ssh', default=DEFAULT_SSH, help='the ssh program and its options')
  p.add_argument('--dry-run', action='store_true',
                 help='print the commands, one per line, and run nothing')
  p.add_argument('command', nargs=argparse.REMAINDER, help='after --: the command to run')
  args = p.parse_args(argv)
  hosts = [h.strip() for h in args.hosts.split(',') if h.strip()]
  if args.hostfile:
    with open(args.hostfile) as f:
      hosts += [line.split('#')[0].strip() for line in f if line.split('#')[0].strip()]
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  try:
    argvs = commands(hosts, command, args.port, args.ssh, args.cwd, args.coordinator, args.env)
  except ValueError as e:
    p.error(str(e))
  if args.dry_run:
    for argv in argvs:
      print(shlex.join(argv))
    return
  sys.exit(run(argvs, [f'{i} {host}' for i, host in enumerate(hosts)]))


if __name__ == '__main__':
  main()
