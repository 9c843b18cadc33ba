"""Train loop: exact resume after SIGKILL, 1 vs 8 devices, divergence, checkpoints and saved
parameters, logs, frozen parameters, eval alignment across processes.

Training runs the real entry point (`python -m ifam_jax.main`) in subprocesses, with
tests/fixtures/tiny_config.py as its config: configs/demo.py shrunk to a one-block 32 px iFAM
with the reference's parameter groups. To fit a 2-core CI budget the subprocesses share a persistent
compilation cache (runs of one config and device count compile once) and compile with LLVM at
-O0 (3x faster to compile); runs that are compared always share these flags.
"""

import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from flax import nnx

from ifam_jax import config_lib, factory, losses, optim, packed_stage2, sharding, train
from ifam_jax import workdir as workdir_lib
from ifam_jax import data as data_lib
from ifam_jax.evaluators import loop as loop_lib

from fixtures.tiny_config import STEPS, get_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / 'tests' / 'fixtures' / 'tiny_config.py'
FAST_COMPILE = '--xla_backend_optimization_level=0'
TIMING = ('img_per_sec', 'step_time')  # the only train metrics allowed to differ between runs


# ----------------------------------------------------------------------------
# Running the entry point
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Subprocess environment: CPU, one device, a compilation cache shared by all runs."""
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', XLA_FLAGS=FAST_COMPILE,
              JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def command(workdir, arg='', *overrides):
  config = f'{CONFIG}:{arg}' if arg else str(CONFIG)
  return [sys.executable, '-m', 'ifam_jax.main', f'--config={config}', f'--workdir={workdir}',
          *overrides]


def run_main(env, workdir, arg='', *overrides, devices=1, check=True):
  if devices > 1:
    env = dict(env, XLA_FLAGS=f'{FAST_COMPILE} --xla_force_host_platform_device_count={devices}')
  result = subprocess.run(command(workdir, arg, *overrides), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  if check and result.returncode:
    raise AssertionError(f'training failed:\n{result.stderr[-5000:]}')
  return result


def read_metrics(workdir, split=None):
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [m for m in lines if split is None or m['split'] == split]


def without_timing(metrics):
  return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def restore(path):
  """A saved tree as numpy arrays, whatever mesh or processes saved it."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path.absolute()).item_metadata.tree)
    return jax.device_get(checkpointer.restore(path.absolute(), target))


def name(path):
  """A leaf's '/'-joined path, without the '/value' that a saved nnx Variable adds."""
  return sharding.path_name(path).removesuffix('/value')


def state_metadata(workdir, step):
  """{path: array metadata (shape, dtype, sharding)} of the state checkpointed at `step`."""
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata((workdir / 'checkpoints' / str(step) / 'state').absolute())
  return {name(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree.item_metadata)[0]}


def flat(tree):
  return {name(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='module')
def reference(env, tmp_path_factory):
  """One uninterrupted run on one device: (workdir, stdout)."""
  workdir = tmp_path_factory.mktemp('reference')
  return workdir, run_main(env, workdir).stdout


# ----------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(env, reference, tmp_path):
  """Killed mid-run and rerun, the run ends with the same bits, batches and logs."""
  ref_dir, _ = reference
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(command(workdir), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  try:
    deadline = time.monotonic() + 240
    while not ((workdir / 'checkpoints').exists() and checkpoint_steps(workdir)
               and checkpoint_steps(workdir)[-1] >= STEPS // 2):
      assert proc.poll() is None and time.monotonic() < deadline, 'run ended before the kill'
      time.sleep(0.01)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its grain workers, as a preemption does
    proc.wait()
  killed_at = checkpoint_steps(workdir)[-1]
  assert killed_at < STEPS and not (workdir / 'params' / 'final.json').exists()

  # What a kill can leave: step directories still being written (one of a step the resumed run
  # saves again, one of a step it never saves), a line cut short.
  for step in (killed_at + 1, killed_at + 2):
    half_written = workdir / 'checkpoints' / f'{step}.orbax-checkpoint-tmp' / 'state'
    half_written.mkdir(parents=True, exist_ok=True)
    (half_written / '_METADATA').write_text('{"tree_metadata": {')
  with (workdir / 'metrics.jsonl').open('a') as f:
    f.write('{"step": 99, "split": "tr')

  resumed = run_main(env, workdir)
  assert f'step {killed_at + 1}/{STEPS}' in resumed.stdout
  assert f'step {killed_at}/{STEPS}' not in resumed.stdout
  assert not list((workdir / 'checkpoints').glob('*tmp*'))

  ref_final = flat(restore(ref_dir / 'params' / 'final'))
  final = flat(restore(workdir / 'params' / 'final'))
  assert ref_final.keys() == final.keys()
  for path, value in ref_final.items():
    assert value.dtype == final[path].dtype and np.array_equal(value, final[path]), path
  # Same batches in the same order (every loss term and accuracy of every step), same evals.
  assert without_timing(read_metrics(workdir)) == without_timing(read_metrics(ref_dir))
  assert [m['step'] for m in read_metrics(workdir, 'train')] == list(range(1, STEPS + 1))
  best, ref_best = (json.loads((w / 'params' / 'best.json').read_text())
                    for w in (workdir, ref_dir))
  assert best == ref_best


@pytest.mark.slow
def test_data_checkpoint_restores_a_worker_iterator(tmp_path):
  """The loop's data item (grain's Orbax handler) resumes an mp_prefetch iterator exactly."""
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  source = data_lib.SyntheticSpuriousSource(64, 32)

  def batches(num_workers):  # with random augmentation, which must resume too
    return iter(data_lib.make_dataset(source, transform=data_lib.transforms.cub_original_train(32),
                                      global_batch_size=8, seed=0, train=True,
                                      num_workers=num_workers))

  expected = list(itertools.islice(batches(0), 6))
  it, fresh = batches(1), batches(1)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path.absolute(), item_names=('data',)) as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for want in expected[3:]:
    got = next(fresh)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  it.close()
  fresh.close()


# ----------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------
# Loss tolerance against one device: the same maths, sharded reductions summed in another order.
MESH_RTOL = 1e-5


def assert_sharded_as_configured(workdir, step, fsdp):
  """Kernels and their Adam moments sharded over 'fsdp' (when it has > 1 device); the rest
  replicated."""
  specs = {path: meta.sharding.partition_spec
           for path, meta in state_metadata(workdir, step).items()}
  kernels = ['train/params/stage2/backbone/blocks/0/attn/qkv/kernel',
             'frozen/stage1/backbone/blocks/0/attn/qkv/kernel']
  moments = [spec for path, spec in specs.items()
             if path.startswith('train/opt_state') and path.endswith('qkv/kernel')]
  assert moments
  for spec in [specs[k] for k in kernels] + moments:
    assert ('fsdp' in spec) == (fsdp > 1), spec
  assert not any('fsdp' in spec for path, spec in specs.items() if not path.endswith('kernel'))


def assert_params_match(workdir, ref_dir, step):
  """Parameters to 1e-5: Adam normalises each update, so the new layers (1e4 lr factor, steps of
  ~0.1) move by amounts whose last bits follow the reduction order of their gradients."""
  got, want = (flat(restore(w / 'checkpoints' / str(step) / 'state')['train']['params'])
               for w in (workdir, ref_dir))
  assert got.keys() == want.keys()
  for path, value in want.items():
    np.testing.assert_allclose(got[path], value, rtol=1e-4, atol=1e-5, err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', ['8x1', '4x2'])
def test_eight_devices_match_one_device(env, reference, tmp_path, mesh):
  """Data parallel (8, 1) and data x FSDP (4, 2): losses and parameters of the first steps."""
  ref_dir, _ = reference
  steps = 4
  run_main(env, tmp_path, f'mesh={mesh},steps={steps}', devices=8)
  losses = [m['loss'] for m in read_metrics(tmp_path, 'train')]
  ref_losses = [m['loss'] for m in read_metrics(ref_dir, 'train')[:steps]]
  np.testing.assert_allclose(losses, ref_losses, rtol=MESH_RTOL)
  assert len(set(ref_losses)) == steps  # the steps did change the model
  assert_params_match(tmp_path, ref_dir, steps)
  assert_sharded_as_configured(tmp_path, steps, int(mesh.split('x')[1]))
  for split in ('val', 'test'):  # every example counted once with 1 example per device
    assert read_metrics(tmp_path, split)[-1]['num_examples'] == 16

  if mesh == '4x2':  # a checkpoint saved on (4, 2) resumes on (1, 8): pure FSDP
    run_main(env, tmp_path, f'mesh=1x8,steps={2 * steps}', devices=8)
    losses = [m['loss'] for m in read_metrics(tmp_path, 'train')]
    assert [m['step'] for m in read_metrics(tmp_path, 'train')] == list(range(1, 2 * steps + 1))
    ref_losses = [m['loss'] for m in read_metrics(ref_dir, 'train')[:2 * steps]]
    np.testing.assert_allclose(losses, ref_losses, rtol=MESH_RTOL)
    assert_params_match(tmp_path, ref_dir, 2 * steps)
    assert_sharded_as_configured(tmp_path, 2 * steps, 8)


def eval_alignment(devices):
  """`loop_lib.evaluate` over a 'model' that is right except on group 0, with padding.

  The image of example j holds its prediction; labels, groups and valid flags come from the
  per-process batches, as the eval pipeline yields them (process p reads j = p, p + P, ...).
  """
  mesh = sharding.make_mesh([('data', -1), ('fsdp', 1)], devices)
  replicated = sharding.replicated(mesh)
  num_examples, num_groups, pc, pi = 13, 4, jax.process_count(), jax.process_index()
  per_process = 2 * len(devices) // pc

  def batch(i):
    j = pi + pc * (i * per_process + np.arange(per_process))
    label, group = j % 3, j % num_groups
    pred = np.where(group == 0, (label + 1) % 3, label)
    return {'image': np.broadcast_to(pred[:, None, None, None], (per_process, 1, 1, 1)
                                     ).astype(np.uint8),
            'label': label.astype(np.int32), 'group': group.astype(np.int32),
            'valid': (j < num_examples).astype(np.int32)}

  batches = [batch(i) for i in range(-(-num_examples // (2 * len(devices))))]
  eval_step = jax.jit(lambda params, frozen, b, rng: {'logits': jax.nn.one_hot(
      b['image'][:, 0, 0, 0], 3)}, out_shardings=replicated)
  metrics = loop_lib.evaluate(eval_step, {}, {}, batches, len(batches),
                              sharding.batch_sharding(mesh),
                              [f'g{g}' for g in range(num_groups)], seed=0)
  return {k: metrics[k] for k in EXPECTED_ALIGNMENT}


EXPECTED_ALIGNMENT = {'accuracy': 9 / 13, 'num_examples': 13, 'worst_group_accuracy': 0.0,
                      'group_accuracy': {'g0': 0.0, 'g1': 1.0, 'g2': 1.0, 'g3': 1.0}}


def _two_process_worker(process_id: int, port: int, workdir: str) -> None:
  """One of two processes with two CPU devices each, their devices alternating in the mesh:
  evaluates, then saves parameters (collectively) and reads back their JSON."""
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  local = [[d for d in jax.devices() if d.process_index == p] for p in range(2)]
  interleaved = [d for pair in zip(*local) for d in pair]
  metrics = eval_alignment(interleaved)
  mesh = sharding.make_mesh([('data', -1), ('fsdp', 1)], interleaved)
  rows = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh),
                                                np.full((2, 3), process_id, np.float32))
  bias = jax.device_put(np.arange(3, dtype=np.float32), sharding.replicated(mesh))
  workdir = pathlib.Path(workdir)
  workdir_lib.save_params(workdir, 'final', {'rows': rows}, {'bias': bias}, {'step': 7})
  result = {'metrics': metrics, 'info': workdir_lib.read_params_info(workdir, 'final')}
  (workdir / f'{process_id}.json').write_text(json.dumps(result))


@pytest.mark.slow
def test_eval_and_saved_params_across_processes(env, tmp_path):
  """Eval labels line up with predictions whatever the device order; save_params is collective."""
  assert eval_alignment(jax.devices()[:1]) == EXPECTED_ALIGNMENT
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  two_devices = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2',
                     PYTHONPATH=str(REPO / 'tests'))
  procs = [subprocess.Popen([sys.executable, '-c', 'import test_train; test_train.'
                             f'_two_process_worker({i}, {port}, "{tmp_path}")'],
                            env=two_devices, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for proc in procs:
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
  for i in range(2):
    result = json.loads((tmp_path / f'{i}.json').read_text())
    assert result == {'metrics': EXPECTED_ALIGNMENT, 'info': {'step': 7}}
  saved = restore(tmp_path / 'params' / 'final')
  # Global rows follow the mesh: devices of processes 0, 1, 0, 1 hold one row each.
  np.testing.assert_array_equal(saved['params']['rows'], np.repeat([[0], [1], [0], [1]], 3, 1))
  np.testing.assert_array_equal(saved['frozen']['bias'], np.arange(3))


# ----------------------------------------------------------------------------
# Divergence, checkpoints, saved parameters
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_divergence_stops_without_saving_it(env, tmp_path):
  # lr 0 in the first step (warmup from 0), then 1e30 x 1e4 on the heads: infinite by step 2.
  result = run_main(env, tmp_path, '', '--config.optim.lr=1e30',
                    '--config.checkpoint_every_steps=1', check=False)
  assert result.returncode != 0
  error = re.search(r'^FloatingPointError: (.*)$', result.stderr, re.MULTILINE)
  assert error, result.stderr[-3000:]
  assert 'at step 2 ' in error[1] and 'last good checkpoint is step 1 ' in error[1], error[1]
  assert checkpoint_steps(tmp_path) == [1]
  assert not (tmp_path / 'params' / 'final').exists()
  assert [m['step'] for m in read_metrics(tmp_path, 'train')] == [1]
  for path, value in flat(restore(tmp_path / 'checkpoints' / '1' / 'state')).items():
    assert np.isfinite(value).all(), path


@pytest.mark.slow
def test_keeps_latest_checkpoints_and_best_on_val(env, tmp_path):
  steps = 6
  overrides = ('--config.checkpoint_every_steps=1', '--config.keep_checkpoints=2',
               '--config.eval_every_epochs=0.25')
  run_main(env, tmp_path, f'steps={steps}', *overrides)
  assert checkpoint_steps(tmp_path) == [steps - 1, steps]

  config = get_config(f'steps={steps}')
  best = json.loads((tmp_path / 'params' / 'best.json').read_text())
  assert best['split'] == 'val' and best['metric'] == config.data.best_metric
  vals = read_metrics(tmp_path, 'val')
  assert [m['step'] for m in vals] == [2, 4, 6]
  scores = [m[config.data.best_metric] for m in vals]
  assert best['value'] == max(scores) and best['step'] == vals[scores.index(max(scores))]['step']
  saved = restore(tmp_path / 'params' / 'best')
  model = factory.load_model(config, tmp_path, 'best')
  loaded = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert loaded.keys() == (flat(saved['params']) | flat(saved['frozen'])).keys()
  for path, value in (flat(saved['params']) | flat(saved['frozen'])).items():
    assert np.array_equal(loaded[path], value), path

  # Run again: already done, so no training, no new logs or checkpoints.
  logged = (tmp_path / 'metrics.jsonl').read_text()
  start = time.monotonic()
  again = run_main(env, tmp_path, f'steps={steps}', *overrides)
  assert 'step 1/' not in again.stdout
  assert (tmp_path / 'metrics.jsonl').read_text() == logged
  assert checkpoint_steps(tmp_path) == [steps - 1, steps]
  assert time.monotonic() - start < 30


# ----------------------------------------------------------------------------
# Reruns, a shared workdir, changed configs, bad sizes, folders that take no file
# ----------------------------------------------------------------------------
RECORDS = ('metrics.jsonl', 'params/final.json', 'params/best.json')


@pytest.mark.slow
@pytest.mark.parametrize('case', ['finished', 'final_json_deleted', 'killed_in_final_save'])
def test_a_rerun_leaves_the_records_of_one_run(env, reference, tmp_path, case):
  ref_dir, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  if case != 'finished':  # as the README says to redo the final save, or a kill inside it does
    (workdir / 'params' / 'final.json').unlink()
  if case == 'killed_in_final_save':
    shutil.rmtree(workdir / 'params' / 'final')
  rerun = run_main(env, workdir)
  assert 'step 1/' not in rerun.stdout
  for name in RECORDS:
    assert (workdir / name).read_text() == (ref_dir / name).read_text(), name
  assert flat(restore(workdir / 'params' / 'final')).keys() == flat(
      restore(ref_dir / 'params' / 'final')).keys()


@pytest.mark.slow
def test_a_second_run_on_a_workdir_refuses_at_start(env, tmp_path):
  (tmp_path / 'lock.json').write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': os.getpid(), 'since': '2026-01-02T03:04:05+00:00'}))
  result = run_main(env, tmp_path, check=False)
  assert result.returncode != 0
  assert f'pid {os.getpid()}, since 2026-01-02T03:04:05+00:00' in result.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ['lock.json']


@pytest.mark.slow
def test_a_changed_config_is_refused_or_recorded_on_resume(env, reference, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  config_json = (workdir / 'config.json').read_text()
  result = run_main(env, workdir, '', '--config.model.vit_overrides.width=48', check=False)
  assert result.returncode != 0
  assert 'model.vit_overrides.width: 32 -> 48' in result.stderr, result.stderr[-2000:]
  assert 'Orbax' not in result.stderr and 'strict' not in result.stderr
  assert (workdir / 'config.json').read_text() == config_json

  # Evaluating more often is honoured and recorded (the run is done, so nothing trains).
  run_main(env, workdir, '', '--config.eval_every_epochs=0.5')
  assert json.loads((workdir / 'config.json').read_text())['eval_every_epochs'] == 0.5
  [change] = [json.loads(line) for line in
              (workdir / 'config_changes.jsonl').read_text().splitlines()]
  assert change['changed'] == {'eval_every_epochs': {'old': 1.0, 'new': 0.5}}
  for name in RECORDS:
    assert (workdir / name).read_text() == (ref_dir / name).read_text(), name


@pytest.mark.slow
@pytest.mark.parametrize('override, key', [
    ('--config.global_batch_size=12', 'global_batch_size=12'),
    ('--config.data.eval_batch_size=12', 'data.eval_batch_size=12'),
])
def test_batch_sizes_the_mesh_cannot_split_fail_before_compiling(env, tmp_path, override, key):
  result = run_main(env, tmp_path, '', override, devices=8, check=False)
  assert result.returncode != 0
  assert f'{key} does not split evenly over the 8 devices' in result.stderr, result.stderr[-2000:]
  assert 'nearest valid values: 8 or 16' in result.stderr
  assert not (tmp_path / 'metrics.jsonl').exists() and not (tmp_path / 'checkpoints').exists()


@pytest.mark.slow
def test_a_folder_that_takes_no_file_fails_once_clearly(env, tmp_path):
  # At start: nothing is trained.
  (tmp_path / 'start' / 'checkpoints').parent.mkdir()
  (tmp_path / 'start' / 'checkpoints').write_text('')
  result = run_main(env, tmp_path / 'start', check=False)
  assert result.returncode != 0
  assert f'{tmp_path / "start" / "checkpoints"} is not writable' in result.stderr
  assert not (tmp_path / 'start' / 'metrics.jsonl').exists()

  # Mid-run: the folder goes away after the first checkpoint; the next save stops the run.
  workdir = tmp_path / 'mid'
  proc = subprocess.Popen(command(workdir, '', '--config.checkpoint_every_steps=8'), cwd=REPO,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while not (workdir / 'checkpoints' / '8').exists():
    assert proc.poll() is None and time.monotonic() < deadline, 'run ended before step 8'
    time.sleep(0.01)
  os.rename(workdir / 'checkpoints', workdir / 'moved')
  (workdir / 'checkpoints').write_text('')
  _, stderr = proc.communicate(timeout=240)
  assert proc.returncode != 0
  error = re.findall(r'^ifam_jax.train.CheckpointSaveError: (.*)$', stderr, re.MULTILINE)
  assert len(error) == 1, stderr[-3000:]
  assert f'saving a checkpoint in {workdir / "checkpoints"} failed' in error[0]
  assert 'last saved checkpoint is step 8' in error[0]
  assert not (workdir / 'params' / 'final.json').exists()


# ----------------------------------------------------------------------------
# Logs and frozen parameters
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_train_metrics_and_progress_line(reference):
  workdir, stdout = reference
  weights = get_config().loss.weights
  terms = {k for k, w in weights.items() if w}
  for m in read_metrics(workdir, 'train'):
    missing = (terms | {'loss', 'lr', 'grad_norm', 'param_norm', *TIMING}) - m.keys()
    assert not missing, (m['step'], missing)
    assert all(np.isfinite(m[k]) for k in terms)
  assert re.search(rf'^step 3/{STEPS} \(18\.8%\) \| loss \d+\.\d+ .* img/s \| ETA \d+:\d\d:\d\d$',
                   stdout, re.MULTILINE), stdout[:2000]


@pytest.mark.slow
def test_frozen_parameters_stay_put_and_have_no_optimizer_state(reference):
  """Stage-1 backbone frozen (the reference's groups): no change, no gradient, no Adam moments."""
  workdir, _ = reference
  early = restore(workdir / 'checkpoints' / '2' / 'state')
  final = restore(workdir / 'params' / 'final')
  frozen, early_frozen = flat(final['frozen']), flat(early['frozen'])
  trainable, early_trainable = flat(final['params']), flat(early['train']['params'])
  assert frozen and all(path.startswith('stage1/backbone/') for path in frozen)
  assert not any(path.startswith('stage1/backbone/') for path in trainable
                 if not re.search('(cls|reg)_token|pos_embed', path))
  for path, value in frozen.items():
    assert np.array_equal(value, early_frozen[path]), path
  changed = {path for path, value in trainable.items()
             if not np.array_equal(value, early_trainable[path])}
  for prefix in ('stage2/head', 'stage2/backbone', 'stage1/prototypes', 'stage1/part_classifier'):
    assert any(path.startswith(prefix) for path in changed), prefix

  saved = state_metadata(workdir, STEPS)
  in_blocks = [path for path in saved if 'stage1/backbone/blocks' in path]
  assert in_blocks and all(path.startswith('frozen/') for path in in_blocks)
  assert any(path.startswith('train/opt_state') and 'stage2/backbone/blocks' in path
             for path in saved)
  # Plain arrays only: no typed PRNG keys (or anything else) in the saved state.
  assert {str(meta.dtype) for meta in saved.values()} <= {'float32', 'int32'}


# ----------------------------------------------------------------------------
# Two processes (multi-host on localhost)
# ----------------------------------------------------------------------------
def start_two_processes(env, workdir, steps):
  """`python -m ifam_jax.main` as processes 0 and 1 of a two-host job (one CPU device each)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return [subprocess.Popen(
      command(workdir, f'steps={steps}'), cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, start_new_session=True,
      env=dict(env, IFAM_MULTIHOST='1', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)))
          for i in range(2)]


def finish(procs):
  for proc in procs:
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]


@pytest.mark.slow
def test_two_processes_killed_and_resumed_match_an_uninterrupted_run(env, tmp_path):
  """Per-process data shards and iterator states, a collective checkpoint, a kill of both hosts
  mid-run: the resumed job ends with the same parameters and logs as an uninterrupted one."""
  steps = 8
  finish(start_two_processes(env, tmp_path / 'uninterrupted', steps))

  workdir = tmp_path / 'killed'
  procs = start_two_processes(env, workdir, steps)
  try:
    deadline = time.monotonic() + 240
    while not ((workdir / 'checkpoints').exists() and checkpoint_steps(workdir)
               and checkpoint_steps(workdir)[-1] >= steps // 2):
      assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
      time.sleep(0.01)
  finally:
    for proc in procs:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  killed_at = checkpoint_steps(workdir)[-1]
  assert killed_at < steps and not (workdir / 'params' / 'final.json').exists()
  grain_states = sorted(p.name for p in (workdir / 'checkpoints' / str(killed_at) / 'data').glob(
      'process_*'))
  assert grain_states == ['process_0-of-2.json', 'process_1-of-2.json']  # one per process

  finish(start_two_processes(env, workdir, steps))
  want = flat(restore(tmp_path / 'uninterrupted' / 'params' / 'final'))
  got = flat(restore(workdir / 'params' / 'final'))
  assert want.keys() == got.keys()
  for path, value in want.items():
    assert np.array_equal(value, got[path]), path
  assert without_timing(read_metrics(workdir)) == without_timing(
      read_metrics(tmp_path / 'uninterrupted'))
  assert [m['step'] for m in read_metrics(workdir, 'train')] == list(range(1, steps + 1))


@pytest.mark.slow
@pytest.mark.parametrize('accumulation', [1, 2])
def test_train_step_ema_follows_the_optimizer_updates(accumulation):
  """The EMA moves once per optimizer update (every `accumulation` micro-steps), by
  `optim.ema_update` of the parameters after that update."""
  config = get_config()
  config.optim.ema_decay = 0.9
  config.optim.accumulation_steps = accumulation
  mesh = sharding.make_mesh(config.mesh)
  t = train.build_training(config, 4, steps_per_epoch=8, mesh=mesh)
  rng = np.random.default_rng(0)
  state = t.state
  initial = flat(jax.device_get(state['ema']))
  with jax.set_mesh(mesh):
    for step in range(1, 5):
      batch = jax.device_put({  # not bench's batch helper: this file is also a bench config
          'image': rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
          'label': rng.integers(0, 4, (8,), dtype=np.int32),
          'valid': np.ones((8,), np.int32), 'first_pass': np.ones((8,), np.int32)},
          t.batch_sharding)
      previous = jax.device_get(state['ema'])  # the step donates the state
      state, _ = t.train_step(state, t.frozen, batch)
      if step % accumulation:
        expected = previous
      else:
        expected = optim.ema_update(previous, state['params'], step // accumulation, 0.9)
      for path, value in flat(expected).items():
        np.testing.assert_allclose(flat(state['ema'])[path], value, rtol=1e-5, atol=1e-9,
                                   err_msg=path)
  assert any(not np.array_equal(flat(state['ema'])[p], v) for p, v in initial.items())


def test_train_step_counts_each_unreadable_image_once():
  """An unreadable image counts in its first pass over the data only, not in every epoch."""
  config = get_config()
  config_lib.use_baseline(config)
  mesh = sharding.make_mesh(config.mesh)
  t = train.build_training(config, 4, steps_per_epoch=1, mesh=mesh)
  state = t.state
  valid = np.array([1, 0, 1, 1, 0, 1, 1, 1], np.int32)
  with jax.set_mesh(mesh):
    for first_pass in (1, 0, 0):  # three epochs of the same batch
      batch = jax.device_put({
          'image': np.zeros((8, 32, 32, 3), np.uint8), 'label': np.zeros((8,), np.int32),
          'valid': valid, 'first_pass': np.full((8,), first_pass, np.int32)}, t.batch_sharding)
      state, metrics = t.train_step(state, t.frozen, batch)
  assert int(state['skipped_images']) == int(metrics['skipped_images']) == 2


# ----------------------------------------------------------------------------
# Stage 2 on its visible tokens only
# ----------------------------------------------------------------------------
@pytest.mark.slow  # compiles the packed step for every count pattern
@pytest.mark.parametrize('counts', [
    [0, 12, 3, 5, 0, 7, 2, 12, 1, 3, 0, 9, 6, 11, 2, 8],  # the last group needs every patch
    [12, 12, 12, 12, 0, 7, 2, 12, 1, 3, 0, 9, 6, 11, 2, 8],  # both groups: run as one batch
    [0, 10, 3, 5, 0, 7, 2, 11, 1, 3, 0, 9, 6, 11, 2, 8],  # none
])
def test_packed_stage2_sorts_each_shard_and_matches_every_token(counts):
  """A toy stage 2 (logits from the visible tokens' sum): the packed loss and gradient equal
  the all-token computation, and each group runs at the smallest capacity that holds it,
  groups being formed within each shard (numpy by hand), whether no, some or all groups need
  every patch (those run merged)."""
  rng = np.random.default_rng(0)
  b, n_p, d, classes, shards, groups = 16, 12, 3, 4, 2, 2
  tokens = rng.normal(size=(b, n_p, d)).astype(np.float32)
  counts = np.array(counts)
  mask = np.zeros((b, n_p), np.float32)
  for i, c in enumerate(counts):
    mask[i, rng.permutation(n_p)[:c]] = 1.0
  labels = rng.integers(0, classes, b).astype(np.int32)
  valid = np.ones(b, np.float32)
  valid[3] = 0.0
  params = {'w': rng.normal(size=(d, classes)).astype(np.float32)}

  def stage2_loss(params, tokens, mask, keep_index, labels, valid, denominator):
    gathered = jnp.take_along_axis(tokens, keep_index[..., None], axis=1)
    visible = jnp.take_along_axis(mask, keep_index, axis=1)
    logits = jnp.sum(gathered * visible[..., None], axis=1) @ params['w']
    return jnp.sum(losses.negative_log_likelihood(logits, labels) * valid) / denominator, logits

  capacities = (0, 3, 6, 9, 12)
  loss, grads, metrics = packed_stage2.packed_stage2(
      stage2_loss, params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(labels),
      jnp.asarray(valid), capacities=capacities, groups=groups, shards=shards)

  everything = np.broadcast_to(np.arange(n_p), (b, n_p))
  (want_loss, logits), want_grads = jax.value_and_grad(stage2_loss, has_aux=True)(
      params, tokens, mask, everything, labels, valid, valid.sum())
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(grads['w'], want_grads['w'], rtol=1e-5, atol=1e-7)
  correct = (np.argmax(logits, axis=-1) == labels) * valid
  np.testing.assert_allclose(metrics['accuracy'], correct.sum() / valid.sum(), rtol=1e-6)

  per_shard = np.sort(counts.reshape(shards, b // shards), axis=1)
  group_max = per_shard.reshape(shards, groups, -1).max(axis=(0, 2))  # one capacity per group
  chosen = [min(c for c in capacities if c >= m) for m in group_max]
  expected = sum(chosen) * shards * (b // shards // groups) / (b * n_p)
  np.testing.assert_allclose(metrics['stage2_tokens'], expected, rtol=1e-6)


@pytest.mark.slow
def test_packed_train_step_matches_the_dense_step():
  """The ImageNet recipe's tiers against `stage2_token_tiers=()` (the default): every loss term
  and metric, and the
  parameters after two steps, in fp32; packing does not apply to a straight-through mask."""
  from test_configs import load_recipe  # here: this file is also the subprocesses' config
  results = {}
  recipe = load_recipe('imagenet').get_config('root=/data,weights=/w').model
  assert recipe.stage2_token_tiers and not config_lib.base_config().model.stage2_token_tiers
  for tiers in (recipe.stage2_token_tiers, ()):
    config = get_config()
    config.model.stage2_token_tiers = tiers
    mesh = sharding.make_mesh(config.mesh)
    t = train.build_training(config, 4, steps_per_epoch=8, mesh=mesh)
    rng = np.random.default_rng(0)
    state = t.state
    with jax.set_mesh(mesh):
      for _ in range(2):
        batch = jax.device_put({
            'image': rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
            'label': rng.integers(0, 4, (8,), dtype=np.int32),
            'valid': np.array([1, 1, 1, 0, 1, 1, 1, 1], np.int32),
            'first_pass': np.ones((8,), np.int32)}, t.batch_sharding)
        state, metrics = t.train_step(state, t.frozen, batch)
    results[tiers] = flat(jax.device_get(state['params'])), jax.device_get(metrics)
  (packed_params, packed), (dense_params, dense) = results.values()
  assert 0 < packed.pop('stage2_tokens') < 1
  assert packed.keys() == dense.keys()
  for key, value in dense.items():
    np.testing.assert_allclose(packed[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
  for path, value in dense_params.items():
    np.testing.assert_allclose(packed_params[path], value, rtol=1e-5, atol=1e-7, err_msg=path)

  config = get_config()
  assert packed_stage2.packing_applies(config.model)
  config.model.stage2_mask = 'straight_through'
  assert not packed_stage2.packing_applies(config.model)
  with pytest.raises(ValueError, match='fractions'):
    train.stage2_capacities((0.5, 1.5), 16)
  assert train.stage2_capacities((0.0, 0.3, 0.5), 16) == (0, 5, 8, 16)


def test_a_validation_metric_that_never_changed_selected_nothing():
  message = ("validation worst_group_accuracy was 0 at every evaluation (3): params/best is the "
             "first evaluation's, it selected nothing. Check that the model learns on 'val', or "
             'pick another data.best_metric.')
  assert train.unselective_best('val', 'worst_group_accuracy', [0.0, 0.0, 0.0]) == message
  assert train.unselective_best('val', 'accuracy', [0.5, 0.5, 0.75]) is None
  assert train.unselective_best('val', 'accuracy', [0.5]) is None  # one evaluation: no choice
  assert train.unselective_best('val', 'accuracy', []) is None
