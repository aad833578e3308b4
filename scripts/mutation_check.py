"""Plant one plausible bug at a time and check that the tests meant for it fail (issue 12's list, plus its items).

    python scripts/mutation_check.py                # every mutation (~3-4 minutes on 2 cores)
    python scripts/mutation_check.py --only dirac   # the mutations whose name contains "dirac"

Each mutation replaces one exact piece of source text (the script stops if the text is not found, so a refactor
that moves the code makes it fail loudly instead of testing nothing), runs the named tests with pytest, and
restores the file whatever happens. A mutation is CAUGHT when at least one of its tests fails. Prints a table and
exits 1 when any mutation survives. CPU only: the CUDA timing mutation is caught on CPU by the fake-timing test
(the real CUDA loop is checked by scripts/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: list


MUTATIONS = [
    Mutation("dirac ratio not applied inside the FM-KT distiller", "fmkt/distillers/flow.py",
             "z0 = apply_dirac_ratio(self.teacher_logits(images), cfg.dirac_ratio)",
             "z0 = self.teacher_logits(images)",
             ["tests/test_distillers.py"]),
    Mutation("theta target not detached", "fmkt/distillers/flow.py",
             "self.metric(theta, logits.detach(), labels, wf)", "self.metric(theta, logits, labels, wf)",
             ["tests/test_distillers.py"]),
    Mutation("OFM-KT target not detached", "fmkt/distillers/flow.py",
             "target = logits.detach()", "target = logits",
             ["tests/test_distillers.py"]),
    Mutation("FM-KT metric term summed over steps, not averaged", "fmkt/distillers/flow.py",
             "loss_kd = sum(self.metric(y, z0, labels, wf) for y in preds) * (cfg.loss_weight / n)",
             "loss_kd = sum(self.metric(y, z0, labels, wf) for y in preds) * cfg.loss_weight",
             ["tests/test_distillers.py"]),
    Mutation("fp32 parity gate loosened to 1e-1", "export/parity.py",
             '"fp32": {"max_abs_diff": 1e-4', '"fp32": {"max_abs_diff": 1e-1',
             ["tests/test_export.py::test_parity_gates_are_the_published_numbers"]),
    Mutation("parity compares PyTorch with itself", "export/pipeline.py",
             "check_parity(reference, runner, images, batches", "check_parity(reference, reference, images, batches",
             ["tests/test_export.py::test_parity_compares_the_exported_graph_not_pytorch"]),
    Mutation("window-attention padding mask removed", "fmkt/flow/encoders.py",
             'attn = attn.masked_fill(~valid[None], float("-inf"))', "attn = attn",
             ["tests/test_flow.py"]),
    Mutation("reloaded artifact ignores transfer", "fmkt/student.py",
             'transfer=d.get("transfer", "logits")', 'transfer="logits"',
             ["tests/test_config_artifact.py"]),
    Mutation("DIST without tau^2", "fmkt/losses.py",
             "return tau**2 * (beta * inter + gamma * intra)", "return beta * inter + gamma * intra",
             ["tests/test_peer_losses.py"]),
    Mutation("DIST student softmax ignores tau", "fmkt/losses.py",
             "y_s = F.softmax(logits_s / tau, dim=1)", "y_s = F.softmax(logits_s, dim=1)",
             ["tests/test_peer_losses.py"]),
    Mutation("bench device percentiles taken from host times", "bench/__init__.py",
             "percentiles(t.device)", "percentiles(t.host)",
             ["tests/test_bench.py::test_rows_take_host_and_device_percentiles_from_their_own_samples"]),
    # issue 12's numbered items, undone one at a time
    Mutation("1: feature-transfer target at the raw t (VP s'(1) = -inf)", "fmkt/flow/schedules.py",
             "        da, ds = self.velocity_coefficients(t)\n        return da * fp32(z1) + ds * fp32(z0)",
             "        return self.da(t) * fp32(z1) + self.ds(t) * fp32(z0)",
             ["tests/test_distillers.py", "tests/test_flow.py"]),
    Mutation("1: a NaN before any update blamed on the learning rate", "fmkt/step.py",
             "    if not updated:\n", "    if False:\n",
             ["tests/test_cli.py::test_nonfinite_loss_names_the_cause"]),
    Mutation("2: theta/ofmkt accept transfer=features", "fmkt/commands.py",
             'if m.transfer == "features" and not method.features:', "if False:",
             ["tests/test_config_artifact.py"]),
    Mutation("3: fmkt.json without default_steps", "fmkt/student.py",
             '"default_steps": self.default_steps,', "",
             ["tests/test_config_artifact.py"]),
    Mutation("4: estimate formed in the operands' dtype", "fmkt/flow/sampler.py",
             "pooled = (p * fp32(z1) + q * fp32(v)).mean(dim=(2, 3))", "pooled = (p * z1 + q * v).mean(dim=(2, 3))",
             ["tests/test_flow.py"]),
    Mutation("6: TensorRT fp32 keeps TF32", "export/tensorrt_engine.py",
             "config.clear_flag(trt.BuilderFlag.TF32)", "pass",
             ["tests/test_export.py::test_tensorrt_fp32_engine_is_built_without_tf32"]),
    Mutation("10: fmkt.json metrics without their precision", "fmkt/engine.py",
             '"precision": FP32, "split": evaluation_split(run.cfg),', '"split": evaluation_split(run.cfg),',
             ["tests/test_cli.py::test_eval_says_why_a_requested_k_was_not_evaluated"]),
    Mutation("6: ONNX Runtime CUDA fp32 keeps TF32", "export/onnx_export.py",
             'return {"use_tf32": "0"} if precision == "fp32" else {}', "return {}",
             ["tests/test_export.py::test_onnxruntime_cuda_fp32_turns_tf32_off"]),
    Mutation("7: AOTI compiled in this process (no child)", "export/aoti.py",
             'cmd = [sys.executable, "-X", "faulthandler", "-m", "fmkt.export.aoti", task, json.dumps(args)]',
             'cmd = [sys.executable, "-m", "fmkt.export.aoti", task, json.dumps(args)]',
             ["tests/test_export.py::test_an_aoti_child_that_dies_is_one_sentence_naming_the_signal_and_the_phase"]),
    Mutation("8: kernel launches without a device guard", "kernels/__init__.py",
             "return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()",
             "return contextlib.nullcontext()",
             ["tests/test_kernels.py::test_kernel_launches_are_guarded_by_the_tensors_device"]),
    Mutation("9: set_input_shape's result unchecked", "export/tensorrt_engine.py",
             "if not self.context.set_input_shape(self.input_name, tuple(images.shape)):",
             "if not (self.context.set_input_shape(self.input_name, tuple(images.shape)) or True):",
             ["tests/test_export.py::test_tensorrt_batch_outside_the_profile_is_one_sentence"]),
    Mutation("11: a requested K=0 dropped silently", "cli/app.py",
             'out_console.print(f"note: {step_label(k)} was not evaluated: {why}.", highlight=False)', "pass",
             ["tests/test_cli.py::test_eval_says_why_a_requested_k_was_not_evaluated"]),
]
# issue 20: the fast path's numbered items (the captured step runs on tests/graph_emulator.py's CPU graph)
_CAP, _LOOP = "tests/test_capture.py::", "tests/test_train_loop.py::"
MUTATIONS += [
    Mutation("20.1: the capture in the default global mode", "fmkt/capture.py",
             "with torch.cuda.graph(graph, capture_error_mode=CAPTURE_ERROR_MODE):", "with torch.cuda.graph(graph):",
             [_CAP + "test_the_capture_runs_in_thread_local_mode"]),
    Mutation("20.2: a resume restores the checkpoint's float LR", "fmkt/optim.py",
             '            group["lr"] = fresh["lr"].fill_(saved_lr)', '            group["lr"] = saved_lr',
             [_CAP + "test_a_float_lr_checkpoint_restores_into_a_device_lr_tensor",
              _CAP + "test_captured_step_trains_like_the_eager_step"]),
    Mutation("20.2: a resume takes the checkpoint's fused/capturable flags", "fmkt/optim.py",
             '        group.update({k: v for k, v in fresh.items() if k != "lr"})', "",
             [_CAP + "test_a_float_lr_checkpoint_restores_into_a_device_lr_tensor"]),
    Mutation("20.2: the capture accepts an LR it would freeze", "fmkt/optim.py",
             "        if not (isinstance(lr, torch.Tensor) and lr.device == device):", "        if False:",
             [_CAP + "test_graph_refusal_says_why_as_data",
              _CAP + "test_make_step_refuses_an_optimizer_a_graph_would_freeze"]),
    Mutation("20.3: AdamW built without capturable=True", "fmkt/optim.py",
             'CAPTURE_OPTIONS = {"sgd": {}, "adamw": {"capturable": True}}',
             'CAPTURE_OPTIONS = {"sgd": {}, "adamw": {}}',
             [_CAP + "test_graph_refusal_says_why_as_data", _CAP + "test_captured_step_trains_like_the_eager_step"]),
    Mutation("20.4: the graph steps the optimiser whatever the loss", "fmkt/capture.py",
             "        self.found_inf.copy_(torch.maximum(self.found_inf, nonfinite))", "        pass",
             [_CAP + "test_a_nonfinite_captured_step_leaves_the_weights_untouched"]),
    Mutation("20.4: a non-finite captured step not caught by the loop", "fmkt/meter.py",
             "            if not all(math.isfinite(v) for v in parts):", "            if False:",
             [_LOOP + "test_the_meter_reads_pending_steps_at_its_refresh",
              _LOOP + "test_a_nonfinite_loss_in_the_captured_loop_stops_at_its_step"]),
    Mutation("20.5: DKD's warm-up ramps within the epoch (counted from 0)", "fmkt/distillers/base.py",
             "    return min((math.floor(progress) + 1) / cfg.dkd_warmup_epochs, 1.0)",
             "    return min(progress / cfg.dkd_warmup_epochs, 1.0)",
             [_CAP + "test_dkd_warmup_counts_epochs_from_one_as_mdistiller"]),
    Mutation("20.5: the step captured before the method's step is steady", "fmkt/capture.py",
             "        if self.failed or progress < self.start:", "        if self.failed:",
             [_CAP + "test_dkd_steps_are_captured_once_the_warmup_ends"]),
    Mutation("20.6: the epoch's LR read after the scheduler stepped", "fmkt/engine.py",
             "    record = epoch_record(epoch, epoch_lr(cfg, epoch, len(run.loader)), sums, seen, seconds, trained)",
             '    record = epoch_record(epoch, run.optimizer.param_groups[0]["lr"], sums, seen, seconds, trained)',
             [_LOOP + "test_epoch_record_states_the_lr_its_steps_trained_with"]),
    Mutation("20.6: each step logs the next step's LR", "fmkt/engine.py",
             "scheduled_lr(cfg, epoch * iters + step, iters)", "scheduled_lr(cfg, epoch * iters + step + 1, iters)",
             [_LOOP + "test_epoch_record_states_the_lr_its_steps_trained_with",
              _LOOP + "test_the_logged_lr_is_the_one_the_weights_moved_by"]),
    Mutation("20.7: the losses read from the device every step", "fmkt/engine.py",
             "        if save or meter.due() or step + 1 == iters:", "        if True:",
             [_LOOP + "test_the_captured_loop_reads_the_device_a_fixed_number_of_times"]),
    Mutation("20.7: a resumed epoch's images/s counts the images before the resume", "fmkt/engine.py",
             "    trained = seen - (run.resumed_seen if skip else 0)", "    trained = seen",
             [_LOOP + "test_a_resumed_epoch_divides_the_images_it_trained_by_its_time"]),
]
# issue 20: honest statistics and provenance
_STATS = "tests/test_accuracy_stats.py::"
MUTATIONS += [
    Mutation("20 stats: Holm correction removed", "benchmarks/accuracy_stats.py",
             "running = max(running, min(1.0, (m - i) * pvalues[name]))", "running = pvalues[name]",
             [_STATS + "test_holm_adjusts_over_the_rows_and_the_verdict_reads_the_adjusted_p"]),
    Mutation("20 stats: significance claimed from the raw p, not the Holm-adjusted", "benchmarks/accuracy_stats.py",
             'c["verdict"] = verdict(c["direction"], c["p_holm"], c["no_test"], family)',
             'c["verdict"] = verdict(c["direction"], c["p"], c["no_test"], family)',
             [_STATS + "test_holm_adjusts_over_the_rows_and_the_verdict_reads_the_adjusted_p"]),
    Mutation("20 stats: a p-value printed for 2 seeds", "benchmarks/accuracy_stats.py",
             "MIN_SEEDS = 3", "MIN_SEEDS = 2",
             [_STATS + "test_two_seeds_give_no_p_value_whatever_their_differences",
              _STATS + "test_table_and_pareto_input_read_by_the_pareto_tool"]),
    Mutation("20 stats: a p-value from a zero spread", "benchmarks/accuracy_stats.py",
             'else "zero spread" if sd < ZERO else None', "else None",
             [_STATS + "test_zero_spread_gives_no_p_value", _STATS + "test_a_tie_reads_tie_not_behind"]),
    Mutation("20 stats: a tie reads behind", "benchmarks/accuracy_stats.py",
             'direction = "tie" if abs(mean) < ZERO else "ahead" if mean > 0 else "behind"',
             'direction = "ahead" if mean > 0 else "behind"',
             [_STATS + "test_a_tie_reads_tie_not_behind"]),
    Mutation("20 stats: the exact sign-flip test one-sided", "benchmarks/accuracy_stats.py",
             "if abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - ZERO",
             "if sum(s * d for s, d in zip(signs, diffs)) >= observed - ZERO",
             [_STATS + "test_exact_sign_flip_p_matches_a_hand_count"]),
    Mutation("20 stats: converged judged on the last epochs whatever the LR", "benchmarks/accuracy_stats.py",
             "        if frac >= lr_floor - ZERO:\n", "        if True:\n",
             [_STATS + "test_convergence_is_judged_at_the_same_lr_fraction_not_after_annealing",
              _STATS + "test_runs_saved_without_the_lr_fraction_are_read_with_the_recipe_cosine"]),
    Mutation("20 stats: the benchmark's history without the LR fraction", "benchmarks/accuracy.py",
             '"lr_fraction": round(lr_factor(cfg, h["epoch"]), 6)}', "}",
             [_STATS + "test_accuracy_history_records_the_lr_fraction"]),
    Mutation("20 provenance: KD+LS logs' CE-weight date unsaid", "fmkt/distillers/published.py",
             'f"{LS_KD}: logs/KD/{name}.txt{when}{LS_KD_LOG_CAVEAT}"', 'f"{LS_KD}: logs/KD/{name}.txt{when}"',
             [_STATS + "test_ls_sources_say_their_logs_predate_the_code_they_are_read_with",
              "tests/test_recipes.py"]),
    Mutation("20 provenance: DKD+LS logs' mapping date unsaid", "fmkt/distillers/published.py",
             '" (BETA: cfg.py\'s 8.0)")\n                + LS_DKD_LOG_CAVEAT)', '" (BETA: cfg.py\'s 8.0)"))',
             [_STATS + "test_ls_sources_say_their_logs_predate_the_code_they_are_read_with",
              "tests/test_recipes.py"]),
    Mutation("20 core: the GPU plan takes DKD as captured", "scripts/gpu_accuracy.sh",
             "dkd:7005", "dkd:21728",
             [_STATS + "test_gpu_accuracy_core_plan_fits_eight_minutes"]),
]
# issue 20: the small ones and the pre-drawn augmentation
MUTATIONS += [
    Mutation("20 small: a teacher artifact's accuracy read under key \"1\"", "fmkt/teacher.py",
             '.get("last", {}).get("plain")}', '.get("last", {}).get("1")}',
             ["tests/test_config_artifact.py::test_teacher_artifact_record_has_its_plain_accuracy"]),
    Mutation("20 small: the teacher scored on the test split under data.holdout", "fmkt/commands.py",
             "    _, test, _ = load_data(cfg)\n",
             "    _, test, _ = load_dataset(cfg.data.name, cfg.data.dir, **data_options(cfg.data))\n"
             "    test = test.subset(cfg.data.test_subset, seed=0) if cfg.data.test_subset else test\n",
             ["tests/test_cli.py::test_holdout_evaluates_on_training_images_and_says_so"]),
    Mutation("20 small: unreadable val files counted as evaluated", "fmkt/evaluation.py",
             "    whole.evaluated = total  # all ranks together", "    whole.evaluated = len(whole)",
             ["tests/test_imagefolder.py::test_fmkt_json_counts_the_validation_images_evaluated"]),
    Mutation("20 small: the images evaluated counted on this rank only (not all-reduced)", "fmkt/evaluation.py",
             "    whole.evaluated = total  # all ranks together",
             "    whole.evaluated = len(data) - getattr(getattr(data, 'skipped', None), 'count', 0)",
             ["tests/test_ddp.py::test_two_gloo_processes_on_an_image_folder"]),
    Mutation("20 small: TensorRT names the batch range when (C, H, W) is wrong", "export/tensorrt_engine.py",
             "        if shape[1:] != hi[1:]:", "        if False:",
             ["tests/test_export.py::test_tensorrt_image_shape_other_than_the_engines_is_named"]),
    Mutation("20 pre-drawn: flips drawn before the crop offsets", "fmkt/data/loader.py",
             "    off = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=generator.device) "
             "if p > 0 and n else None\n"
             "    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5 "
             "if info.hflip and n else None\n",
             "    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5 "
             "if info.hflip and n else None\n"
             "    off = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=generator.device) "
             "if p > 0 and n else None\n",
             ["tests/test_data.py::test_predrawn_augmentation_gives_the_same_batches"]),
]
# issue 20: every number fmkt prints or stores, one planted bug each
_NB = "tests/test_numbers.py::"
_NB_R = "tests/test_resume_randomness.py::"
_DEIT = "tests/test_deit_recipe.py::"
_NB_EVAL = [_NB + "test_evaluate_gives_each_k_its_own_top1", _NB + "test_eval_cli_prints_and_returns_each_k_top1"]
_NB_DISTILL = [_NB + "test_distill_stores_and_prints_top1_per_k_and_the_epoch_losses"]
_NB_BENCH = [_NB + "test_bench_json_csv_and_tables_hold_the_measured_numbers"]
_NB_RESUME = _NB_R + "test_resume_equals_uninterrupted"
_NB_RNG = 'globals().setdefault("_rng", torch.Generator().manual_seed(0))'  # a generator no checkpoint holds
MUTATIONS += [
    Mutation("numbers: top-1 of every K computed at one K", "fmkt/evaluation.py",
             "outputs = {k: model.logits_from_features(z1, int(k)) for k in keys}",
             "outputs = {k: model.logits_from_features(z1, int(keys[0])) for k in keys}", _NB_EVAL),
    Mutation("numbers: top-1 keys swapped", "fmkt/evaluation.py",
             "return {k: 100.0 * correct[k] / max(total, 1) for k in keys}",
             "return {k: 100.0 * correct[j] / max(total, 1) for k, j in zip(keys, keys[::-1])}", _NB_EVAL),
    Mutation("numbers: top-1 as a fraction, not %", "fmkt/evaluation.py",
             "100.0 * correct[k] / max(total, 1)", "1.0 * correct[k] / max(total, 1)", _NB_EVAL),
    Mutation("numbers: top-1 divided by the last batch's size", "fmkt/evaluation.py",
             "total += labels.numel()", "total = labels.numel()", _NB_EVAL),
    Mutation("numbers: Z1 once per evaluation, not per batch", "fmkt/evaluation.py",
             "z1 = model.features(images)", "z1 = model.features(images) if not total else z1", _NB_EVAL),
    Mutation("numbers: top-1 with BatchNorm batch statistics", "fmkt/evaluation.py",
             "    model.eval()\n    correct = {k: 0 for k in keys}",
             "    model.train()\n    correct = {k: 0 for k in keys}", _NB_EVAL),
    Mutation("numbers: theta (K=0) key not added", "fmkt/evaluation.py",
             "steps = list(steps) + ([0] if model.theta_head is not None and 0 not in steps else [])",
             "steps = list(steps)", _NB_EVAL),
    Mutation("numbers: theta (K=0) evaluated through the flow at the default K", "fmkt/evaluation.py",
             "outputs = {k: model.logits_from_features(z1, int(k)) for k in keys}",
             "outputs = {k: model.logits_from_features(z1, int(k) or model.default_steps) for k in keys}", _NB_EVAL),
    Mutation("numbers: eval table pairs values with the wrong K", "cli/app.py",
             'for k, v in res["top1"].items():', 'for k, v in zip(res["top1"], sorted(res["top1"].values())):',
             [_NB + "test_eval_cli_prints_and_returns_each_k_top1"]),
    Mutation("numbers: eval counts the images of one batch", "fmkt/commands.py",
             '"images": len(test), "top1": acc', '"images": min(len(test), batch_size), "top1": acc',
             [_NB + "test_eval_cli_prints_and_returns_each_k_top1"]),
    Mutation("numbers: fmkt.json best is the last epoch's", "fmkt/engine.py",
             'run.best = {k: max(run.best[k], record["top1"][k]) for k in run.keys}',
             'run.best = {k: record["top1"][k] for k in run.keys}', _NB_DISTILL),
    Mutation("numbers: distill table swaps last and best", "cli/app.py",
             'f"{v:.2f}", f"{result.best[k]:.2f}")', 'f"{result.best[k]:.2f}", f"{v:.2f}")', _NB_DISTILL),
    Mutation("numbers: epoch losses not weighted by batch size", "fmkt/meter.py",
             "self.sums[k] = self.sums.get(k, 0.0) + v * images", "self.sums[k] = self.sums.get(k, 0.0) + v",
             _NB_DISTILL),
    Mutation("numbers: train_loss leaves out the theta loss", "fmkt/meter.py",
             '"train_loss": sum(sums.values()) / max(seen, 1)',
             '"train_loss": (sums.get("loss_ce", 0.0) + sums.get("loss_kd", 0.0)) / max(seen, 1)', _NB_DISTILL),
    Mutation("numbers: teacher accuracy on the training split", "fmkt/commands.py",
             "_, test, _ = load_data(cfg)", "test, _, _ = load_data(cfg)", _NB_DISTILL),
    Mutation("numbers: bench host latency in s, not ms", "bench/timing.py",
             "t.host.append((time.perf_counter() - start) * 1e3)", "t.host.append(time.perf_counter() - start)",
             [_NB + "test_time_interleaved_reports_each_calls_time_in_ms"]),
    Mutation("numbers: bench p90 is the 95th percentile", "bench/timing.py",
             "np.percentile(a, [50, 90, 99])", "np.percentile(a, [50, 95, 99])", _NB_BENCH),
    Mutation("numbers: bench p90 and p99 swapped", "bench/__init__.py",
             "p50, p90, p99 = percentiles(t.host)", "p50, p99, p90 = percentiles(t.host)", _NB_BENCH),
    Mutation("numbers: bench mean leaves out the first timed call", "bench/__init__.py",
             "mean = sum(t.host) / len(t.host)", "mean = sum(t.host[1:]) / len(t.host)", _NB_BENCH),
    Mutation("numbers: bench img/s from the p50, not the mean", "bench/__init__.py",
             "throughput=1e3 * b / mean", "throughput=1e3 * b / p50", _NB_BENCH),
    Mutation("numbers: bench img/s per batch, not per image", "bench/__init__.py",
             "throughput=1e3 * b / mean", "throughput=1e3 / mean", _NB_BENCH),
    Mutation("numbers: bench x student inverted", "bench/report.py",
             "r.x_student = r.p50_ms / ref", "r.x_student = ref / r.p50_ms", _NB_BENCH),
    Mutation("numbers: bench JSON rounds latencies to 0.1 ms", "bench/report.py",
             "d[k] = round(v, 4)", "d[k] = round(v, 1)", _NB_BENCH),
    Mutation("numbers: bench table's p50 column shows the mean", "bench/report.py",
             'f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}"', 'f"{r.mean_ms:.3f}", f"{r.p90_ms:.3f}"', _NB_BENCH),
    Mutation("numbers: bench table's img/s per batch", "bench/report.py",
             'f"{r.throughput:,.0f}"', 'f"{r.throughput / r.batch:,.0f}"', _NB_BENCH),
    Mutation("numbers: bench top-1 from the best epoch, not the last", "bench/plan.py",
             'last = metrics.get("last") or {}', 'last = metrics.get("best") or {}', _NB_BENCH),
    Mutation("numbers: latency.py speed-up inverted", "benchmarks/latency.py",
             "ratio = slow.p50_ms / fast.p50_ms", "ratio = fast.p50_ms / slow.p50_ms",
             [_NB + "test_latency_script_target_lines"]),
    Mutation("numbers: latency.py overhead target at 1.5x", "benchmarks/latency.py",
             "{'met' if r.x_student <= 1.3 else 'NOT met'}", "{'met' if r.x_student <= 1.5 else 'NOT met'}",
             [_NB + "test_latency_script_target_lines"]),
    Mutation("numbers: parity diff is the mean, not the max", "export/parity.py",
             "diff = (reference - exported).abs().max().item()", "diff = (reference - exported).abs().mean().item()",
             [_NB + "test_parity_rows_sentence_and_table_carry_the_measured_numbers"]),
    Mutation("numbers: parity sentence gives the ratio, not by how much", "export/parity.py",
             "{r.max_abs_diff - self.gate['max_abs_diff']:.3g}", "{r.max_abs_diff / self.gate['max_abs_diff']:.3g}",
             [_NB + "test_parity_rows_sentence_and_table_carry_the_measured_numbers"]),
    Mutation("numbers: parity table agreement as a fraction", "export/parity.py",
             'f"{100 * r.top1_agreement:.2f}", gate', 'f"{r.top1_agreement:.2f}", gate',
             [_NB + "test_parity_rows_sentence_and_table_carry_the_measured_numbers"]),
    Mutation("numbers: resume: a resumed epoch's augmentation restarts at the first batch's draws",
             "fmkt/data/loader.py", "images = apply_augmentation(images, self.augment_info, *draws[b])",
             "images = apply_augmentation(images, self.augment_info, *draws[b - start])",
             [_NB_RESUME + "[augmentation]"]),
    Mutation("numbers: resume: the Dirac permutation from a generator no checkpoint holds", "fmkt/distillers/flow.py",
             "rows = torch.randperm(b, generator=generator)[:n_shuffle]",
             f"rows = torch.randperm(b, generator=generator or {_NB_RNG})[:n_shuffle]",
             [_NB_RESUME + "[dirac ratio]"]),
    Mutation("numbers: resume: N drawn from a generator no checkpoint holds", "fmkt/distillers/flow.py",
             "torch.randint(len(choices), (1,))", f"torch.randint(len(choices), (1,), generator={_NB_RNG})",
             [_NB_RESUME + "[N drawn per iteration]"]),
    Mutation("numbers: resume: the RNG (dropout's masks) not restored", "fmkt/checkpoint.py",
             '    set_rng_state(ckpt["rng"])', "    pass", [_NB_RESUME + "[dropout]"]),
    Mutation("numbers: resume: the image-folder loader re-reads a resumed epoch from its first batch",
             "fmkt/data/workers.py", "for b in range(start, len(self))]", "for b in range(0, len(self) - start)]",
             ["tests/test_imagefolder.py::test_resume_mid_epoch_matches_an_uninterrupted_run"]),
    Mutation("numbers: resume: models (the teacher's too) built without train.seed", "fmkt/engine.py",
             "    seed_everything(cfg.train.seed)  # the same seed", "    pass  # the same seed",
             [_NB_R + "test_a_run_interrupted_while_its_teacher_trains_reruns_to_the_same_teacher_and_student"]),
    Mutation("numbers: resume: the teacher cache ignores train.seed", "fmkt/commands.py",
             '"epochs": t.train.epochs, "seed": t.train.seed}', '"epochs": t.train.epochs}',
             [_NB_R + "test_a_run_interrupted_while_its_teacher_trains_reruns_to_the_same_teacher_and_student"]),
    # --- issue 21: deit recipe ---
    Mutation("deit: Mixup/CutMix drawn from the unseeded global generators", "fmkt/mixing.py",
             "with seeded_global_rngs(self.generator(epoch, step)):", "if True:",
             [_DEIT + "test_mixup_is_timms_reproducible_from_the_seed_and_leaves_the_global_generators_alone",
              _NB_R + "test_resume_equals_uninterrupted"]),
    Mutation("deit: the mixing step ignores the batch's step", "fmkt/mixing.py",
             "epoch, round((progress - epoch) * self.iters))", "epoch, 0)",
             [_DEIT + "test_the_mixing_step_reads_epoch_and_step_from_progress"]),
    Mutation("deit: label smoothing mixed into the targets as well", "fmkt/mixing.py",
             'mode="batch", label_smoothing=0.0,', 'mode="batch", label_smoothing=0.1,',
             [_DEIT + "test_mixup_is_timms_reproducible_from_the_seed_and_leaves_the_global_generators_alone"]),
    Mutation("deit: a default run wrapped in the mixing step", "fmkt/mixing.py",
             "    if not d.mixup and not d.cutmix:\n        return step", "    if False:\n        return step",
             [_DEIT + "test_with_every_key_off_the_run_keeps_its_own_step_and_pipeline"]),
    Mutation("deit: DKD's class of a soft target is not its argmax", "fmkt/losses.py",
             "target = hard_target(target)", "target = target.argmin(dim=1)",
             [_DEIT + "test_ce_and_dkd_on_mixed_targets",
              _DEIT + "test_a_one_hot_soft_target_gives_the_hard_labels_losses"]),
    Mutation("deit: per-image augmentation from the unseeded global generators", "fmkt/data/deit_aug.py",
             "        with seeded_global_rngs(generator):\n            if self.rand_augment:",
             "        if True:\n            if self.rand_augment:",
             [_DEIT + "test_image_augment_is_timms_randaugment_and_erasing_seeded_by_the_generator"]),
    Mutation("deit: repeated augmentation ignores train.seed", "fmkt/data/deit_aug.py",
             "generator=torch.Generator().manual_seed(seed + epoch)) if shuffle",
             "generator=torch.Generator().manual_seed(epoch)) if shuffle",
             [_DEIT + "test_repeated_augmentation_is_timms_repeat_aug_sampler"]),
    Mutation("deit: KD's CE weight not 1 - alpha", "fmkt/distillers/published_deit.py",
             '{"temperature": 1.0}, "ce_weight": 0.5,', '{"temperature": 1.0}, "ce_weight": 1.0,',
             [_DEIT + "test_deit_settings_are_the_authors"]),
    # --- issue 21: timm export ---
    Mutation("timm export: the unrolled graph takes the pooled shortcut for a non-linear head", "export/graph.py",
             "self.pooled_head = model.pooled_head", "self.pooled_head = True",
             ["tests/test_timm_export.py::test_timm_students_unrolled_match_pytorch_and_are_tensorrt_ready[convnext]"]),
    Mutation("timm export: LayerNormalization missing from TensorRT 8.6's operators", "export/trt_operators.py",
             'frozenset({"GroupNormalization", "IsInf", "LayerNormalization"})',
             'frozenset({"GroupNormalization", "IsInf"})',
             ["tests/test_timm_export.py::test_timm_students_unrolled_match_pytorch_and_are_tensorrt_ready[deit]"]),
    Mutation("timm export: the minimum TensorRT is the oldest op's, not the newest's", "export/onnx_export.py",
             "return max(versions + [BASELINE]", "return min(versions + [BASELINE]",
             ["tests/test_timm_export.py::test_timm_students_unrolled_match_pytorch_and_are_tensorrt_ready[deit]"]),
    Mutation("timm export: the static-shape check does not fold the fixed-batch copy", "export/onnx_export.py",
             "    if problems:\n        try:\n            folded = ort_fold(fixed)",
             "    if False:\n        try:\n            folded = ort_fold(fixed)",
             ["tests/test_timm_export.py::test_tensorrt_version_of_each_op_and_the_static_shape_check"]),
    Mutation("timm export: bench's ONNX graph of a K is the student alone", "bench/runners.py",
             "module = copy.deepcopy(variant_module(self.source.model, variant, self.method)).cpu()",
             'module = copy.deepcopy(variant_module(self.source.model, "student", self.method)).cpu()',
             ["tests/test_timm_export.py::test_bench_times_timm_students_next_to_the_student_alone"]),
    Mutation("timm export: fp16 graphs round the folded normalisation to fp16 too", "export/onnx_export.py",
             "node_block_list=input_normalisation(model))", "node_block_list=[])",
             ["tests/test_timm_export.py::test_cli_exports_the_vit_in_fp16_with_parity_and_the_readiness_op_list"]),
]


# --- issue 21: pixels ---
_PX = "tests/test_imagefolder.py::"
MUTATIONS += [
    Mutation("21 pixels: data.decode=gpu draws the crop from (width, height)", "fmkt/data/workers.py",
             "None if rng is None else draw_train(*hw, rng)", "None if rng is None else draw_train(hw[1], hw[0], rng)",
             [_PX + "test_the_byte_path_draws_what_the_cpu_path_draws"]),
    Mutation("21 pixels: evaluation resized without antialiasing", "fmkt/data/transforms.py",
             "TF.resize(chw, [eval_resize(size)], antialias=True)",
             "TF.resize(chw, [eval_resize(size)], antialias=False)",
             [_PX + "test_crops_are_torchvision_v2_transforms_and_the_previous_code_bit_for_bit"]),
    Mutation("21 pixels: the flip drawn before the box", "fmkt/data/transforms.py",
             "    box = random_resized_box(height, width, rng)\n    return box, bool(rng.random() < 0.5)",
             "    flip = bool(rng.random() < 0.5)\n    return random_resized_box(height, width, rng), flip",
             [_PX + "test_train_crop_flips_with_the_coin"]),
    Mutation("21 pixels: a JPEG the device refuses is not decoded on the CPU", "fmkt/data/workers.py",
             "                chw = decode_bytes(blob[start:end])", "                raise RuntimeError('device only')",
             [_PX + "test_the_byte_path_handles_bad_jpegs_as_the_workers_do"]),
    Mutation("21 pixels: Pillow decodes what torchvision.io can", "fmkt/data/transforms.py",
             "    image = decode_bytes(data) if torchvision_decodes(data) else pillow_rgb(path)",
             "    image = pillow_rgb(path)", [_PX + "test_pillow_decodes_only_what_torchvision_cannot"]),
    Mutation("21 pixels: the ImageNet ResNet's features skip the max pool", "fmkt/models/resnet_imagenet.py",
             "        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))",
             "        x = self.relu(self.bn1(self.conv1(x)))",
             ["tests/test_imagenet_models.py::test_logits_are_torchvision_models_own_bit_for_bit"]),
]


# --- issue 21: timm core (the model's own head as S, a ViT's Z1) ---
_TM = "tests/test_timm_models.py::"
MUTATIONS += [
    Mutation("21 timm: a non-linear head still takes the pooled shortcut", "fmkt/student.py",
             "        if self.pooled_head:\n            return [self.head(p) for p in out.pooled_estimates]",
             "        if True:\n            return [self.head(p) for p in out.pooled_estimates]",
             [_TM + "test_the_ensemble_is_the_mean_of_the_steps_logits_through_the_own_head"]),
    Mutation("21 timm: the ensemble is S of the mean estimate map", "fmkt/student.py",
             "    return torch.stack(model.step_logits(out), 0).mean(0)",
             "    return model.map_head(torch.stack(out.estimates, 0).mean(0))",
             [_TM + "test_the_ensemble_is_the_mean_of_the_steps_logits_through_the_own_head"]),
    Mutation("21 timm: a ViT's Z1 is its first patch token, not the class token", "fmkt/models/timm_backbone.py",
             "return feat[:, 0, :, None, None]", "return feat[:, 1, :, None, None]",
             [_TM + "test_vit_z1_is_the_class_token_expanded_to_7x7_as_the_official_code"]),
    Mutation("21 timm: pretrained=true recorded for the rebuild", "fmkt/student.py",
             'kwargs = {k: v for k, v in spec.arch_kwargs.items() if k != "pretrained"}',
             "kwargs = dict(spec.arch_kwargs)",
             [_TM + "test_pretrained_is_never_recorded_for_the_rebuild"]),
]


def run(m: Mutation) -> tuple[bool, str, float]:
    path = ROOT / m.path
    original = path.read_text()
    if original.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name!r}: the text to replace occurs {original.count(m.old)} times in "
                         f"{m.path}; update this script.")
    t0 = time.perf_counter()
    try:
        path.write_text(original.replace(m.old, m.new))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                              cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(original)
    failed = [ln.split(" - ")[0].replace("FAILED ", "") for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
    return proc.returncode != 0, ", ".join(failed) or proc.stdout.strip().splitlines()[-1], time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the mutations whose name contains this text")
    args = ap.parse_args(argv)
    survived = 0
    for m in MUTATIONS:
        if args.only not in m.name:
            continue
        caught, detail, seconds = run(m)
        survived += not caught
        print(f"{'CAUGHT  ' if caught else 'SURVIVED'} {m.name}  ({seconds:.0f} s) -> {detail}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
