"""The demo's benchmark family: methods x seeds on every variant of configs/demo.py, one table.

  python launch/demo_family.py --workdir /tmp/family --parallel 2

Each (variant, seed, method) is one `--mode compare` process on <workdir>/<variant> with that
seed and method alone (each method and seed locks its own folder, so they run side by side), at
most `--parallel` at a time, its output in <workdir>/<variant>/<method>.seed_<s>.log; the
post-hoc peers (dfr, dar, a2) start once every trained run is done, so their extractor runs
exist. Then each variant's comparison over all the seeds prints its table (finished runs are
not rerun) and this script prints one row per variant and method from the <variant>/compare.json
files. A failed process is named and the others go on; the exit status is then non-zero.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

from ifam_jax.compare import POSTHOC

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ('texture', 'colour', 'both', 'size_position', 'correlation_99', 'no_object')
METHODS = ('erm', 'ifam', 'ifam_remedies')
# compare.json keys of the family table: (header, key).
COLUMNS = (('avg', 'accuracy'), ('worst grp', 'worst_group_accuracy'),
           ('mask->bg AUROC', 'mask_leak_auroc'), ('empty masks', 'empty_mask_rate'))


def compare_command(workdir: pathlib.Path, variant: str, methods: Sequence[str],
                    seeds: Sequence[int]) -> list[str]:
  return [sys.executable, '-m', 'ifam_jax.main', f'--config=configs/demo.py:variant={variant}',
          '--mode=compare', f'--methods={",".join(methods)}',
          f'--config.compare.seeds=({",".join(map(str, seeds))},)',
          f'--workdir={workdir / variant}']


def run_logged(command: Sequence[str], log: pathlib.Path) -> int:
  log.parent.mkdir(parents=True, exist_ok=True)
  with log.open('w') as f:
    return subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                          check=False).returncode


def run_all(jobs: Mapping[tuple, Sequence[str]], parallel: int,
            name: Callable[..., str], log: Callable[..., pathlib.Path]) -> set[tuple]:
  """Runs every job's command, `parallel` at a time, each logged to `log(*job)`; prints each
  outcome as it comes and returns the failed jobs."""
  failed = set()
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    futures = {pool.submit(run_logged, command, log(*job)): job for job, command in jobs.items()}
    for future in concurrent.futures.as_completed(futures):
      job = futures[future]
      status = future.result()
      print(f'{name(*job)}: ' + ('done' if status == 0 else
                                 f'FAILED (exit {status}), see {log(*job)}'), flush=True)
      if status:
        failed.add(job)
  return failed


def cell(row: Mapping[str, Mapping[str, float]], key: str) -> str:
  if key not in row['mean']:
    return '-'
  mean, std = row['mean'][key], row['std'][key]
  scale = 1 if key == 'mask_leak_auroc' else 100
  digits = 2 if key == 'mask_leak_auroc' else 1
  return f'{scale * mean:.{digits}f} ± {scale * std:.{digits}f}'


def family_table(workdir: pathlib.Path, variants: Sequence[str]) -> str:
  """Markdown: one row per variant and method of the variants' compare.json, mean ± std."""
  lines = ['| variant | method | seeds | ' + ' | '.join(h for h, _ in COLUMNS) + ' |',
           '|---|---|---|' + '---|' * len(COLUMNS)]
  for variant in variants:
    report = json.loads((workdir / variant / 'compare.json').read_text())
    for row in report['methods'].values():
      lines.append(f'| {variant} | {row["label"]} | {len(row["seeds"])} | '
                   + ' | '.join(cell(row, key) for _, key in COLUMNS) + ' |')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', type=pathlib.Path, required=True)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--parallel', type=int, default=2, help='processes at a time')
  parser.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  args = parser.parse_args(argv)
  variants, methods = args.variants.split(','), args.methods.split(',')
  seeds = [int(s) for s in args.seeds.split(',')]
  if args.parallel < 1:
    parser.error(f'--parallel must be at least 1, got {args.parallel}')
  jobs = [[(v, s, m) for v in variants for s in seeds for m in methods if m not in POSTHOC],
          [(v, s, m) for v in variants for s in seeds for m in methods if m in POSTHOC]]
  command = lambda v, s, m: compare_command(args.workdir, v, [m], [s])
  if args.dry_run:
    for v, s, m in jobs[0] + jobs[1]:
      print(' '.join(command(v, s, m)))
    return 0
  failed = set()
  for phase in jobs:
    failed |= run_all({job: command(*job) for job in phase}, args.parallel,
                      lambda v, s, m: f'{v}, {m}, seed {s}',
                      lambda v, s, m: args.workdir / v / f'{m}.seed_{s}.log')
  finished = [v for v in variants if not any(f[0] == v for f in failed)]
  tables = {(v,): compare_command(args.workdir, v, methods, seeds) for v in finished}
  failed |= run_all(tables, args.parallel, lambda v: f'{v}: the table',
                    lambda v: args.workdir / v / 'table.log')
  tabled = [v for v in finished if (v,) not in failed]
  if tabled:
    print(family_table(args.workdir, tabled))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
