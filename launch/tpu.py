"""Cloud TPU VMs for ifam_jax, driven through gcloud from your own machine.

  python launch/tpu.py create ifam --zone=us-west4-a --accelerator-type=v5litepod-16 \
      --version=v2-alpha-tpuv5-lite --spot
  python launch/tpu.py setup ifam --zone=us-west4-a --copy=gs://BUCKET/w.safetensors
  python launch/tpu.py run ifam --zone=us-west4-a --workdir=gs://BUCKET/in1k \
      --config=configs/imagenet.py:data=tfds,tfds_dir=/mnt/disks/tfds,weights=files/w.safetensors
  python launch/tpu.py logs ifam --zone=us-west4-a
  python launch/tpu.py stop ifam --zone=us-west4-a
  python launch/tpu.py delete ifam --zone=us-west4-a

Every subcommand is a list of gcloud invocations built by a pure function below, so `--dry-run`
prints exactly what would run, one command per line. Standard library only: this runs where
gcloud is, not on the TPU. On the workers everything lives in the home directory: the code in
~/ifam_jax (files from --copy in ~/ifam_jax/files), the environment in ~/ifam_venv, the run's
output in ~/ifam_run.log and its process group id in ~/ifam_run.pid.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import subprocess
import sys
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
# What `pip install -e` and the recipes need; tests, caches and local environments stay home.
REPO_FILES = ('pyproject.toml', 'README.md', 'ifam_jax', 'configs')
CODE = 'ifam_jax'
FILES = 'ifam_jax/files'
VENV = 'ifam_venv'
LOG = 'ifam_run.log'
PID = 'ifam_run.pid'
# Checkpoints go to gs://; IAM on the bucket then decides what the workers may do.
SCOPES = 'https://www.googleapis.com/auth/cloud-platform'
# A second run would fight the first for the TPU chips, and setup would replace its code.
GUARD = (f'if [ -f {PID} ] && kill -0 -- -"$(cat {PID})" 2>/dev/null; then '
         'echo "ifam: a run is active on $(hostname); stop it first" >&2; exit 1; fi')


# ----------------------------------------------------------------------------
# gcloud building blocks
# ----------------------------------------------------------------------------
def location(zone: str, project: str | None) -> list[str]:
  return [f'--zone={zone}'] + ([f'--project={project}'] if project else [])


def ssh(name: str, zone: str, project: str | None, command: str,
        worker: str = 'all') -> list[str]:
  """`command` in the login shell (home directory) of the given workers, all in parallel."""
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', name, *location(zone, project),
          f'--worker={worker}', f'--command={command}']


def scp(name: str, zone: str, project: str | None, sources: Sequence[str],
        dest: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse', *sources, f'{name}:{dest}',
          *location(zone, project), '--worker=all']


def disk_source(disk: str, zone: str, project: str | None) -> str:
  """A disk name becomes the full path gcloud wants; a path is taken as it is."""
  if '/' in disk:
    return disk
  if not project:
    raise ValueError(f'--data-disk {disk!r}: give --project, or the full path '
                     'projects/PROJECT/zones/ZONE/disks/DISK')
  return f'projects/{project}/zones/{zone}/disks/{disk}'


# ----------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------
def create_commands(name: str, zone: str, project: str | None, accelerator_type: str,
                    version: str, spot: bool = False, queued: bool = False,
                    data_disk: str | None = None) -> list[list[str]]:
  """A TPU VM now, or with `queued` a queued resource whose node (same name) starts later."""
  flags = [f'--accelerator-type={accelerator_type}', f'--scopes={SCOPES}']
  if spot:
    flags.append('--spot')
  if data_disk:
    flags.append(f'--data-disk=source={disk_source(data_disk, zone, project)},mode=read-only')
  if queued:
    return [['gcloud', 'compute', 'tpus', 'queued-resources', 'create', name, f'--node-id={name}',
             *location(zone, project), f'--runtime-version={version}', *flags]]
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', name, *location(zone, project),
           f'--version={version}', *flags]]


def setup_commands(name: str, zone: str, project: str | None, repo_url: str | None = None,
                   branch: str | None = None, copies: Sequence[str] = (),
                   mount: str | None = None, disk_device: str = '/dev/sdb',
                   python: str = 'python3.11', repo: pathlib.Path = REPO) -> list[list[str]]:
  """Fresh code, files, data disk and environment on every worker; safe to run again.

  The code is this checkout's REPO_FILES (or a clone of `repo_url`). `copies` (local paths or
  gs:// objects, e.g. the DINOv2 weights) land in ~/ifam_jax/files. TPU runtime images may ship
  a Python older than the project's, so `python` is installed from apt when missing.
  """
  prepare = ['set -e', GUARD, f'rm -rf {CODE}']
  if repo_url:
    clone = ['git', 'clone', '--depth=1', *(['--branch', branch] if branch else []), repo_url]
    prepare.append(shlex.join([*clone, CODE]))
  prepare.append(f'mkdir -p {FILES}')
  commands = [ssh(name, zone, project, '; '.join(prepare))]
  if not repo_url:
    commands.append(scp(name, zone, project, [str(repo / f) for f in REPO_FILES], CODE))
  local = [c for c in copies if not c.startswith('gs://')]
  if local:
    commands.append(scp(name, zone, project, local, f'{FILES}/'))

  install = ['set -e']
  remote = [c for c in copies if c.startswith('gs://')]
  if remote:
    install.append(shlex.join(['gcloud', 'storage', 'cp', *remote, f'{FILES}/']))
  if mount:
    target = shlex.quote(mount)
    install += [f'sudo mkdir -p {target}', f'mountpoint -q {target} || sudo mount -o ro,noload '
                f'{shlex.quote(disk_device)} {target}']
  py = shlex.quote(python)
  install += [
      f'command -v {py} >/dev/null || {{ sudo apt-get update -q; '
      f'sudo apt-get install -y -q {py} {shlex.quote(python + "-venv")}; }}',
      f'{py} -m venv {VENV}',
      f'{VENV}/bin/pip install -q -U pip',
      f'cd {CODE}',
      f'../{VENV}/bin/pip install -q -e ".[gcs]"',
      f'../{VENV}/bin/pip install -q "jax[tpu]"',
      'echo "ifam: ready on $(hostname)"',
  ]
  commands.append(ssh(name, zone, project, '; '.join(install)))
  return commands


def run_commands(name: str, zone: str, project: str | None, config: str, workdir: str,
                 main_args: Sequence[str] = (), single_host: bool = False) -> list[list[str]]:
  """`ifam_jax.main` on every worker, in the background, in its own process group.

  All workers of a slice save one checkpoint together, so the workdir must be storage they all
  see: gs://. Running the same command again resumes from that workdir.
  """
  if not workdir.startswith('gs://') and not single_host:
    raise ValueError(f'--workdir {workdir!r} is not a gs:// path: the workers of a multi-host '
                     'slice write one checkpoint together and must share the workdir '
                     '(--single-host allows a local path on a one-host TPU)')
  program = shlex.join([f'../{VENV}/bin/python', '-m', 'ifam_jax.main', f'--config={config}',
                        f'--workdir={workdir}', *main_args])
  script = (f'set -e; {GUARD}; cd {CODE}; '
            f'echo "=== $(date):" {program} >> ../{LOG}; '
            f'IFAM_MULTIHOST=1 PYTHONUNBUFFERED=1 setsid {program} '
            f'>> ../{LOG} 2>&1 < /dev/null & pid=$!; echo $pid > ../{PID}; '
            # Return once setsid has made the group, so that stop and the guard find it.
            'for i in $(seq 50); do kill -0 -- -$pid 2>/dev/null && break; sleep 0.1; done; '
            f'echo "ifam: started on $(hostname), output in ~/{LOG}"')
  return [ssh(name, zone, project, script)]


def logs_commands(name: str, zone: str, project: str | None, worker: str = '0',
                  lines: int = 100) -> list[list[str]]:
  return [ssh(name, zone, project, f'tail -n {lines} -F {LOG}', worker)]


def stop_commands(name: str, zone: str, project: str | None) -> list[list[str]]:
  """SIGTERM to the run's process group (data workers included), SIGKILL after 30 s."""
  script = (f'if [ -f {PID} ]; then pid=$(cat {PID}); kill -TERM -- -$pid 2>/dev/null || true; '
            'for i in $(seq 60); do kill -0 -- -$pid 2>/dev/null || break; sleep 0.5; done; '
            f'kill -KILL -- -$pid 2>/dev/null || true; rm -f {PID}; '
            'echo "ifam: stopped on $(hostname)"; '
            'else echo "ifam: nothing to stop on $(hostname)"; fi')
  return [ssh(name, zone, project, script)]


def delete_commands(name: str, zone: str, project: str | None,
                    queued: bool = False) -> list[list[str]]:
  if queued:  # --force deletes the node too
    return [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', name,
             *location(zone, project), '--force']]
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', name, *location(zone, project)]]


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('name', help='TPU VM name (also the queued resource id with --queued).')
  common.add_argument('--zone', required=True)
  common.add_argument('--project', help="default: gcloud's configured project")
  common.add_argument('--dry-run', action='store_true',
                      help='print the commands, one per line, and run nothing')
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='command', required=True)

  s = sub.add_parser('create', parents=[common], help='create a TPU VM or a queued resource')
  s.add_argument('--accelerator-type', required=True, help='e.g. v5litepod-16, v4-32, v5p-32')
  s.add_argument('--version', required=True,
                 help='TPU runtime version, e.g. v2-alpha-tpuv5-lite, tpu-ubuntu2204-base')
  s.add_argument('--spot', action='store_true', help='cheaper, can be preempted')
  s.add_argument('--queued', action='store_true', help='a queued resource, served when free')
  s.add_argument('--data-disk', help='a disk (name or full path) attached read-only')

  s = sub.add_parser('setup', parents=[common], help='copy the code and install it everywhere')
  s.add_argument('--repo', help='clone this git URL instead of copying this checkout')
  s.add_argument('--branch', help='with --repo: the branch or tag')
  s.add_argument('--copy', action='append', default=[],
                 help='a local file or gs:// object for ~/ifam_jax/files (repeatable)')
  s.add_argument('--mount', help='mount the read-only data disk at this directory')
  s.add_argument('--disk-device', default='/dev/sdb', help='the data disk as the workers see it')
  s.add_argument('--python', default='python3.11', help='interpreter for ~/ifam_venv')

  s = sub.add_parser('run', parents=[common], help='start a config on all workers',
                     epilog='More ifam_jax.main flags go after --, e.g. -- --mode=eval')
  s.add_argument('--config', required=True, help='configs/<recipe>.py[:args]')
  s.add_argument('--workdir', required=True, help='gs://bucket/path')
  s.add_argument('--single-host', action='store_true', help='allow a local workdir')

  s = sub.add_parser('logs', parents=[common], help="follow a worker's output")
  s.add_argument('--worker', default='0')
  s.add_argument('--lines', type=int, default=100)

  sub.add_parser('stop', parents=[common], help='stop the run on all workers')
  s = sub.add_parser('delete', parents=[common], help='delete the TPU VM or queued resource')
  s.add_argument('--queued', action='store_true')
  return p


def commands_for(args: argparse.Namespace, main_args: Sequence[str]) -> list[list[str]]:
  where = (args.name, args.zone, args.project)
  if args.command == 'create':
    return create_commands(*where, args.accelerator_type, args.version, args.spot, args.queued,
                           args.data_disk)
  if args.command == 'setup':
    missing = [c for c in args.copy if not c.startswith('gs://') and not os.path.isfile(c)]
    if missing:
      raise ValueError(f'--copy: no such file: {", ".join(missing)}')
    return setup_commands(*where, args.repo, args.branch, args.copy, args.mount,
                          args.disk_device, args.python)
  if args.command == 'run':
    return run_commands(*where, args.config, args.workdir, main_args, args.single_host)
  if args.command == 'logs':
    return logs_commands(*where, args.worker, args.lines)
  if args.command == 'stop':
    return stop_commands(*where)
  return delete_commands(*where, args.queued)


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Flags for ifam_jax.main follow `--`; argparse would take them for its own.
  split = argv.index('--') if '--' in argv else len(argv)
  argv, main_args = argv[:split], argv[split + 1:]
  p = parser()
  args = p.parse_args(argv)
  if main_args and args.command != 'run':
    p.error(f'only run takes flags after --, got {shlex.join(main_args)}')
  if '--dry-run' in main_args:
    p.error('--dry-run after -- would go to ifam_jax.main; put it before --')
  try:
    commands = commands_for(args, main_args)  # every check happens here, before anything runs
  except ValueError as e:
    p.error(str(e))
  for command in commands:
    if args.dry_run:
      print(shlex.join(command), flush=True)
      continue
    try:
      subprocess.run(command, check=True)
    except subprocess.CalledProcessError as e:
      print(f'tpu.py: exit status {e.returncode}: {shlex.join(command)}', file=sys.stderr)
      sys.exit(e.returncode)
    except KeyboardInterrupt:
      sys.exit(130)


if __name__ == '__main__':
  main()
