"""Evaluators: each given a predict function, used alike by training and the CLI modes.

A predict function is `predict(params, frozen, batch, rng) -> per-example outputs` (a dict of
[B, ...] arrays); the `make_*_step` builders make the ones the evaluators expect. An evaluator
is built from the config and its data, holds no model, and runs as
`evaluator.run(predict, params, frozen)`:

  loop.Classification         summarize_predictions' metrics of one eval set (train and eval)
  in9.BackgroundChallenge     the adversarial-background challenge of the IN-9 release
  thresholds.Calibration      per-part thresholds from a split's part assignments
  audit.Audit                 stage-2 logits bitwise unchanged when masked-out pixels change
  leak.MaskLeak               what the binary mask's geometry alone tells of the background
  parts.PartMetrics           keypoint regression (Kp), NMI and ARI on CUB's part annotations

Modules: metrics (pure metric functions), loop (the ordered, padded eval loop), predict
(`make_eval_step`), in9, thresholds, audit, leak, parts, tables (Markdown tables), common (JSON
files).
"""
