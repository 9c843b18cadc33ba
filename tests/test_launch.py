"""launch/: the gcloud commands of tpu.py, its remote scripts run locally, the ssh fan-out with a
fake ssh, and the sbatch script with a fake srun."""

import importlib.util
import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
WHERE = ['ifam', '--zone=us-west4-a', '--project=my-project']


def load(name):
  spec = importlib.util.spec_from_file_location(f'launch_{name}', LAUNCH / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu = load('tpu')
ssh_fanout = load('ssh_fanout')
demo_family = load('demo_family')


def dry_run(capsys, *args):
  """The commands `tpu.py ... --dry-run` prints, each split back into its argv."""
  split = args.index('--') if '--' in args else len(args)
  tpu.main([*args[:split], '--dry-run', *args[split:]])
  return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def remote_script(argv):
  """The --command= of a `gcloud compute tpus tpu-vm ssh` invocation."""
  assert argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']
  (command,) = [a for a in argv if a.startswith('--command=')]
  return command.removeprefix('--command=')


def write_script(path, text):
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """A `gcloud` on PATH that only records its arguments, one JSON list per line."""
  record = tmp_path / 'gcloud_calls.jsonl'
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  write_script(bin_dir / 'gcloud', f'#!{sys.executable}\nimport json, sys\n'
               f'open({str(record)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\n')
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  return record


def calls(record):
  return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


# ----------------------------------------------------------------------------
# tpu.py: the gcloud commands
# ----------------------------------------------------------------------------
def test_create_tpu_vm(capsys):
  (argv,) = dry_run(capsys, 'create', *WHERE, '--accelerator-type=v5litepod-16',
                    '--version=v2-alpha-tpuv5-lite', '--spot', '--data-disk=imagenet-tfds')
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'ifam']
  assert {'--zone=us-west4-a', '--project=my-project', '--accelerator-type=v5litepod-16',
          '--version=v2-alpha-tpuv5-lite', '--spot'} <= set(argv)
  assert ('--data-disk=source=projects/my-project/zones/us-west4-a/disks/imagenet-tfds,'
          'mode=read-only') in argv
  (argv,) = dry_run(capsys, 'create', 'ifam', '--zone=us-west4-a', '--accelerator-type=v4-8',
                    '--version=tpu-ubuntu2204-base')
  assert '--spot' not in argv and not any(a.startswith('--project') for a in argv)


def test_create_queued_resource(capsys):
  (argv,) = dry_run(capsys, 'create', *WHERE, '--accelerator-type=v5p-32',
                    '--version=v2-alpha-tpuv5', '--queued', '--spot')
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'ifam']
  assert {'--node-id=ifam', '--zone=us-west4-a', '--accelerator-type=v5p-32',
          '--runtime-version=v2-alpha-tpuv5', '--spot'} <= set(argv)
  assert not any(a.startswith('--version') for a in argv)


def test_setup_copies_the_checkout_and_installs(capsys, tmp_path):
  weights = tmp_path / 'dinov2.safetensors'
  weights.write_bytes(b'w')
  commands = dry_run(capsys, 'setup', *WHERE, f'--copy={weights}', '--copy=gs://b/extra.json',
                     '--mount=/mnt/disks/tfds')
  assert all('--zone=us-west4-a' in argv and '--worker=all' in argv for argv in commands)
  prepare, code, files, install = commands
  assert 'rm -rf ifam_jax' in remote_script(prepare)
  assert code[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse']
  assert code[6:11] == [str(REPO / f) for f in tpu.REPO_FILES] + ['ifam:ifam_jax']
  assert files[6:8] == [str(weights), 'ifam:ifam_jax/files/']
  script = remote_script(install)
  for piece in ['gcloud storage cp gs://b/extra.json ifam_jax/files/',
                'sudo mount -o ro,noload /dev/sdb /mnt/disks/tfds',
                'pip install -q -e ".[gcs]"', 'pip install -q "jax[tpu]"']:
    assert piece in script
  assert script.index('.[gcs]') < script.index('jax[tpu]')  # libtpu for the jax just installed


def test_setup_from_a_git_url_copies_nothing(capsys):
  commands = dry_run(capsys, 'setup', *WHERE, '--repo=https://example.com/ifam_jax.git',
                     '--branch=main')
  assert [argv[4] for argv in commands] == ['ssh', 'ssh']
  assert ('git clone --depth=1 --branch main https://example.com/ifam_jax.git ifam_jax'
          in remote_script(commands[0]))


def test_run_starts_the_config_on_every_worker(capsys):
  config = 'configs/imagenet.py:data=tfds,tfds_dir=/mnt/disks/tfds,weights=files/w.safetensors'
  (argv,) = dry_run(capsys, 'run', *WHERE, f'--config={config}', '--workdir=gs://bucket/in1k',
                    '--', '--config.optim.lr=1e-5')
  assert '--worker=all' in argv and '--zone=us-west4-a' in argv
  script = remote_script(argv)
  assert ('IFAM_MULTIHOST=1 PYTHONUNBUFFERED=1 setsid ../ifam_venv/bin/python -m ifam_jax.main '
          f'--config={config} --workdir=gs://bucket/in1k --config.optim.lr=1e-5 '
          '>> ../ifam_run.log 2>&1') in script


@pytest.mark.slow
@pytest.mark.parametrize('workdir', ['/tmp/in1k', 'in1k', 'gs:/bucket/in1k'])
def test_run_refuses_a_workdir_outside_gcs_before_anything_runs(workdir, capsys, fake_gcloud):
  with pytest.raises(SystemExit) as exit_info:
    tpu.main(['run', *WHERE, '--config=configs/demo.py', f'--workdir={workdir}'])
  assert exit_info.value.code == 2
  out, err = capsys.readouterr()
  assert not out and 'gs://' in err and '--single-host' in err
  assert not calls(fake_gcloud)
  tpu.main(['run', *WHERE, '--config=configs/demo.py', f'--workdir={workdir}', '--single-host',
            '--dry-run'])
  assert f'--workdir={workdir}' in capsys.readouterr().out


def test_logs_stop_delete(capsys):
  (argv,) = dry_run(capsys, 'logs', *WHERE)
  assert '--worker=0' in argv and remote_script(argv) == 'tail -n 100 -F ifam_run.log'
  (argv,) = dry_run(capsys, 'logs', *WHERE, '--worker=3')
  assert '--worker=3' in argv
  (argv,) = dry_run(capsys, 'stop', *WHERE)
  assert '--worker=all' in argv and 'kill -TERM -- -$pid' in remote_script(argv)
  (argv,) = dry_run(capsys, 'delete', *WHERE)
  assert argv == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'ifam', '--zone=us-west4-a',
                  '--project=my-project']
  (argv,) = dry_run(capsys, 'delete', *WHERE, '--queued')
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'ifam']
  assert '--force' in argv


@pytest.mark.slow
def test_without_dry_run_exactly_the_printed_commands_run(capsys, fake_gcloud):
  args = ['setup', *WHERE, '--copy=gs://b/w.safetensors', '--mount=/mnt/disks/tfds']
  printed = dry_run(capsys, *args)
  assert not calls(fake_gcloud)
  tpu.main(args)
  assert [['gcloud', *argv] for argv in calls(fake_gcloud)] == printed


@pytest.mark.slow
def test_every_remote_script_is_valid_bash(capsys):
  commands = [
      *dry_run(capsys, 'setup', *WHERE, '--copy=gs://b/w', '--mount=/mnt/d'),
      *dry_run(capsys, 'setup', *WHERE, '--repo=https://example.com/r.git'),
      *dry_run(capsys, 'run', *WHERE, '--config=configs/demo.py', '--workdir=gs://b/w'),
      *dry_run(capsys, 'logs', *WHERE), *dry_run(capsys, 'stop', *WHERE)]
  for argv in commands:
    if argv[4] == 'ssh':
      check = subprocess.run(['bash', '-n', '-c', remote_script(argv)], capture_output=True,
                             text=True)
      assert check.returncode == 0, (remote_script(argv), check.stderr)


# ----------------------------------------------------------------------------
# tpu.py: run and stop, executed here in a fake worker home directory
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_run_and_stop_scripts_on_a_fake_worker(capsys, tmp_path):
  home = tmp_path / 'home'
  (home / 'ifam_jax').mkdir(parents=True)
  (home / 'ifam_venv' / 'bin').mkdir(parents=True)
  write_script(home / 'ifam_venv' / 'bin' / 'python',
               '#!/bin/sh\necho "IFAM_MULTIHOST=$IFAM_MULTIHOST cwd=$(basename "$PWD") $*"\n'
               'exec sleep 60\n')
  (run,) = dry_run(capsys, 'run', *WHERE, '--config=configs/demo.py', '--workdir=gs://b/w',
                   '--', '--mode=eval')
  (stop,) = dry_run(capsys, 'stop', *WHERE)

  def on_worker(argv):
    return subprocess.run(['bash', '-c', remote_script(argv)], cwd=home, capture_output=True,
                          text=True, timeout=60)

  assert on_worker(run).returncode == 0
  pid = int((home / 'ifam_run.pid').read_text())
  try:
    os.killpg(pid, 0)  # running, as its own process group
    log = home / 'ifam_run.log'
    deadline = time.monotonic() + 10
    while 'IFAM_MULTIHOST=' not in log.read_text() and time.monotonic() < deadline:
      time.sleep(0.05)
    assert ('IFAM_MULTIHOST=1 cwd=ifam_jax -m ifam_jax.main --config=configs/demo.py '
            '--workdir=gs://b/w --mode=eval') in log.read_text()

    second = on_worker(run)  # the chips are taken: refused, the first run untouched
    assert second.returncode == 1 and 'stop it first' in second.stderr
    assert int((home / 'ifam_run.pid').read_text()) == pid
  except BaseException:
    os.killpg(pid, 9)
    raise

  stopped = on_worker(stop)
  assert stopped.returncode == 0 and 'stopped' in stopped.stdout
  assert not (home / 'ifam_run.pid').exists()
  with pytest.raises(ProcessLookupError):
    os.killpg(pid, 0)
  assert 'nothing to stop' in on_worker(stop).stdout


# ----------------------------------------------------------------------------
# ssh_fanout.py with a fake ssh that runs the command here
# ----------------------------------------------------------------------------
@pytest.fixture
def fake_ssh(tmp_path):
  """`fake_ssh HOST COMMAND`: ignores the host and runs COMMAND in a local shell."""
  return write_script(tmp_path / 'fake_ssh', '#!/bin/sh\nshift\nexec /bin/sh -c "$*"\n')


def fanout(fake_ssh, hosts, *command, extra=()):
  return subprocess.run(
      [sys.executable, str(LAUNCH / 'ssh_fanout.py'), f'--hosts={hosts}', '--port=9999',
       f'--ssh={fake_ssh}', *extra, '--', *command],
      capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_fanout_gives_each_host_its_process_id(fake_ssh):
  show = ('import json, os; print(json.dumps({k: os.environ.get(k) for k in ("IFAM_MULTIHOST", '
          '"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "EXTRA")}))')
  result = fanout(fake_ssh, 'user@hostA,hostB', sys.executable, '-c', show,
                  extra=['--env=EXTRA=x y'])
  assert result.returncode == 0, result.stderr
  seen = {}
  for line in result.stdout.splitlines():
    label, _, payload = line.partition('] ')
    seen[label.lstrip('[')] = json.loads(payload)
  common = dict(IFAM_MULTIHOST='1', JAX_COORDINATOR_ADDRESS='hostA:9999', JAX_NUM_PROCESSES='2',
                EXTRA='x y')
  assert seen == {'0 user@hostA': dict(common, JAX_PROCESS_ID='0'),
                  '1 hostB': dict(common, JAX_PROCESS_ID='1')}


@pytest.mark.slow
def test_fanout_stops_everyone_when_one_host_fails(fake_ssh):
  code = ('import os, sys, time\n'
          'sys.exit(3) if os.environ["JAX_PROCESS_ID"] == "1" else time.sleep(60)')
  start = time.monotonic()
  result = fanout(fake_ssh, 'a,b', sys.executable, '-c', code)
  assert result.returncode == 3 and '1 b exited with status 3' in result.stderr
  assert time.monotonic() - start < 30


@pytest.mark.slow
def test_fanout_initializes_jax_distributed_through_main(fake_ssh):
  """Two processes on this machine reach jax.distributed through ifam_jax.main's contract."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  code = ('import jax; from ifam_jax import main; main.initialize_multihost(); '
          'print("process", jax.process_index(), "of", jax.process_count())')
  result = subprocess.run(
      [sys.executable, str(LAUNCH / 'ssh_fanout.py'), '--hosts=127.0.0.1,localhost',
       f'--port={port}', f'--ssh={fake_ssh}', '--env=JAX_PLATFORMS=cpu', '--',
       sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert '[0 127.0.0.1] process 0 of 2' in result.stdout
  assert '[1 localhost] process 1 of 2' in result.stdout


@pytest.mark.slow
def test_fanout_dry_run_runs_nothing(tmp_path):
  marker = tmp_path / 'ran'
  result = subprocess.run(
      [sys.executable, str(LAUNCH / 'ssh_fanout.py'), '--hosts=g1,g2,g3', '--cwd=ifam jax',
       f'--ssh=touch {marker}', '--dry-run', '--', 'python', '-m', 'ifam_jax.main'],
      capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and not marker.exists()
  lines = [shlex.split(line) for line in result.stdout.splitlines()]
  assert [argv[2] for argv in lines] == ['g1', 'g2', 'g3']
  assert lines[2][3] == ("cd 'ifam jax' && exec env IFAM_MULTIHOST=1 "
                         'JAX_COORDINATOR_ADDRESS=g1:8476 JAX_NUM_PROCESSES=3 JAX_PROCESS_ID=2 '
                         'PYTHONUNBUFFERED=1 python -m ifam_jax.main')


# ----------------------------------------------------------------------------
# slurm.sbatch
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_sbatch_script(tmp_path):
  script = LAUNCH / 'slurm.sbatch'
  assert subprocess.run(['bash', '-n', str(script)]).returncode == 0
  text = script.read_text()
  assert '#SBATCH --ntasks-per-node=1' in text and 'export IFAM_MULTIHOST=1' in text
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  write_script(bin_dir / 'srun', '#!/bin/sh\necho "IFAM_MULTIHOST=$IFAM_MULTIHOST '
               'JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"\necho "$@"\n')
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
             SLURM_GPUS_ON_NODE='4', SLURM_CPUS_PER_TASK='16')
  result = subprocess.run(['bash', str(script), 'configs/demo.py:a=1', '/shared/w',
                           '--config.optim.lr=1e-5'], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      'IFAM_MULTIHOST=1 JAX_LOCAL_DEVICE_IDS=0,1,2,3',
      '--ntasks-per-node=1 --cpus-per-task=16 --kill-on-bad-exit=1 --label python -m '
      'ifam_jax.main --config=configs/demo.py:a=1 --workdir=/shared/w --config.optim.lr=1e-5']
  assert subprocess.run(['bash', str(script)], env=env, capture_output=True).returncode == 2


# ----------------------------------------------------------------------------
# demo_family.py: the benchmark family's processes and table
# ----------------------------------------------------------------------------
def test_family_dry_run_is_one_compare_process_per_run_peers_last(capsys, tmp_path):
  assert demo_family.main(['--workdir', str(tmp_path), '--variants', 'texture,colour',
                           '--methods', 'dfr,erm,ifam', '--seeds', '0,2', '--dry-run']) == 0
  commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
  assert len(commands) == 12
  assert commands[1][1:] == ['-m', 'ifam_jax.main', '--config=configs/demo.py:variant=texture',
                             '--mode=compare', '--methods=ifam',
                             '--config.compare.seeds=(0,)', f'--workdir={tmp_path}/texture']
  # DFR fits on the ERM run's features: it starts after every trained run.
  assert [c[5] for c in commands[8:]] == ['--methods=dfr'] * 4


def _compare_json(workdir, variant, worst):
  rows = {name: {'label': name.upper(), 'seeds': [0, 1],
                 'mean': {'accuracy': 0.9, 'worst_group_accuracy': w,
                          'mask_leak_auroc': 0.75},
                 'std': {'accuracy': 0.01, 'worst_group_accuracy': 0.02,
                         'mask_leak_auroc': 0.05}}
          for name, w in worst.items()}
  (workdir / variant).mkdir(parents=True, exist_ok=True)
  (workdir / variant / 'compare.json').write_text(json.dumps({'methods': rows}))


def test_family_runs_every_job_names_failures_and_tables_the_rest(tmp_path, monkeypatch, capsys):
  ran = []

  def fake_run(command, log):
    variant, methods, seeds = command[3].rsplit('=', 1)[1], command[5][10:], command[6][23:]
    ran.append((variant, methods, seeds))
    if (variant, methods, seeds) == ('colour', 'ifam', '(1,)'):
      return 3
    _compare_json(tmp_path, variant, {'erm': 0.5, 'ifam': 0.875})
    return 0

  monkeypatch.setattr(demo_family, 'run_logged', fake_run)
  status = demo_family.main(['--workdir', str(tmp_path), '--variants', 'texture,colour',
                             '--methods', 'erm,ifam', '--seeds', '0,1', '--parallel', '3'])
  out = capsys.readouterr().out
  assert status == 1 and 'colour, ifam, seed 1: FAILED (exit 3)' in out
  # One process per run, then the table pass of the variant that finished, over all seeds.
  assert sorted(ran[:8]) == sorted((v, m, f'({s},)') for v in ('texture', 'colour')
                                   for m in ('erm', 'ifam') for s in (0, 1))
  assert ran[8:] == [('texture', 'erm,ifam', '(0,1,)')]
  assert '| texture | IFAM | 2 | 90.0 ± 1.0 | 87.5 ± 2.0 | 0.75 ± 0.05 | - |' in out
  assert '| colour |' not in out
